"""CosyVoice3 text tokenizer against the upstream reference, plus the tiny BPE writer."""
from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cosytools.errors import ConfigError, InputError
from cosytools.frontend.bpe_writer import QWEN2_BPE_SIZE, write_tiny_bpe
from cosytools.frontend.tokenizer import (
    COSYVOICE3_ADDITIONAL_SPECIAL_TOKENS,
    COSYVOICE3_SPECIAL_TOKENS,
    CosyVoice3Tokenizer,
)

ALL_SPECIAL = COSYVOICE3_SPECIAL_TOKENS  # <|endoftext|> + upstream's additional list
# decode(skip_special_tokens=False) runs added tokens through the ByteLevel decoder too (as HF's
# fast tokenizer does), so only specials without byte-level-alphabet characters come back verbatim
ASCII_SPECIAL = tuple(t for t in ALL_SPECIAL if t.isascii())


@pytest.fixture(scope="session")
def blank_en(fixture_model_dir: Path) -> Path:
    return fixture_model_dir / "CosyVoice-BlankEN"


@pytest.fixture(scope="session")
def tok(blank_en: Path) -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer.from_dir(blank_en)


@pytest.fixture(scope="session")
def ref(load_ref):
    tensors, meta = load_ref("tokenizer")
    strings = json.loads(meta["strings"])
    ids = [tensors[f"tokenizer.out.ids.{i:02d}"].tolist() for i in range(len(strings))]
    return strings, ids, meta


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_bpe") / "CosyVoice-BlankEN"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen2"}\n', encoding="utf-8")
    write_tiny_bpe(d, seed=0)
    return d


@pytest.fixture(scope="session")
def tiny_tok(tiny_dir: Path) -> CosyVoice3Tokenizer:
    return CosyVoice3Tokenizer.from_dir(tiny_dir)


# ---------------------------------------------------------------- reference parity

def test_reference_ids(tok, ref):
    strings, ids, _ = ref
    assert len(strings) == 12
    for i, (s, want) in enumerate(zip(strings, ids)):
        assert tok.encode(s) == want, f"string {i}: {s!r}"


def test_reference_decode_skip_special(tok, ref):
    strings, ids, meta = ref
    want = json.loads(meta["decoded_skip_special"])
    for i, (s, r) in enumerate(zip(ids, want)):
        assert tok.decode(s) == r, f"string {i}"
        assert tok.decode(s, skip_special_tokens=True) == r


def test_reference_decode_keep_special(tok, ref):
    strings, ids, _ = ref
    for i, (s, r) in enumerate(zip(strings, ids)):
        assert tok.decode(r, skip_special_tokens=False) == unicodedata.normalize("NFC", s), f"string {i}"


def test_reference_sizes(tok, ref):
    _, _, meta = ref
    assert tok.vocab_size == int(meta["total_vocab_size"]) == 151924
    assert len(tok) == tok.vocab_size
    assert tok.endofprompt_id == int(meta["endofprompt_id"]) == 151646
    assert tok.eos_id == int(meta["endoftext_id"]) == 151643
    assert tok.backend.get_vocab_size(with_added_tokens=False) == int(meta["bpe_vocab_size"])
    assert len(COSYVOICE3_ADDITIONAL_SPECIAL_TOKENS) == int(meta["num_special_tokens_added_by_cosyvoice3"])


def test_special_token_ids(tok):
    # existing Qwen2 tokens keep their ids; new ones follow in upstream's order without gaps
    assert [tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [151643, 151644, 151645]
    new = [t for t in ALL_SPECIAL if t not in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    assert [tok.token_to_id(t) for t in new] == list(range(151646, 151646 + len(new)))
    assert tok.special_ids == frozenset(range(151643, 151924))
    assert tok.special_tokens["<|endofprompt|>"] == 151646
    assert tok.id_to_token(151647) == "[breath]"
    assert tok.id_to_token(151923) == "[ǜ]"
    assert tok.id_to_token(0) == "!"


def test_special_tokens_never_split(tok):
    for t in ALL_SPECIAL:
        i = tok.token_to_id(t)
        assert tok.encode(t) == [i], t
        ids = tok.encode(f"abc{t}def")  # inside a word, no spaces
        assert i in ids, t
        assert tok.decode(ids) == "abcdef"
        # no lstrip/rstrip: surrounding spaces stay separate tokens
        ids = tok.encode(f"x {t} y")
        assert ids.count(i) == 1
        assert tok.decode(ids) == "x  y"
        if t in ASCII_SPECIAL:
            assert tok.decode(ids, skip_special_tokens=False) == f"x {t} y"


def test_decode_keep_special_bytelevel_quirk(tok):
    """HF/tokenizers pass added tokens through the ByteLevel decoder: Latin-1 letters become bytes."""
    assert tok.decode(tok.encode("[ià]"), skip_special_tokens=False) == "[i\ufffd]"
    assert tok.decode(tok.encode("[ǎo]"), skip_special_tokens=False) == "[ǎo]"  # outside the byte alphabet


def test_special_tokens_match_raw_text(tok):
    """Specials are added with normalized=False: matched on the raw text, before NFC (as in HF)."""
    decomposed = "[ia\u0300]"  # NFC gives "[ià]", but the raw text is not the special token
    ids = tok.encode(decomposed)
    assert tok.token_to_id("[ià]") not in ids
    assert tok.decode(ids) == "[ià]"


def test_decode_rejects_bad_ids(tok):
    with pytest.raises(InputError):
        tok.decode([tok.vocab_size])
    with pytest.raises(InputError):
        tok.decode([-1])
    with pytest.raises(InputError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_cache(blank_en, tok):
    assert CosyVoice3Tokenizer.from_dir(blank_en) is tok
    assert CosyVoice3Tokenizer.from_dir(str(blank_en) + "/") is tok


# ---------------------------------------------------------------- round trip property

_TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs", "Cn")), max_size=60)


def _no_markup(s: str) -> bool:
    return not any(t in s for t in ALL_SPECIAL)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=_TEXT.filter(_no_markup))
def test_roundtrip_fixture(tok, s):
    assert tok.decode(tok.encode(s)) == unicodedata.normalize("NFC", s)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=_TEXT.filter(_no_markup))
def test_roundtrip_tiny(tiny_tok, s):
    assert tiny_tok.decode(tiny_tok.encode(s)) == unicodedata.normalize("NFC", s)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.text(alphabet="ab c中。\n", max_size=8), t=st.sampled_from(ALL_SPECIAL),
       b=st.text(alphabet="ab c中。\n", max_size=8))
def test_special_inside_text(tok, a, t, b):
    ids = tok.encode(a + t + b)
    assert tok.token_to_id(t) in ids
    assert tok.decode(ids) == a + b
    if t in ASCII_SPECIAL:
        assert tok.decode(ids, skip_special_tokens=False) == a + t + b


# ---------------------------------------------------------------- tiny BPE writer

def test_tiny_bpe_layout(tiny_dir, tiny_tok):
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == ["config.json", "merges.txt", "tokenizer_config.json", "vocab.json"]
    assert (tiny_dir / "config.json").read_text() == '{"model_type": "qwen2"}\n'  # untouched
    vocab = json.loads((tiny_dir / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == QWEN2_BPE_SIZE == 151643
    assert sorted(vocab.values()) == list(range(QWEN2_BPE_SIZE))
    assert vocab["<|filler_151642|>"] == 151642
    merges = (tiny_dir / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert merges[0].startswith("#version")
    n_trained = sum(1 for k in vocab if not k.startswith("<|filler_"))
    assert n_trained == 2000 and len([m for m in merges[1:] if m]) == n_trained - 256
    cfg = json.loads((tiny_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert {k: v["content"] for k, v in cfg["added_tokens_decoder"].items()} == {
        "151643": "<|endoftext|>", "151644": "<|im_start|>", "151645": "<|im_end|>"}
    assert tiny_tok.token_to_id("<|endoftext|>") == 151643
    assert tiny_tok.endofprompt_id == 151646
    assert tiny_tok.vocab_size == 151924
    s = "Hello, world! 今天天气很好。東京の天気は晴れ。 123 [breath]café"
    ids = tiny_tok.encode(s)
    assert max(i for i in ids if i < 151643) < 2000  # fillers are never produced
    assert tiny_tok.decode(ids) == "Hello, world! 今天天气很好。東京の天気は晴れ。 123 café"


def test_tiny_bpe_deterministic(tmp_path, tiny_dir):
    write_tiny_bpe(tmp_path, seed=0)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        assert (tmp_path / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    assert not (tmp_path / "config.json").exists()


# ---------------------------------------------------------------- errors

def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match="nope"):
        CosyVoice3Tokenizer.from_dir(missing)


def test_missing_files(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    with pytest.raises(ConfigError, match=r"empty.*vocab\.json"):
        CosyVoice3Tokenizer.from_dir(d)


def test_broken_vocab(tmp_path, tiny_dir):
    d = tmp_path / "CosyVoice-BlankEN"
    shutil.copytree(tiny_dir, d)
    (d / "vocab.json").write_text('{"a": 0, ', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"CosyVoice-BlankEN.*vocab\.json"):
        CosyVoice3Tokenizer.from_dir(d)
    (d / "vocab.json").write_text('["not", "a", "dict"]', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"vocab\.json"):
        CosyVoice3Tokenizer.from_dir(d)


def test_broken_merges(tmp_path, tiny_dir):
    d = tmp_path / "CosyVoice-BlankEN"
    shutil.copytree(tiny_dir, d)
    (d / "merges.txt").write_text("#version: 0.2\nĠ t h\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"merges\.txt line 2"):
        CosyVoice3Tokenizer.from_dir(d)
    (d / "merges.txt").write_text("#version: 0.2\nĠ zzzz\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"merges\.txt.*not in vocab"):
        CosyVoice3Tokenizer.from_dir(d)
    (d / "merges.txt").unlink()
    with pytest.raises(ConfigError, match=r"merges\.txt not found"):
        CosyVoice3Tokenizer.from_dir(d)


def test_broken_tokenizer_config(tmp_path, tiny_dir):
    d = tmp_path / "CosyVoice-BlankEN"
    shutil.copytree(tiny_dir, d)
    (d / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json"):
        CosyVoice3Tokenizer.from_dir(d)


def test_tokenizer_json_preferred(tmp_path, tok, ref):
    """A folder with tokenizer.json (the serialized fixture BPE) gives the same ids."""
    d = tmp_path / "CosyVoice-BlankEN"
    d.mkdir()
    tok.backend.save(str(d / "tokenizer.json"))
    t2 = CosyVoice3Tokenizer.from_dir(d)
    strings, ids, _ = ref
    assert [t2.encode(s) for s in strings] == ids
    assert t2.vocab_size == tok.vocab_size
    (d / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        CosyVoice3Tokenizer.from_dir(d)
