"""Text normalisation and paragraph splitting (upstream ``text_normalize`` without ttsfrd/wetext)."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cosytools.frontend.text import (EN_PUNCTUATION, ZH_PUNCTUATION, contains_chinese, is_only_punctuation,
                                     number_to_words, remove_bracket, replace_blank, replace_corner_mark,
                                     spell_out_number, split_paragraph, text_normalize)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from cosytools.frontend.bpe_writer import write_tiny_bpe
    from cosytools.frontend.tokenizer import CosyVoice3Tokenizer

    d = tmp_path_factory.mktemp("bpe")
    write_tiny_bpe(d, seed=0)
    return CosyVoice3Tokenizer.from_dir(d)


def words(s: str) -> list:
    """A cheap deterministic 'tokenizer' for splitting properties: one unit per word or mark."""
    return [w for w in s.replace(".", " . ").replace("?", " ? ").replace("!", " ! ").split()]


# ----------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("digits,expected", [
    ("0", "zero"), ("00", "zero"), ("1", "one"), ("007", "seven"), ("12", "twelve"), ("20", "twenty"),
    ("21", "twenty-one"), ("100", "one hundred"), ("105", "one hundred and five"),
    ("110", "one hundred and ten"), ("1000", "one thousand"), ("1001", "one thousand and one"),
    ("1021", "one thousand and twenty-one"), ("1100", "one thousand, one hundred"),
    ("1234", "one thousand, two hundred and thirty-four"), ("2024", "two thousand and twenty-four"),
    ("110000", "one hundred and ten thousand"), ("1000000", "one million"),
    ("1000001", "one million and one"), ("1001000", "one million, one thousand"),
    ("999999999999", "nine hundred and ninety-nine billion, nine hundred and ninety-nine million, "
                     "nine hundred and ninety-nine thousand, nine hundred and ninety-nine"),
    ("²", "zero"),  # str.isdigit accepts it, inflect strips non-Nd characters: upstream reads "zero"
    ("١٢", "twelve"),  # Arabic-Indic digits are decimal digits
])
def test_number_to_words_matches_inflect(digits, expected):
    # expectations are inflect.engine().number_to_words(digits) (checked against inflect 7.x)
    assert number_to_words(digits) == expected


def test_number_to_words_past_decillion_reads_digits():
    assert number_to_words("1" + "0" * 36) == "one " + " ".join(["zero"] * 36)


@pytest.mark.parametrize("text,expected", [
    ("I have 3 apples.", "I have three apples."),
    ("It costs $12, or 1,234 cents.", "It costs $twelve, or one,two hundred and thirty-four cents."),
    ("pi is 3.14", "pi is three.fourteen"),
    ("no digits here", "no digits here"),
])
def test_spell_out_number(text, expected):
    assert spell_out_number(text) == expected


@given(st.text(max_size=40))
def test_spell_out_number_leaves_no_digits_and_keeps_other_chars(text):
    out = spell_out_number(text)
    assert not any(c.isdigit() for c in out)
    kept = [c for c in text if not c.isdigit()]
    it = iter(out)
    assert all(c in it for c in kept)  # non-digits survive, in order


# ----------------------------------------------------------------------------- small rules

def test_small_rules():
    assert contains_chinese("hello 世界") and not contains_chinese("hello, world ～")
    assert replace_blank("中 文 a b 中") == "中文a b中"
    assert replace_corner_mark("面积5m²，体积3m³") == "面积5m平方，体积3m立方"
    assert remove_bracket("（注）【重点】`code`——完") == "注重点code 完"
    assert is_only_punctuation("") and is_only_punctuation("。！？…$+") and is_only_punctuation("...")
    assert not is_only_punctuation("a.") and not is_only_punctuation(" .")


# ----------------------------------------------------------------------------- text_normalize

def test_english_normalisation(tok):
    assert text_normalize("  I have 2 cats!  ", tok.encode) == ["I have two cats!"]
    assert text_normalize("Hello world", tok.encode) == ["Hello world."]  # final mark added
    # upstream drops a split mark that follows another one
    assert text_normalize("Really?? Yes...", tok.encode) == ["Really? Yes."]
    assert text_normalize("I have 2 cats", tok.encode, split=False) == "I have two cats"


def test_chinese_normalisation(tok):
    assert text_normalize("你好 ， 世界.今天（很）好——对吧，", tok.encode) == ["你好，世界。今天很好 对吧。"]
    assert text_normalize("面积5m²", tok.encode) == ["面积5m平方。"]  # no Chinese number reading without wetext
    assert text_normalize("他说：“你好。”然后\n走了", tok.encode) == ["他说：“你好。”然后走了。"]
    assert text_normalize("中文 a - b", tok.encode) == ["中文a，b。"]  # " - " survives only between ASCII
    assert text_normalize("一 - 二", tok.encode) == ["一-二。"]


@pytest.mark.parametrize("text", [
    "You are a helpful assistant.<|endofprompt|>I have 3 apples",
    "<|endofprompt|>  你好 ， 世界  ",
    "a<|b|>c",
])
def test_markup_passes_through_unsplit(tok, text):
    assert text_normalize(text, tok.encode) == [text]
    assert text_normalize(text, tok.encode, split=False) == text


def test_empty_and_punctuation_only(tok):
    assert text_normalize("", tok.encode) == [""]  # upstream returns the empty string itself
    assert text_normalize("   ", tok.encode) == []  # upstream raises IndexError here
    assert text_normalize("。！？", tok.encode) == []
    # upstream's punctuation test does not strip: a space before the mark keeps the piece
    # (the pipeline's Frontend.segments drops it, see test_modes)
    assert text_normalize("... !!", tok.encode) == [" !"]
    assert text_normalize("I have 2 cats", tok.encode, text_frontend=False) == ["I have 2 cats"]


def test_long_english_text_is_split_by_token_budget(tok):
    sentence = "The quick brown fox jumps over the lazy dog near the river bank today. "
    text = sentence * 12
    pieces = text_normalize(text, tok.encode)
    assert len(pieces) > 1
    assert "".join(pieces) == text.strip()
    n = [len(tok.encode(p)) for p in pieces]
    per = len(tok.encode(sentence.strip()))
    # a piece closes once it has more than 60 tokens and the next sentence would pass 80
    assert all(k > 60 or k + per <= 80 for k in n[:-1])
    assert all(k <= 80 + per for k in n)


def test_long_chinese_text_is_split_by_characters(tok):
    text = "今天天气很好，我们一起去公园散步吧。" * 10  # 18 characters per sentence
    pieces = text_normalize(text, tok.encode)
    assert "".join(pieces) == text
    assert [len(p) for p in pieces] == [72, 72, 36]  # 4 sentences (72 > 60) per piece, 2 left (36 >= 20)


def test_short_tail_merges_into_previous_piece():
    s13 = "一二三四五六七八九十一二。"  # 13 characters
    text = s13 * 13 + "好。"
    pieces = split_paragraph(text, words, "zh", token_max_n=80, token_min_n=60, merge_len=20)
    # 6 sentences (78) per piece; the tail (13 + 2 = 15 < 20) joins the last piece
    assert pieces == [s13 * 6, s13 * 7 + "好。"]
    assert split_paragraph("", words) == []


# ----------------------------------------------------------------------------- split properties

_ALPHABET = list("abc xyz 中文字，,、") + list(ZH_PUNCTUATION) + list(EN_PUNCTUATION) + ['"', "”", "\n"]
_texts = st.text(alphabet=st.sampled_from(_ALPHABET), min_size=1, max_size=200)
_budgets = st.tuples(st.integers(1, 40), st.integers(0, 40), st.integers(0, 20))


def _nonspace(s: str) -> str:
    return "".join(c for c in s if not c.isspace())


def _expected(text: str, lang: str) -> str:
    marks = ZH_PUNCTUATION if lang == "zh" else EN_PUNCTUATION
    return text if text[-1] in marks else text + ("。" if lang == "zh" else ".")


@given(_texts, st.sampled_from(["zh", "en"]), _budgets)
def test_lossless_split_keeps_every_nonspace_character_in_order(text, lang, budget):
    pieces = split_paragraph(text, words, lang, *budget, lossless=True)
    assert _nonspace("".join(pieces)) == _nonspace(_expected(text, lang))


@given(_texts, st.sampled_from(["zh", "en"]), _budgets)
def test_upstream_split_only_drops_repeated_split_marks(text, lang, budget):
    marks = set(ZH_PUNCTUATION if lang == "zh" else EN_PUNCTUATION)
    pieces = split_paragraph(text, words, lang, *budget)
    out, ref = _nonspace("".join(pieces)), _nonspace(_expected(text, lang))
    # out is ref with some split marks removed: walk both, skipping only marks in ref
    i = 0
    for c in ref:
        if i < len(out) and out[i] == c:
            i += 1
        else:
            assert c in marks, (c, ref, out)
    assert i == len(out)
    assert all(p for p in pieces)


@given(st.text(alphabet=st.sampled_from(list("abc xyz. ?!;:\"'-,")), min_size=1, max_size=300))
def test_normalised_english_split_is_lossless_on_normalised_text(text):
    # the splitter applied to already-normalised text (no digits): lossless mode keeps every character
    normalised = spell_out_number(text.strip())
    if not normalised:
        return
    pieces = split_paragraph(normalised, words, "en", lossless=True)
    assert _nonspace("".join(pieces)) == _nonspace(_expected(normalised, "en"))
    assert "".join(pieces).startswith(normalised)


@given(st.text(max_size=60))
def test_markup_check_is_upstreams(text):
    t = f"<|{text}|>"
    assert text_normalize(t, words) == [t]
