"""Tags as text: which values of a metadata ``tags`` field are tags, and the one form of each.

Torch-free, so that `dataset_tools vocab` (which must count tags as training ids them) shares
these two rules with the trainer instead of a copy that drifted: the copy lower-cased and
stripped while training came to apply Unicode normalisation and collapse inner whitespace.
"""

from __future__ import annotations

import ast
import functools
import html
import json
import re
import sys
import unicodedata


def tag_values(value) -> list[str]:
    """The tags of a metadata ``tags`` value: a list's strings (and numbers, as text: a scraper may
    write the tag "2024" as 2024; a lone number is one tag), or a joined string's parts (some
    metadata sources keep tags as one string), blanks left out. Training's tag positives,
    the validation tag metrics, captions' ``{tags}`` and `dataset_tools vocab` all read tags
    through this, so they agree (a string was iterated character by character: a vocabulary of
    letters; a number was dropped from the tags but rendered in captions, blanks too).

    Read as `dataset_tools build` reads a tags column (``youtube.parse_tags``; both take the items
    from :func:`tag_items`), so shards made with plain img2dataset train on the tags a built shard
    holds: a string is split on ``|`` when it holds one (Kaggle's ``tag|"tag two"``; it was one tag
    "tag|tag two"), else on ``,``; Kaggle's ``[none]`` is no tags; each tag has its HTML entities
    decoded (:func:`unescape_entities`), then surrounding quotes stripped (``&quot;tag&quot;`` is
    "tag"). A string that spells a list (``'["a", "b"]'``, ``"['a', 'b']"``: pandas' CSV form of a
    list column) is that list (:func:`tag_string_parts`)."""
    tags = (read_tag(t) for t in tag_items(value)[0])
    return [t for t in tags if t is not None]


def read_tag(item) -> str | None:
    """One item of a tags field as training reads it: HTML entities decoded, invisible format
    characters (:func:`without_invisible_format`) and surrounding quotes stripped; None when it is no
    tag (not text, or blank or invisible once read). `dataset_tools build` writes a tag so
    (``youtube.parse_tags``), so a built shard holds the tags training reads from its input."""
    tag = _as_tag(item)
    return tag if tag is not None and _is_tag(tag) else None


def _is_tag(text: str) -> bool:
    """Whether ``text`` has a normal form, so an id: a tag of invisible characters only (a lone
    zero-width space) was a real tag, one id shared by unrelated samples as tag positives."""
    if text.isascii():  # the common case, checked in C: a printable character makes a form
        return _ASCII_VISIBLE.search(text) is not None
    return bool(normalize_tag(text))


def tag_items(value) -> tuple[list[str], int]:
    """(the tag texts of a ``tags`` value as written, how many of its items are no tag): the one
    reading of the field that training (:func:`tag_values`) and `dataset_tools build`
    (``youtube.parse_tags``) share, each then cleaning the texts its own way.

    A list's items (or a string's parts, :func:`tag_string_parts`) are tags when they are text or
    an integer (an integral float: 2024.0 is what pandas makes of 2024); a null or NaN is a missing
    item, left out as a missing field is. Any other item is no tag and is counted: true/false, a
    fraction (1.5), Infinity, a nested list or an object. They were written as the tags "True",
    "1.5", "['a', 'b']" by the build and left out by training, and a string spelling such a list
    (``'["a", ["b"]]'``) was split on its commas into the tags '["a"' and '["b"]]'. A lone value
    is one item (a column whose rows are all numbers); a parquet array is its list."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()  # a numpy array (a parquet list column) or a numpy scalar
    if isinstance(value, str):
        return _string_items(value)
    if not isinstance(value, (list, tuple)):
        value = [value]
    return _item_texts(value)


def _item_texts(items) -> tuple[list[str], int]:
    texts = [_as_text(item) for item in items if not _is_missing(item)]
    return [t for t in texts if t is not None], texts.count(None)


def _is_missing(item) -> bool:
    return item is None or (isinstance(item, float) and item != item)


# Whole tag strings that mean "no tags" (Kaggle writes [none]), as `dataset_tools build` reads them.
_NO_TAGS = frozenset({"", "[none]", "none", "nan", "[]"})


def tag_string_parts(value: str) -> list[str]:
    """The parts of a tags string as written, before each is read as a tag: the items of a list it
    spells as JSON or as a Python literal (pandas writes a list column to CSV as ``['a', 'b']``, as
    many Kaggle YouTube datasets ship; ``youtube.parse_tags`` reads it so: it was the two tags
    "['a" and "b']"), numbers as text, items that are no tag left out (:func:`tag_items`); the
    items of an unquoted list (``[music, live]``, as R and JavaScript print a list;
    :func:`_unquoted_list`); else its ``|``-joined parts when it holds a ``|``, else its
    ``,``-joined parts, brackets kept; none for a string that means no tags (``[none]``). A whole
    string that parses as a list is a list, or one bracketed list with no brackets inside:
    ``[remix] best of [live]`` is one tag as written, ``[MV]|BTS|Dynamite [MV]`` three."""
    return _string_items(value)[0]


def _string_items(value: str) -> tuple[list[str], int]:
    text = value.strip()
    if text.lower() in _NO_TAGS:
        return [], 0
    listed = _spelled_list(text)
    if listed is not None:
        return _item_texts(listed)
    listed = _unquoted_list(text)
    if listed is not None:
        return listed, 0
    return (text.split("|") if "|" in text else text.split(",")), 0


def _unquoted_list(text: str) -> list[str] | None:
    """The ``,``-joined items inside ``[...]`` when no item holds a bracket or a ``|`` (R and
    JavaScript print a list of strings unquoted: ``[music, live]`` was the tags "[music" and
    "live]"); None for other text. A bracket inside means bracketed words (``[remix] best of
    [live]``), and a ``|`` Kaggle's joined form whose first tag starts with "[" (``[MV]|BTS``)."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    inner = text[1:-1]
    if any(c in inner for c in "[]|"):
        return None
    return inner.split(",")


def _spelled_list(text: str) -> list | None:
    """The items of the list ``text`` spells as JSON, else as a Python literal (:func:`_python_list`);
    None when it spells none."""
    if not (text.startswith("[") and text.endswith("]")):
        return None
    try:
        items = json.loads(text)
    except (ValueError, RecursionError, MemoryError):
        items = _python_list(text)
    return items if isinstance(items, list) else None


# The names pandas and numpy print for a missing value inside a list: ``['a', nan]``.
_MISSING_NAMES = frozenset({"nan", "NaN"})


def _python_list(text: str) -> list | None:
    """The items of the Python list literal ``text``, a bare ``nan`` as a missing item (pandas writes
    a list holding NaN so, which ``ast.literal_eval`` refuses: its tags were read as an unquoted
    list, "nan" one of them); None when ``text`` is no list literal."""
    try:
        node = ast.parse(text, mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(node, ast.List):
        return None
    items = []
    for element in node.elts:
        if isinstance(element, ast.Name) and element.id in _MISSING_NAMES:
            items.append(None)
            continue
        try:
            items.append(ast.literal_eval(element))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None  # a name or an expression: no literal, maybe an unquoted list
    return items


def _as_tag(value) -> str | None:
    text = _as_text(value)
    if text is None:
        return None
    # Decoded first: "&#8203;" is a zero-width space too.
    text = without_invisible_format(unescape_entities(text))
    quoted = text.strip()
    unquoted = quoted.strip("\"'")
    # Unquoted tags keep their surrounding whitespace as the field has it (captions and
    # normalize_tag strip it; the validation stream's tag lists show it).
    return text if unquoted == quoted else without_invisible_format(unquoted.strip())


def unescape_entities(text: str) -> str:
    """``text`` with its HTML entities decoded, as `dataset_tools build` decodes titles and tags
    (``youtube.clean_title``): the YouTube Data API HTML-escapes titles ("Tom &amp; Jerry",
    "It&#39;s"), and plain img2dataset writes them as they come. Decoded until nothing changes, at
    most 3 times (some dumps are escaped twice, ``&amp;amp;``), so text the dataset tools already
    decoded is left as it is."""
    for _ in range(3):
        if "&" not in text:
            break
        decoded = html.unescape(text)
        if decoded == text:
            break
        text = decoded
    return text


def _as_text(tag) -> str | None:
    if isinstance(tag, str):
        return tag
    if isinstance(tag, int) and not isinstance(tag, bool):
        return str(tag)
    if isinstance(tag, float) and tag.is_integer():
        return str(int(tag))
    return None


def normalize_tag(tag: str) -> str:
    """The one form of a tag that training ids, the tag metrics, zero-shot tag classes and the
    dataset tools' vocabulary all use.

    Two spellings of one tag are one tag: Unicode compatibility forms (NFKC: full-width "ＧＴＡ５",
    which Japanese tag lists use, is "gta5"; the ligature "ﬁ" is "fi"; "café" composed or
    decomposed, as macOS file names and some scrapers write it, is one form) and case folded, not
    only lower-cased ("Straße" and "STRASSE" are "strasse": lower-casing kept "straße" and
    "strasse" apart, two ids, two tag-metric columns, two zero-shot classes of one tag).
    Whitespace runs count as one space ("lets  play" is "lets play"), leading and trailing none.
    Invisible format characters are no part of a tag (:func:`without_invisible_format`: "music\\u200b"
    and "\\ufeffmusic" are "music"), and a tag of them alone, or of blank-looking characters alone
    (:func:`has_visible_text`: a Hangul filler), has the empty form, no tag (:func:`tag_values`
    leaves it out).

    The form is also the text of the tag's prompts, so it stays readable: a word-final Greek
    sigma stays "ς" (case folding writes "σ", a spelling Greek text never has; lower-casing
    already makes "ΟΔΟΣ" and "οδος" one tag)."""
    text = without_invisible_format(without_lone_surrogates(tag))
    text = unicodedata.normalize("NFKC", text).lower()
    folded = "".join(c if c == _FINAL_SIGMA else c.casefold() for c in text)
    form = " ".join(unicodedata.normalize("NFKC", folded).split())  # folding may un-normalise
    return form if has_visible_text(form) else ""


_FINAL_SIGMA = "\u03c2"

# Format characters (category Cf) that carry meaning where they stand, so are kept inside a tag:
# ZWNJ and ZWJ (Persian spelling needs ZWNJ inside words; Indic scripts pick letter forms by both;
# emoji sequences such as man-ZWJ-woman-ZWJ-girl, a family, are joined by ZWJ: stripped, distinct
# tags merged), the tag characters of subdivision flags (black flag + U+E0067... is the Scottish
# flag) and the prepended concatenation marks, which are visible (the Arabic number sign U+0600).
_JOINERS = "\u200c\u200d"
_PREPENDED_MARKS = "\u0600\u0601\u0602\u0603\u0604\u0605\u06dd\u070f\u0890\u0891\u08e2\U000110bd\U000110cd"
_MEANINGFUL_FORMAT = frozenset(_JOINERS + _PREPENDED_MARKS) | frozenset(map(chr, range(0xE0020, 0xE0080)))
# A joiner that joins nothing: at an end of the text or beside whitespace. The pattern is also the
# preset tokenizer's (Oniguruma reads it as Python's re does), so captions lose what tags lose.
STRAY_JOINERS_PATTERN = rf"(?<!\S)[{_JOINERS}]+|[{_JOINERS}]+(?!\S)"
_STRAY_JOINERS = re.compile(STRAY_JOINERS_PATTERN)


def is_invisible_format(char: str) -> bool:
    """Whether ``char`` is an invisible format character that text loses (:func:`without_invisible_format`):
    category Cf, but for the ones that carry meaning where they stand (``_MEANINGFUL_FORMAT``). The one
    definition tags (`dataset_tools build`, training, vocab) and the preset tokenizer's captions use."""
    return char not in _MEANINGFUL_FORMAT and unicodedata.category(char) == "Cf"


@functools.cache
def invisible_format_pattern() -> str:
    """A regex character class of every :func:`is_invisible_format` character (as ranges of literal
    characters, read alike by Python's re and the tokenizers' Oniguruma), for the preset tokenizer:
    its own ``\\p{Cf}`` would follow another Unicode version than ``unicodedata``'s."""
    ranges: list[list[int]] = []
    for code in range(sys.maxunicode + 1):
        if is_invisible_format(chr(code)):
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1][1] = code
            else:
                ranges.append([code, code])
    return "[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


def without_invisible_format(text: str) -> str:
    """``text`` without its invisible format characters (Unicode category Cf: zero-width space, word
    joiner, byte order mark, soft hyphen, left-to-right and other bidi marks), which ride along with
    tags copied from web pages and spreadsheets: "music\\u200b" and "\\ufeffmusic" were tags apart from
    "music" in the vocabulary, the ids and the tag metrics. The format characters that carry meaning
    inside a word (``_MEANINGFUL_FORMAT``: ZWNJ, ZWJ, flag tag characters) are kept there, a joiner
    only between two visible characters (at an end or beside a space it joins nothing)."""
    if text.isascii():  # the common case, checked in C: no format character possible
        return text
    kept = "".join(c for c in text if not is_invisible_format(c))
    return _STRAY_JOINERS.sub("", kept)


# Blank-looking letters and symbols: YouTube titles and tags use them to look empty (the Hangul
# fillers U+115F, U+1160, U+3164, U+FFA0, the braille blank, the combining grapheme joiner); the
# categories below cover the zero-width, format, control and space characters.
BLANK_CHARS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f")
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zs", "Zl", "Zp"})
_ASCII_VISIBLE = re.compile("[!-~]")  # the printable ASCII characters but the space


def has_visible_text(text: str) -> bool:
    """Whether ``text`` holds a character that is not whitespace, a control or format character, or
    blank-looking (``BLANK_CHARS``): the one rule for an empty caption (``captions``) and for a tag
    that is no tag (:func:`normalize_tag`). A tag of a Hangul filler alone was a tag id, rendered
    into captions, while a caption of it alone was skipped as empty.

    ``str.strip`` keeps zero-width spaces, word joiners, a BOM and soft hyphens: a caption of only
    those passed as text, and the tokenizer made of it no text at all (CLIP's: bos + eos).
    """
    if text.isascii():  # the common case, checked in C
        return _ASCII_VISIBLE.search(text) is not None
    return any(
        not c.isspace() and c not in BLANK_CHARS and unicodedata.category(c) not in _INVISIBLE_CATEGORIES
        for c in text
    )


_SURROGATE = re.compile("[\ud800-\udfff]")


def without_lone_surrogates(text: str) -> str:
    """``text`` with each lone UTF-16 surrogate as U+FFFD (the form `dataset_tools` writes), a
    surrogate pair as the character it encodes; other text is returned as is.

    JSON may escape half of an emoji (``"\\ud83d"``: a title cut mid-emoji in UTF-16, as the YouTube
    API and img2dataset's ``json.dumps`` leave it), and ``json.loads`` keeps it as a code point that
    no UTF-8 text holds: the tokenizer, its training and a tag's id hash all failed on it with a
    traceback, one such title stopping the whole run."""
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
