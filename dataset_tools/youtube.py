"""YouTube facts: video-id normalisation, thumbnail URLs, tag/title cleaning, category names.

Everything here is pure (no I/O) so the metadata readers and the tests can share it.
"""

from __future__ import annotations

import math
import re
import unicodedata
from urllib.parse import parse_qs, urlparse

from vutrain.tag_text import read_tag, tag_items, unescape_entities

# Always used with fullmatch: ``$`` alone also matches before a trailing newline, which let an id
# with a "\n" (``watch?v=...%0A``) through.
VIDEO_ID_RE = re.compile(r"[A-Za-z0-9_-]{11}")
_LONE_SURROGATE_RE = re.compile("[\ud800-\udfff]")
# C0/C1 control characters that str.split() does not count as whitespace (NUL, BEL, ESC, DEL...).
_CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")
DEFAULT_URL_TEMPLATE = "https://i.ytimg.com/vi/{video_id}/{variant}.jpg"
DEFAULT_VARIANTS = ("maxresdefault", "sddefault", "hqdefault", "mqdefault")
# YouTube answers a missing thumbnail variant with this grey "TV" image (often with status 404).
PLACEHOLDER_SIZE = (120, 90)
# Variants that are 120x90 by nature (the default thumbnail and the three video frames): at that
# size they are real images, not the grey placeholder every other variant would be.
NATIVE_120X90_VARIANTS = frozenset({"default", "1", "2", "3"})
# The largest id the plan's int32 category column holds (real ones are below 100).
_MAX_CATEGORY_ID = 2**31 - 1

# YouTube Data API videoCategories (regionCode=US). Ids are global; a few names vary by region,
# which is why a Kaggle ``*_category_id.json`` next to the input wins over this table.
CATEGORY_NAMES = {
    1: "Film & Animation",
    2: "Autos & Vehicles",
    10: "Music",
    15: "Pets & Animals",
    17: "Sports",
    18: "Short Movies",
    19: "Travel & Events",
    20: "Gaming",
    21: "Videoblogging",
    22: "People & Blogs",
    23: "Comedy",
    24: "Entertainment",
    25: "News & Politics",
    26: "Howto & Style",
    27: "Education",
    28: "Science & Technology",
    29: "Nonprofits & Activism",
    30: "Movies",
    31: "Anime/Animation",
    32: "Action/Adventure",
    33: "Classics",
    34: "Comedy",
    35: "Documentary",
    36: "Drama",
    37: "Family",
    38: "Foreign",
    39: "Horror",
    40: "Sci-Fi/Fantasy",
    41: "Thriller",
    42: "Shorts",
    43: "Shows",
    44: "Trailers",
}
_NAME_TO_ID = {}
for _cid, _name in sorted(CATEGORY_NAMES.items(), reverse=True):
    _NAME_TO_ID[_name.lower()] = _cid  # "Comedy" maps to 23 (the assignable one), not 34

_YOUTUBE_HOSTS = ("youtube.com", "youtube-nocookie.com")
_PATH_ID_PREFIXES = ("shorts", "embed", "v", "e", "live")
# Embed paths that name no video yet have the shape of an id: ``embed/videoseries?list=PL...``
# (a playlist) and ``embed/live_stream?channel=UC...`` (a channel's live stream). Taken as ids,
# every such row collapsed into one bogus "video" instead of being rejected.
_PSEUDO_IDS = frozenset({"videoseries", "live_stream"})


def normalize_video_id(value: object) -> str | None:
    """Return the 11-character video id in ``value`` (an id or any YouTube URL form), else None.

    Accepts ``watch?v=``, ``youtu.be/``, ``shorts/``, ``embed/``, ``v/``, ``live/`` URLs with
    extra query parameters, with or without scheme, ``www.``/``m.``/``music.`` hosts.
    Ids are case-sensitive and may start with ``-``; they are never lower-cased.
    """
    if value is None:
        return None
    text = _strip_invisible(str(value))
    if VIDEO_ID_RE.fullmatch(text):
        return text
    if not text or " " in text:
        return None
    if text.startswith("//"):
        text = "https:" + text  # protocol-relative, as in an <iframe src="//www.youtube.com/...">
    elif "://" not in text:
        text = "https://" + text
    try:
        parsed = urlparse(text)
    except ValueError:
        return None
    host = (parsed.hostname or "").lower()
    parts = [p for p in parsed.path.split("/") if p]
    query = parse_qs(parsed.query)
    if host == "youtu.be" or host.endswith(".youtu.be"):
        return _id_before_separator(parts[0] if parts else None)
    if not any(host == h or host.endswith("." + h) for h in _YOUTUBE_HOSTS):
        return None
    if parts and parts[0] == "attribution_link" and query.get("u"):
        # A shared link wrapping the video's own path: ``attribution_link?u=/watch%3Fv%3DID``.
        wrapped = query["u"][0]
        return normalize_video_id("https://www.youtube.com" + wrapped if wrapped.startswith("/") else wrapped)
    # ``watch/ID`` is what some apps share instead of ``watch?v=ID``.
    in_path = len(parts) >= 2 and parts[0] in (*_PATH_ID_PREFIXES, "watch")
    path_id = _id_before_separator(parts[1]) if in_path else None
    query_id = _id_before_separator(query["v"][0]) if "v" in query else None
    if parts and parts[0] == "watch":
        return query_id or path_id
    return path_id or query_id


def _strip_invisible(text: str) -> str:
    """``text`` without surrounding whitespace and without format characters anywhere (zero-width
    space, word joiner, byte order mark, soft hyphen): copied from a web page they ride along with
    an id or URL, and the row was rejected as "invalid video id". No id or URL holds one, so ZWNJ and
    ZWJ go too (text keeps them between letters: ``tag_text.is_invisible_format``)."""
    if text.isascii():  # the common case, checked in C: no format character possible
        return text.strip()
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf").strip()


# An id followed by parameters joined with the wrong separator: the old Flash embed form
# ``/v/ID&hl=en&fs=1``, ``embed/ID&autoplay=1``, ``watch?v=ID?t=42``. These rows were rejected.
_ID_THEN_PARAMS_RE = re.compile(r"([A-Za-z0-9_-]{11})(?:[&?;].*)?", re.DOTALL)


def _id_before_separator(candidate: str | None) -> str | None:
    """The 11-character id that ``candidate`` (taken from a URL) is or starts with before a
    ``&``/``?``/``;``; None for a playlist or live-stream pseudo id (``embed/videoseries&list=``)."""
    match = _ID_THEN_PARAMS_RE.fullmatch(candidate) if candidate else None
    if match is None or match.group(1) in _PSEUDO_IDS:
        return None
    return match.group(1)


def thumbnail_url(video_id: str, variant: str, template: str = DEFAULT_URL_TEMPLATE) -> str:
    """The URL of one thumbnail variant, e.g. ``.../vi/<id>/hqdefault.jpg``."""
    return template.format(video_id=video_id, variant=variant)


def clean_title(value: object) -> str:
    """Unescape HTML entities (Kaggle titles carry ``&amp;``, ``&#39;``), NFC-normalise and
    collapse whitespace (newlines, tabs, non-breaking spaces) to single spaces."""
    if value is None:
        return ""
    # Some dumps are double-escaped (``&amp;amp;``): decoded until stable, at most 3 times, by the
    # trainer's own rule, so a built shard's text and a plain img2dataset shard's read alike.
    text = unescape_entities(str(value))
    # A lone UTF-16 surrogate ("\ud83d": JSON from a scraper that cut an emoji in half) cannot
    # be written as UTF-8: the plan's parquet stopped the build on it.
    text = _LONE_SURROGATE_RE.sub("\ufffd", text)
    text = unicodedata.normalize("NFC", text)
    # A control character is no text: a NUL or an ESC kept in a caption reaches the tokenizer
    # and the .txt members; it separates words like the whitespace around it.
    text = _CONTROL_RE.sub(" ", text)
    return " ".join(text.split())


def parse_tags(value: object) -> list[str]:
    """Tags as a list: Kaggle's ``tag|"tag two"|"tag3"`` strings (``[none]`` = no tags), strings
    joined with ``,`` when they hold no ``|``, JSON lists, Python lists. Entities unescaped, then
    quotes stripped (as the trainer's ``tag_text.tag_values`` reads a tag: ``&quot;tag&quot;`` was
    kept as ``"tag"``), empties and exact repeats dropped. The items are those the trainer reads
    (``tag_text.tag_items``), so a plain img2dataset shard trains on the tags a built one holds:
    ``[remix] best of [live]`` was written as the tag "remix] best of [live"; items that are no tag
    (true, 1.5, a nested list) were written as the tags "True", "1.5", "['a', 'b']", and a number
    (2024.0 as "2024") as the trainer reads it.

    Each item is then read as the trainer reads a tag (``tag_text.read_tag``): invisible format
    characters (zero-width space, BOM, soft hyphen, bidi marks; ZWNJ and ZWJ kept between letters)
    are no part of it, and an item of them alone is no tag, left out as a blank one is. The shards
    held "cats\\u200b" and a tag "\\u200b" where training reads "cats" and no tag."""
    return read_tags(tag_items(value)[0])[0]


def read_tags(items: list[str]) -> tuple[list[str], int]:
    """(the tags of ``tag_items``' texts as :func:`parse_tags` writes them, how many of the texts
    are blank or invisible once read: ``""``, ``" "``, ``"\u200b"``, ``"&#8203;"``). The reader of
    a build counts those, so no text of a tags field is left out without a word."""
    tags: list[str] = []
    seen = set()
    blank = 0
    for item in items:
        tag = read_tag(clean_title(item))
        # Removing a format character can leave two spaces side by side ("a \u200b b").
        tag = " ".join(tag.split()) if tag is not None else ""
        blank += not tag
        if tag and tag not in seen:
            seen.add(tag)
            tags.append(tag)
    return tags, blank


def category_name(category_id: int | None, table: dict | None = None) -> str | None:
    """Name of a category id from ``table`` (e.g. a Kaggle category json) or the built-in table."""
    if category_id is None:
        return None
    if table and category_id in table:
        return table[category_id]
    return CATEGORY_NAMES.get(category_id)


def category_id_from_name(name: str | None) -> int | None:
    """Inverse lookup for yt-dlp's ``categories`` (names only); None when unknown."""
    if not name:
        return None
    return _NAME_TO_ID.get(str(name).strip().lower())


def parse_category_id(value: object) -> int | None:
    """``"24"``, ``24``, ``24.0`` -> 24; empty/NaN/infinite/garbage -> None."""
    if value is None:
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    if not math.isfinite(number) or number < 0:  # NaN, "inf"/"1e999" (int() would overflow), negative
        return None
    if number > _MAX_CATEGORY_ID:  # no category; the plan's int32 column stopped the build on it
        return None
    return int(number)
