"""CosyVoice3 text tokenizer: Qwen2 byte-level BPE plus CosyVoice3's special tokens.

Built with the ``tokenizers`` library only (no ``transformers``). Ids are those upstream's
``CosyVoice3Tokenizer`` gets from ``AutoTokenizer.from_pretrained(CosyVoice-BlankEN)`` followed
by ``add_special_tokens`` with the list below (``<|endofprompt|>`` = 151646 on a Qwen2 vocab).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import unicodedata
from pathlib import Path
from typing import Any, Iterable, Optional, Union

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from ..errors import ConfigError, InputError

__all__ = [
    "CosyVoice3Tokenizer",
    "QWEN2_PRETOKENIZE_REGEX",
    "EOS_TOKEN",
    "ENDOFPROMPT_TOKEN",
    "COSYVOICE3_ADDITIONAL_SPECIAL_TOKENS",
    "COSYVOICE3_SPECIAL_TOKENS",
    "build_qwen2_bpe",
    "clear_tokenizer_cache",
    "nfc",
]

log = logging.getLogger(__name__)

#: Qwen2's pre-tokenization regex (``Split``, behaviour ``isolated``).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

EOS_TOKEN = "<|endoftext|>"
ENDOFPROMPT_TOKEN = "<|endofprompt|>"

#: upstream ``CosyVoice3Tokenizer``'s ``additional_special_tokens``, in upstream's order.
COSYVOICE3_ADDITIONAL_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|im_start|>", "<|im_end|>", "<|endofprompt|>",
    "[breath]", "<strong>", "</strong>", "[noise]",
    "[laughter]", "[cough]", "[clucking]", "[accent]",
    "[quick_breath]",
    "<laughter>", "</laughter>",
    "[hissing]", "[sigh]", "[vocalized-noise]",
    "[lipsmack]", "[mn]", "<|endofsystem|>",
    "[AA]", "[AA0]", "[AA1]", "[AA2]", "[AE]", "[AE0]", "[AE1]", "[AE2]", "[AH]", "[AH0]", "[AH1]", "[AH2]",
    "[AO]", "[AO0]", "[AO1]", "[AO2]", "[AW]", "[AW0]", "[AW1]", "[AW2]", "[AY]", "[AY0]", "[AY1]", "[AY2]",
    "[B]", "[CH]", "[D]", "[DH]", "[EH]", "[EH0]", "[EH1]", "[EH2]", "[ER]", "[ER0]", "[ER1]", "[ER2]", "[EY]",
    "[EY0]", "[EY1]", "[EY2]", "[F]", "[G]", "[HH]", "[IH]", "[IH0]", "[IH1]", "[IH2]", "[IY]", "[IY0]", "[IY1]",
    "[IY2]", "[JH]", "[K]", "[L]", "[M]", "[N]", "[NG]", "[OW]", "[OW0]", "[OW1]", "[OW2]", "[OY]", "[OY0]",
    "[OY1]", "[OY2]", "[P]", "[R]", "[S]", "[SH]", "[T]", "[TH]", "[UH]", "[UH0]", "[UH1]", "[UH2]", "[UW]",
    "[UW0]", "[UW1]", "[UW2]", "[V]", "[W]", "[Y]", "[Z]", "[ZH]",
    "[a]", "[ai]", "[an]", "[ang]", "[ao]", "[b]", "[c]", "[ch]", "[d]", "[e]", "[ei]", "[en]", "[eng]", "[f]",
    "[g]", "[h]", "[i]", "[ian]", "[in]", "[ing]", "[iu]", "[ià]", "[iàn]", "[iàng]", "[iào]", "[iá]", "[ián]",
    "[iáng]", "[iáo]", "[iè]", "[ié]", "[iòng]", "[ióng]", "[iù]", "[iú]", "[iā]", "[iān]", "[iāng]", "[iāo]",
    "[iē]", "[iě]", "[iōng]", "[iū]", "[iǎ]", "[iǎn]", "[iǎng]", "[iǎo]", "[iǒng]", "[iǔ]", "[j]", "[k]", "[l]",
    "[m]", "[n]", "[o]", "[ong]", "[ou]", "[p]", "[q]", "[r]", "[s]", "[sh]", "[t]", "[u]", "[uang]", "[ue]",
    "[un]", "[uo]", "[uà]", "[uài]", "[uàn]", "[uàng]", "[uá]", "[uái]", "[uán]", "[uáng]", "[uè]", "[ué]", "[uì]",
    "[uí]", "[uò]", "[uó]", "[uā]", "[uāi]", "[uān]", "[uāng]", "[uē]", "[uě]", "[uī]", "[uō]", "[uǎ]", "[uǎi]",
    "[uǎn]", "[uǎng]", "[uǐ]", "[uǒ]", "[vè]", "[w]", "[x]", "[y]", "[z]", "[zh]", "[à]", "[ài]", "[àn]", "[àng]",
    "[ào]", "[á]", "[ái]", "[án]", "[áng]", "[áo]", "[è]", "[èi]", "[èn]", "[èng]", "[èr]", "[é]", "[éi]", "[én]",
    "[éng]", "[ér]", "[ì]", "[ìn]", "[ìng]", "[í]", "[ín]", "[íng]", "[ò]", "[òng]", "[òu]", "[ó]", "[óng]", "[óu]",
    "[ù]", "[ùn]", "[ú]", "[ún]", "[ā]", "[āi]", "[ān]", "[āng]", "[āo]", "[ē]", "[ēi]", "[ēn]", "[ēng]", "[ě]",
    "[ěi]", "[ěn]", "[ěng]", "[ěr]", "[ī]", "[īn]", "[īng]", "[ō]", "[ōng]", "[ōu]", "[ū]", "[ūn]", "[ǎ]", "[ǎi]",
    "[ǎn]", "[ǎng]", "[ǎo]", "[ǐ]", "[ǐn]", "[ǐng]", "[ǒ]", "[ǒng]", "[ǒu]", "[ǔ]", "[ǔn]", "[ǘ]", "[ǚ]", "[ǜ]",
)

#: every token upstream passes to ``add_special_tokens`` (eos/pad first), duplicates removed, in order.
COSYVOICE3_SPECIAL_TOKENS: tuple[str, ...] = tuple(
    dict.fromkeys((EOS_TOKEN, EOS_TOKEN) + COSYVOICE3_ADDITIONAL_SPECIAL_TOKENS)
)

_ADDED_TOKEN_FLAGS = ("lstrip", "rstrip", "single_word", "normalized", "special")


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path.parent}: {path.name} not found ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path.parent}: cannot read {path.name} ({what}): {e}") from None


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path, "BPE vocabulary")
    if not isinstance(vocab, dict) or not vocab:
        raise ConfigError(f"{path.parent}: {path.name} must be a non-empty JSON object token -> id, "
                          f"got {type(vocab).__name__}")
    for tok, idx in vocab.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ConfigError(f"{path.parent}: {path.name}: token {tok!r} has id {idx!r}, expected an int >= 0")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path.parent}: {path.name} not found (BPE merges)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.parent}: cannot read {path.name} (BPE merges): {e}") from None
    merges: list[tuple[str, str]] = []
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ConfigError(f"{path.parent}: {path.name} line {lineno}: expected two tokens separated by "
                              f"one space, got {line[:80]!r}")
        for p in parts:
            if p not in vocab:
                raise ConfigError(f"{path.parent}: {path.name} line {lineno}: token {p!r} is not in vocab.json")
        if parts[0] + parts[1] not in vocab:
            raise ConfigError(f"{path.parent}: {path.name} line {lineno}: merge result "
                              f"{parts[0] + parts[1]!r} is not in vocab.json")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen2_bpe(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """A Qwen2 byte-level BPE pipeline (NFC, Qwen2 split regex, ByteLevel) without added tokens."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                        continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


def _added_tokens_from_config(folder: Path) -> list[tuple[int, AddedToken]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder`` as (id, AddedToken), sorted by id."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        log.warning("%s: no tokenizer_config.json; using only the CosyVoice3 special tokens", folder)
        return []
    cfg = _read_json(path, "tokenizer config")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{folder}: tokenizer_config.json must be a JSON object, got {type(cfg).__name__}")
    dec = cfg.get("added_tokens_decoder") or {}
    if not isinstance(dec, dict):
        raise ConfigError(f"{folder}: tokenizer_config.json: added_tokens_decoder must be an object id -> token")
    out: list[tuple[int, AddedToken]] = []
    for key, spec in dec.items():
        try:
            idx = int(key)
        except ValueError:
            raise ConfigError(f"{folder}: tokenizer_config.json: added_tokens_decoder key {key!r} "
                              f"is not an integer id") from None
        if isinstance(spec, str):
            spec = {"content": spec}
        if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise ConfigError(f"{folder}: tokenizer_config.json: added_tokens_decoder[{key}] needs a "
                              f"'content' string, got {spec!r}")
        special = bool(spec.get("special", False))
        out.append((idx, AddedToken(
            spec["content"],
            single_word=bool(spec.get("single_word", False)),
            lstrip=bool(spec.get("lstrip", False)),
            rstrip=bool(spec.get("rstrip", False)),
            normalized=bool(spec.get("normalized", not special)),
            special=special,
        )))
    out.sort(key=lambda t: t[0])
    return out


def _build(folder: Path) -> Tokenizer:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: tokenizer folder not found (expected a CosyVoice-BlankEN directory "
                          f"with vocab.json + merges.txt or tokenizer.json)")
    tj = folder / "tokenizer.json"
    if tj.is_file():
        try:
            tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise ConfigError(f"{folder}: cannot read tokenizer.json: {e}") from None
    else:
        vocab = _read_vocab(folder / "vocab.json")
        merges = _read_merges(folder / "merges.txt", vocab)
        try:
            tok = build_qwen2_bpe(vocab, merges)
        except Exception as e:
            raise ConfigError(f"{folder}: cannot build a BPE from vocab.json + merges.txt: {e}") from None

    # tokens of tokenizer_config.json at their declared ids (as HF's from_pretrained does)
    declared = _added_tokens_from_config(folder)
    for idx, at in declared:
        (tok.add_special_tokens if at.special else tok.add_tokens)([at])
        got = tok.token_to_id(at.content)
        if got != idx:
            raise ConfigError(f"{folder}: tokenizer_config.json: added token {at.content!r} is declared at id "
                              f"{idx} but lands at id {got} (the BPE vocabulary has "
                              f"{tok.get_vocab_size(with_added_tokens=False)} entries)")

    # upstream: add_special_tokens({eos, pad, additional_special_tokens}): special, not normalized,
    # no lstrip/rstrip/single_word; known tokens keep their ids, new ones get consecutive ids.
    tok.add_special_tokens([AddedToken(c, single_word=False, lstrip=False, rstrip=False,
                                       normalized=False, special=True) for c in COSYVOICE3_SPECIAL_TOKENS])
    return tok


class CosyVoice3Tokenizer:
    """Text <-> ids exactly as upstream ``CosyVoice3Tokenizer`` (Qwen2 BPE + CosyVoice3 special tokens)."""

    def __init__(self, tokenizer: Tokenizer, folder: Optional[Path] = None) -> None:
        self._tok = tokenizer
        self.folder = folder
        dec = tokenizer.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in dec.items() if t.special)
        self._vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eop = tokenizer.token_to_id(ENDOFPROMPT_TOKEN)
        eos = tokenizer.token_to_id(EOS_TOKEN)
        if eop is None or eos is None:
            raise ConfigError(f"{folder}: tokenizer lacks {ENDOFPROMPT_TOKEN} or {EOS_TOKEN}")
        self._endofprompt_id = eop
        self._eos_id = eos

    @classmethod
    def from_dir(cls, path: Union[str, os.PathLike]) -> "CosyVoice3Tokenizer":
        """Load (once; cached by path and file times) the tokenizer of a ``CosyVoice-BlankEN`` folder."""
        folder = Path(path).expanduser().resolve()
        key = (str(folder), _stamp(folder))
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
        if hit is not None:
            return hit
        obj = cls(_build(folder), folder)
        with _CACHE_LOCK:
            for k in [k for k in _CACHE if k[0] == key[0]]:
                del _CACHE[k]
            _CACHE[key] = obj
        log.debug("loaded tokenizer from %s (%d ids)", folder, obj.vocab_size)
        return obj

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate: instances are shared by the cache)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``; special tokens are matched anywhere (never split), no BOS/EOS added."""
        if not isinstance(text, str):
            raise InputError(f"tokenizer input must be str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """``encode`` of each text."""
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise InputError(f"tokenizer input must be str, got {type(t).__name__}")
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=True)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (byte-level; invalid UTF-8 becomes U+FFFD); special tokens dropped by default."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()  # numpy / torch
        out: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self._vocab_size:
                raise InputError(f"token id {i} outside the tokenizer's range [0, {self._vocab_size})")
            out.append(i)
        return self._tok.decode(out, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        """Id of a vocabulary or added token, or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> Optional[str]:
        """Token string (byte-level form for BPE entries) of an id, or None."""
        return self._tok.id_to_token(int(idx))

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (``len(tokenizer)`` in HF; 151924 on Qwen2)."""
        return self._vocab_size

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of all special tokens (those ``decode`` skips)."""
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token string -> id."""
        dec = self._tok.get_added_tokens_decoder()
        return {dec[i].content: i for i in sorted(self._special_ids)}

    @property
    def endofprompt_id(self) -> int:
        """Id of ``<|endofprompt|>`` (151646 on a Qwen2 vocabulary)."""
        return self._endofprompt_id

    @property
    def eos_id(self) -> int:
        """Id of ``<|endoftext|>`` (151643 on a Qwen2 vocabulary)."""
        return self._eos_id

    def __len__(self) -> int:
        return self._vocab_size

    def __repr__(self) -> str:
        return f"CosyVoice3Tokenizer({str(self.folder)!r}, vocab_size={self._vocab_size})"


def nfc(text: str) -> str:
    """NFC form of ``text`` (what the tokenizer's normalizer does)."""
    return unicodedata.normalize("NFC", text)


_CACHE: dict[tuple[str, tuple], CosyVoice3Tokenizer] = {}
_CACHE_LOCK = threading.Lock()


def _stamp(folder: Path) -> tuple:
    out = []
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        try:
            st = (folder / name).stat()
            out.append((name, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((name, None, None))
    return tuple(out)


def clear_tokenizer_cache() -> None:
    """Forget every cached tokenizer."""
    with _CACHE_LOCK:
        _CACHE.clear()
