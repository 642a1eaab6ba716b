"""Text normalisation and paragraph splitting, as upstream CosyVoice's ``text_normalize`` does
when neither of its optional engines (``ttsfrd``, ``wetext``) is installed.

What :func:`text_normalize` does, in upstream's order:

* text containing both ``<|`` and ``|>`` (CosyVoice3 markup such as ``<|endofprompt|>``) is
  passed through untouched and unsplit, as is the empty string;
* otherwise the text is stripped, then
  - **Chinese** (any CJK ideograph U+4E00..U+9FFF): newlines removed, blanks between non-ASCII
    characters removed (:func:`replace_blank`), ``²``/``³`` spelled (:func:`replace_corner_mark`),
    ``.`` -> ``。``, `` - `` -> ``，``, brackets removed (:func:`remove_bracket`), a trailing run
    of ``，,、`` -> ``。``, then split by character count;
  - **English** (everything else): runs of digits spelled out (:func:`spell_out_number`, the words
    of ``inflect``'s ``number_to_words``), then split by tokenizer token count;
* pieces that are only punctuation/symbols are dropped.

The helpers are reimplementations of ``cosyvoice/utils/frontend_utils.py``; where upstream
crashes (text that is only whitespace, a closing quote right after a leading punctuation mark,
numbers over 36 digits) these return something sensible instead -- see each docstring.
"""
from __future__ import annotations

import re
import unicodedata
from typing import Callable, List, Sequence, Union

__all__ = [
    "contains_chinese",
    "replace_corner_mark",
    "remove_bracket",
    "replace_blank",
    "number_to_words",
    "spell_out_number",
    "split_paragraph",
    "is_only_punctuation",
    "has_markup",
    "text_normalize",
    "TOKEN_MAX_N",
    "TOKEN_MIN_N",
    "MERGE_LEN",
    "ZH_PUNCTUATION",
    "EN_PUNCTUATION",
]

Tokenize = Callable[[str], Sequence[int]]

#: upstream ``text_normalize``'s split budget
TOKEN_MAX_N = 80
TOKEN_MIN_N = 60
MERGE_LEN = 20

#: sentence-final marks ``split_paragraph`` splits after (upstream's lists, in upstream's order)
ZH_PUNCTUATION = ("。", "？", "！", "；", "：", "、", ".", "?", "!", ";")
EN_PUNCTUATION = (".", "?", "!", ";", ":")
_COMMAS = ("，", ",")
_CLOSING_QUOTES = ('"', "”")

_CHINESE = re.compile(r"[\u4e00-\u9fff]+")
_TRAILING_COMMAS = re.compile(r"[，,、]+$")


# --------------------------------------------------------------------------- small rules

def contains_chinese(text: str) -> bool:
    """True when ``text`` has a CJK unified ideograph (U+4E00..U+9FFF), upstream's language test."""
    return bool(_CHINESE.search(text))


def replace_corner_mark(text: str) -> str:
    """``²`` -> ``平方``, ``³`` -> ``立方`` (Chinese path only)."""
    return text.replace("²", "平方").replace("³", "立方")


def remove_bracket(text: str) -> str:
    """Drop full-width parentheses, lenticular brackets and backticks; ``——`` -> a space."""
    for ch in ("（", "）", "【", "】", "`"):
        text = text.replace(ch, "")
    return text.replace("——", " ")


def replace_blank(text: str) -> str:
    """Remove every space that does not sit between two non-space ASCII characters
    (so ``"中 文"`` -> ``"中文"`` while ``"a b"`` keeps its space).

    Upstream indexes ``text[i + 1]`` unguarded (a trailing space raises IndexError) and reads
    ``text[-1]`` for a leading space; here a missing neighbour counts as non-ASCII (space dropped),
    and a leading space looks at the last character like upstream does.
    """
    out = []
    n = len(text)
    for i, c in enumerate(text):
        if c == " ":
            nxt = text[i + 1] if i + 1 < n else ""
            prv = text[i - 1] if n else ""  # i == 0 reads text[-1], as upstream
            if nxt and nxt.isascii() and nxt != " " and prv.isascii() and prv != " ":
                out.append(c)
        else:
            out.append(c)
    return "".join(out)


def is_only_punctuation(text: str) -> bool:
    """True for the empty string and for text made only of Unicode punctuation (P*) and symbols (S*)
    (upstream: ``regex.fullmatch(r'^[\\p{P}\\p{S}]*$', text)``); whitespace is neither."""
    return all(unicodedata.category(c)[0] in "PS" for c in text)


def has_markup(text: str) -> bool:
    """Upstream's test for CosyVoice markup (``<|...|>`` tokens), which turns normalisation off."""
    return "<|" in text and "|>" in text


# --------------------------------------------------------------------------- numbers

_UNITS = ("", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
          "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
_SCALES = ("", "thousand", "million", "billion", "trillion", "quadrillion", "quintillion", "sextillion",
           "septillion", "octillion", "nonillion", "decillion")


def _tens_words(t: int, u: int) -> str:
    if t == 1:
        return _TEENS[u]
    return _TENS[t] + ("-" if t and u else "") + _UNITS[u]


def _group_words(h: int, t: int, u: int) -> str:
    if h:
        rest = _tens_words(t, u)
        return f"{_UNITS[h]} hundred" + (f" and {rest}" if rest else "")
    return _tens_words(t, u)


def number_to_words(digits: str) -> str:
    """English words of a run of digits, equal to ``inflect.engine().number_to_words(digits)``
    for the strings :func:`spell_out_number` passes it (British style: ``"one hundred and five"``,
    ``"one thousand, two hundred and thirty-four"``, ``"one million and one"``; leading zeros are
    ignored, ``"0"``/``"00"`` -> ``"zero"``).

    Characters that are not decimal digits (Unicode Nd) are ignored as inflect ignores them, so a
    lone ``"²"`` (which ``str.isdigit`` accepts) reads ``"zero"`` -- upstream's behaviour. Runs longer
    than 36 digits (past "decillion", where inflect raises) are read digit by digit.
    """
    vals = [unicodedata.decimal(c) for c in digits if unicodedata.category(c) == "Nd"]
    while vals and vals[0] == 0:
        vals.pop(0)
    if not vals:
        return "zero"
    if len(vals) > 3 * len(_SCALES):
        return " ".join("zero" if v == 0 else _UNITS[v] for v in vals)
    # three-digit groups from the right; the leftmost may be shorter
    groups: List[List[int]] = []
    while vals:
        groups.insert(0, vals[-3:])
        vals = vals[:-3]
    phrases: List[str] = []
    for k, g in zip(range(len(groups) - 1, -1, -1), groups):
        g = [0] * (3 - len(g)) + g
        words = _group_words(*g)
        if not words:
            continue
        phrases.append(words + (f" {_SCALES[k]}" if k else ""))
        last_is_units_group = k == 0
    # inflect joins the groups with ", " and turns a final ", X" into " and X" when X is one word
    if len(phrases) > 1 and last_is_units_group and " " not in phrases[-1]:
        return ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return ", ".join(phrases)


def spell_out_number(text: str) -> str:
    """Replace every run of ``str.isdigit`` characters by :func:`number_to_words` of it
    (``"3.5"`` -> ``"three.five"``, ``"$12"`` -> ``"$twelve"``: upstream reads digits only)."""
    out: List[str] = []
    start = None
    for i, c in enumerate(text):
        if c.isdigit():
            if start is None:
                start = i
            continue
        if start is not None:
            out.append(number_to_words(text[start:i]))
            start = None
        out.append(c)
    if start is not None:
        out.append(number_to_words(text[start:]))
    return "".join(out)


# --------------------------------------------------------------------------- splitting

def split_paragraph(text: str, tokenize: Tokenize, lang: str = "zh", token_max_n: int = TOKEN_MAX_N,
                    token_min_n: int = TOKEN_MIN_N, merge_len: int = MERGE_LEN, comma_split: bool = False,
                    lossless: bool = False) -> List[str]:
    """Split ``text`` into sentences after sentence-final punctuation, then greedily merge them into
    pieces of at most ``token_max_n`` units once a piece has more than ``token_min_n``; a last piece
    shorter than ``merge_len`` joins the previous one. Units are characters for ``lang="zh"`` and
    ``len(tokenize(piece))`` otherwise. A final ``。``/``.`` is appended when the text does not end
    with a split mark; a closing quote right after a mark stays with its sentence.

    ``lossless=False`` is upstream exactly: a split mark directly after another one (``"!!"``,
    ``"..."``) is dropped, so the concatenated pieces can miss those punctuation characters.
    ``lossless=True`` keeps them on the preceding sentence, so the pieces concatenate to the input
    (plus the appended final mark). Both return ``[]`` for an empty text (upstream raises).
    """
    if not text:
        return []
    marks = list(ZH_PUNCTUATION if lang == "zh" else EN_PUNCTUATION)
    if comma_split:
        marks.extend(_COMMAS)
    markset = set(marks)

    def units(s: str) -> int:
        return len(s) if lang == "zh" else len(tokenize(s))

    if text[-1] not in markset:
        text += "。" if lang == "zh" else "."

    utts: List[str] = []
    st = 0
    n = len(text)
    for i, c in enumerate(text):
        if c not in markset:
            continue
        if i > st:
            utts.append(text[st:i] + c)
        elif lossless:
            if utts:
                utts[-1] += c
            else:
                utts.append(c)
        if i + 1 < n and text[i + 1] in _CLOSING_QUOTES:
            if utts:
                utts[-1] += text[i + 1]
                st = i + 2
            else:  # upstream pops from an empty list here; keep the quote for the next sentence
                st = i + 1
        else:
            st = i + 1

    pieces: List[str] = []
    cur = ""
    for utt in utts:
        if units(cur + utt) > token_max_n and units(cur) > token_min_n:
            pieces.append(cur)
            cur = ""
        cur += utt
    if cur:
        if pieces and units(cur) < merge_len:
            pieces[-1] += cur
        else:
            pieces.append(cur)
    return pieces


# --------------------------------------------------------------------------- the whole thing

def text_normalize(text: str, tokenize: Tokenize, split: bool = True, text_frontend: bool = True,
                   lossless: bool = False) -> Union[List[str], str]:
    """Upstream ``CosyVoiceFrontEnd.text_normalize`` without ttsfrd/wetext.

    Returns the list of pieces to synthesise (``split=True``) or the normalised text
    (``split=False``). Markup text (``<|`` and ``|>``), ``text_frontend=False`` and ``""`` come
    back unchanged (``[text]`` when splitting). ``tokenize`` counts tokens for English splitting
    (upstream passes the CosyVoice3 tokenizer's ``encode``). ``lossless`` is passed to
    :func:`split_paragraph`.
    """
    if has_markup(text):
        text_frontend = False
    if not text_frontend or text == "":
        return [text] if split else text
    text = text.strip()
    if contains_chinese(text):
        text = text.replace("\n", "")
        text = replace_blank(text)
        text = replace_corner_mark(text)
        text = text.replace(".", "。")
        text = text.replace(" - ", "，")
        text = remove_bracket(text)
        text = _TRAILING_COMMAS.sub("。", text)
        lang = "zh"
    else:
        text = spell_out_number(text)
        lang = "en"
    if not split:
        return text
    pieces = split_paragraph(text, tokenize, lang, token_max_n=TOKEN_MAX_N, token_min_n=TOKEN_MIN_N,
                             merge_len=MERGE_LEN, comma_split=False, lossless=lossless)
    return [p for p in pieces if not is_only_punctuation(p)]
