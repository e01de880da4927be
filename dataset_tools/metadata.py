"""Read video metadata (Kaggle trending CSVs, plain tables, yt-dlp JSON lines) into canonical rows.

A canonical row is a dict with the keys of ``FIELDS``: ``video_id`` (11 chars), ``title``
(unescaped, whitespace-normalised), ``tags`` (list of str), ``category_id`` (int or None),
``category_name``, ``channel_id``, ``channel_title``, ``publish_time`` (ISO string or ""),
``trending_date`` (ISO date or "", used to pick the newest duplicate).
Rows whose id cannot be normalised are returned as rejections (never dropped silently).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import datetime
import glob
import itertools
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import pandas as pd

from dataset_tools import youtube
from vutrain.tag_text import tag_items

FIELDS = (
    "video_id",
    "title",
    "tags",
    "category_id",
    "category_name",
    "channel_id",
    "channel_title",
    "publish_time",
    "trending_date",
)
FORMATS = ("auto", "kaggle", "csv", "jsonl", "ytdlp")
_ID_COLUMNS = ("video_id", "videoid", "youtube_id", "id", "url", "video_url", "webpage_url", "link")
_TITLE_COLUMNS = ("title", "video_title", "name", "caption")
_TAG_COLUMNS = ("tags", "tag", "keywords", "labels")
_CATEGORY_COLUMNS = ("category_id", "categoryid", "category", "categories")
_CHANNEL_ID_COLUMNS = ("channel_id", "channelid")
_CHANNEL_TITLE_COLUMNS = ("channel_title", "channeltitle", "channel", "uploader")
_PUBLISH_COLUMNS = ("publish_time", "publishedat", "published_at", "upload_date")


@dataclass
class MetadataResult:
    """What the readers found: canonical rows (unique ids), rejected rows, counts."""

    rows: list[dict]
    rejected: list[dict] = field(default_factory=list)
    input_rows: int = 0
    duplicates: int = 0
    formats: dict[str, str] = field(default_factory=dict)
    # Values a kept row is built without, per field (``LEFT_OUT_FIELDS``), and where the first of
    # each kind is: they were dropped without a word (a tag ``true``, a category id ``-1``).
    values_left_out: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LEFT_OUT_FIELDS, 0))
    first_left_out: dict[str, str] = field(default_factory=dict)


# The fields whose values a kept row may leave out: ``tags`` items that are no tag (true, 1.5, a
# nested list or an object: ``tag_text.tag_items``) and ``category_id`` values that are neither a
# category id nor a name (a negative, fractional or too large number, true, an object).
LEFT_OUT_FIELDS = ("tags", "category_id")
# Tags texts that are blank or invisible once read (``""``, ``"\u200b"``: ``youtube.read_tags``),
# counted under this key of ``values_left_out``, present only when some were: a tag "\u200b" was
# left out of the shards and counted nowhere. Not under "tags": those are items of another type.
BLANK_TAGS = "blank_tags"


_TABLE_EXTENSIONS = (
    *("csv", "tsv", "parquet", "jsonl", "json", "ndjson"),
    *("csv.gz", "tsv.gz", "jsonl.gz", "json.gz", "ndjson.gz"),
)
# JSON records, one per line or in an array; .ndjson (newline-delimited JSON, as BigQuery and many
# scrapers name JSON lines) was read as a CSV, and the build stopped on "no video id column".
_JSON_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".ndjson", ".ndjson.gz")


def _expand_one(item: str) -> list[str]:
    """The files one ``--input`` names. An existing path is taken literally, so a name with
    ``[`` or ``*`` in it ("US [2018].csv") is never read as a pattern."""
    if os.path.isdir(item):
        # Every extension the readers take, in any case: a folder's ``b.tsv.gz`` or ``US.CSV``
        # was skipped without a word, while naming the same file was fine.
        names = sorted(n for n in os.listdir(item) if not n.startswith("."))
        found = []
        for ext in _TABLE_EXTENSIONS:
            found += [
                os.path.join(item, n)
                for n in names
                if n.lower().endswith(f".{ext}") and os.path.isfile(os.path.join(item, n))
            ]
        return found
    if os.path.exists(item) or not any(ch in item for ch in "*?["):
        return [item]  # a missing plain path is reported below, with the others
    # A folder the pattern matches is read as a folder, as when the shell expands the pattern (it
    # was opened as a file: an IsADirectoryError traceback).
    return [path for match in sorted(glob.glob(item)) for path in _expand_match(match)]


def _expand_match(match: str) -> list[str]:
    return _expand_one(match) if os.path.isdir(match) else [match]


def _not_category_file(path: str) -> bool:
    return not path.endswith("_category_id.json")  # Kaggle's category files are side data


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Files from paths, globs and directories (directory: its csv/tsv/parquet/json/jsonl files)."""
    files: list[str] = []
    seen: set[str] = set()
    for item in inputs:
        found = [f for f in _expand_one(item) if _not_category_file(f)]
        # A file named twice (`--input data/ data/US.csv`, overlapping globs) is read once: read
        # twice, its rows counted twice in input_rows and as "duplicate rows collapsed".
        fresh = [f for f in found if os.path.realpath(f) not in seen]
        seen.update(os.path.realpath(f) for f in fresh)
        if not found:
            # A pattern or folder that matches nothing is a typo more often than not: say so
            # rather than build from the other inputs alone.
            raise FileNotFoundError(
                f"--input {item}: matches no metadata file. Check the pattern or folder "
                "(a literal [ in a pattern is written [[]), then run the same command again."
            )
        files += fresh
    missing = [f for f in files if not os.path.exists(f)]
    if missing or not files:
        raise FileNotFoundError(
            f"--input matched no readable file: {missing or list(inputs)}. "
            "Pass CSV/TSV/parquet/JSONL files, a glob or a directory."
        )
    return files


class MetadataError(ValueError):
    """Input that cannot be read; the message names the file (and the line) and what to do."""


def _open_text(path: str, encoding: str, errors: str = "strict", newline: str = ""):
    """A text handle on ``path`` (gzip when it ends in .gz), newlines left to the CSV reader (or
    with ``newline="\\n"``, lines split at a line feed alone, as JSON Lines are)."""
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding=encoding, errors=errors, newline=newline)
    return open(path, encoding=encoding, errors=errors, newline=newline)


@contextlib.contextmanager
def _no_field_limit() -> Iterator[None]:
    """csv's 128 KiB field limit lifted while a table is read: an unclosed quote hit it part way
    through the rows it swallows, so the row that opened it could not be told from a long field."""
    old = csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _csv_records(lines: Iterable[str], sep: str) -> Iterator[tuple[int, list[str], bool]]:
    """(first line, fields, as_written) per record of ``lines``, the header first, blank lines skipped.

    Strict CSV quoting, record by record. A record whose double quote opens a field and never
    closes, or closes before more text of the field (a TSV title ``"Best of``: TSV exports rarely
    quote), is that one line split at ``sep`` as written (``as_written``). Read with quoting, it
    stopped the build, or swallowed every row up to the next quote into one title or rejection.
    ``lines`` is read as a stream: only the lines of the record being read are held.
    """
    source = _RecordLines(lines)
    start = 0
    while True:
        reader = csv.reader(source, delimiter=sep, strict=True)
        consumed = 0
        try:
            for fields in reader:
                if fields:
                    yield start + consumed + 1, fields, False
                consumed = reader.line_num
                source.record_read()
            return
        except csv.Error:
            bad = start + consumed
            yield bad + 1, source.held[0].rstrip("\r\n").split(sep), True
            source.read_again_after_first()
            start = bad + 1


class _RecordLines:
    """The lines of a CSV, each one held from when the csv reader takes it until its record is read:
    a record that fails (an unclosed quote runs on) is read as its first line, and the lines after
    that one are read again."""

    def __init__(self, lines: Iterable[str]):
        self.source, self.held = iter(lines), []

    def __iter__(self) -> _RecordLines:
        return self

    def __next__(self) -> str:
        line = next(self.source)
        self.held.append(line)
        return line

    def record_read(self) -> None:
        self.held.clear()

    def read_again_after_first(self) -> None:
        self.source, self.held = itertools.chain(self.held[1:], self.source), []


def _quotes_are_clean(path: str, encoding: str, sep: str, errors: str) -> bool:
    """True when every quoted field of ``path`` closes right before a separator or line end, so
    pandas reads each row as the row it is (one streaming pass; the file is not held)."""
    with _no_field_limit(), _open_text(path, encoding, errors) as fh:
        try:
            for _ in csv.reader(fh, delimiter=sep, strict=True):
                pass
        except csv.Error:
            return False
    return True


# Column that marks a CSV row with more fields than the header: ``{"line", "fields", "width"}``
# there, the row itself empty. The row keeps its place, so it is counted and rejected like any other.
_MALFORMED = "__dataset_tools_malformed__"


def _read_csv_keeping_malformed(path: str, encoding: str, sep: str, errors: str) -> pd.DataFrame:
    """The slow path, for a file with rows of too many fields or quotes that do not close: the csv
    module, record by record (pandas would drop such a row with a warning, shift every column when
    it is the first one, or swallow the rows after an unclosed quote)."""
    # utf-8-sig: pandas drops a byte order mark before the header; do the same.
    with (
        _open_text(path, "utf-8-sig" if encoding == "utf-8" else encoding, errors) as fh,
        _no_field_limit(),
    ):
        first = fh.readline()
        if _separator_in_line(first):
            first = "\n"  # a blank line is skipped, and every record keeps its line number
        # Read as a stream: the file was held as a list of its lines beside the rows made of them.
        records = _csv_records(itertools.chain([first] if first else [], fh), sep)
        first = next(records, None)
        if first is None:
            raise pd.errors.EmptyDataError("no header")
        header = first[1]
        width = len(header)
        rows = []
        for line, fields, as_written in records:
            if len(fields) > width:
                why = "an unclosed double quote, read as written: " if as_written else ""
                rows.append([""] * width + [{"line": line, "fields": fields, "width": width, "why": why}])
            else:  # fewer fields than the header: the missing ones are empty, as with pandas
                rows.append(fields + [""] * (width - len(fields)) + [None])
    table = pd.DataFrame(rows, columns=[*_unique_names(header), _MALFORMED])
    table.attrs[_HEADER] = header
    return table


def _unique_names(header: list[str]) -> list[str]:
    """Column names with repeats renamed ``name.1``, ``name.2`` like pandas (no column lost)."""
    seen: dict[str, int] = {}
    names = []
    for name in header:
        names.append(f"{name}.{seen[name]}" if name in seen else name)
        seen[name] = seen.get(name, 0) + 1
    return names


def _parse_csv(path: str, encoding: str, sep: str, errors: str) -> pd.DataFrame:
    """pandas' C parser (fast) for well-formed files, the csv module for the rest."""
    declared = _declared_separator(path, encoding)
    sep = declared or _header_separator(_first_text_line(path, encoding), sep)
    kwargs = dict(
        sep=sep, dtype=str, keep_default_na=False, on_bad_lines="error", skiprows=int(bool(declared))
    )
    if _has_nul(path, encoding):
        # pandas' C parser ends a field at a NUL and drops the rest of it without a word (a title
        # "Live\x00 at Wembley" became "Live"); the csv module keeps the whole field.
        return _read_csv_keeping_malformed(path, encoding, sep, errors)
    if not _quotes_are_clean(path, encoding, sep, errors):
        return _read_csv_keeping_malformed(path, encoding, sep, errors)
    try:
        df = pd.read_csv(path, encoding=encoding, encoding_errors=errors, **kwargs)
    except pd.errors.ParserError:
        return _read_csv_keeping_malformed(path, encoding, sep, errors)
    if not isinstance(df.index, pd.RangeIndex):
        # The first data row had more fields than the header: pandas took the first column as
        # an index and shifted every other one. Re-read so those rows are rejected instead.
        return _read_csv_keeping_malformed(path, encoding, sep, errors)
    df.attrs[_HEADER] = _csv_header(path, encoding, sep, errors, int(bool(declared)))
    return df


# ``DataFrame.attrs`` key of a CSV's header as written: pandas renames a repeated column name
# ``title.1``, and the duplicate check needs the names as the file gives them.
_HEADER = "dataset_tools.header"


def _csv_header(path: str, encoding: str, sep: str, errors: str, skip: int) -> list[str]:
    """The first record of ``path`` after ``skip`` lines (blank lines skipped, as pandas does)."""
    with _open_text(path, "utf-8-sig" if encoding == "utf-8" else encoding, errors) as fh:
        for _ in range(skip):
            fh.readline()
        with _no_field_limit():
            return next((fields for fields in csv.reader(fh, delimiter=sep) if fields), [])


# Excel writes (and reads) a first line ``sep=,`` naming the separator; "sep=;" in locales with
# a decimal comma. Read as the header, it stopped the build on "no video id column".
_SEP_LINE_RE = re.compile(r'"?sep=(.)"?')


def _separator_in_line(line: str) -> str | None:
    """The separator a ``sep=X`` line declares (byte order mark, in any reading, ignored), else None."""
    text = line.removeprefix("\ufeff").removeprefix("\xef\xbb\xbf").rstrip("\r\n")
    match = _SEP_LINE_RE.fullmatch(text)
    return match.group(1) if match else None


def _declared_separator(path: str, encoding: str) -> str | None:
    """The separator the first line of ``path`` declares (``sep=;``), else None."""
    with _open_text(path, encoding, errors="replace") as fh:
        return _separator_in_line(fh.readline())


# Separators a header may use other than the one the file's name says: Excel in a locale with a
# decimal comma saves "CSV" with ";", and many exports named .csv are tab-separated. Read with
# the name's separator, the header was one column and the build stopped on "no video id column".
_SEPARATORS = (",", "\t", ";", "|")


def _header_separator(header: str, default: str) -> str:
    """``default`` when ``header`` read with it names a video id column, or when no other separator
    does; else the first separator that does."""
    header = header.removeprefix("\ufeff").removeprefix("\xef\xbb\xbf")  # a BOM, in any reading
    for sep in (default, *_SEPARATORS):
        fields = next(csv.reader([header], delimiter=sep), [])
        if any(_column_key(name) in _ID_COLUMNS for name in fields):
            return sep
    return default


def _first_text_line(path: str, encoding: str) -> str:
    """The first line of ``path`` that is not blank (the header, as pandas finds it)."""
    with _open_text(path, encoding, errors="replace") as fh:
        return next((line for line in fh if line.strip()), "")


def _has_nul(path: str, encoding: str) -> bool:
    """True when the text of ``path`` holds a NUL character (any byte 0 outside UTF-16).
    Read in blocks: a metadata file of several GB is not held twice in memory."""
    utf16 = encoding.startswith("utf-16")
    nul = "\x00" if utf16 else b"\x00"
    with _open_text(path, encoding, errors="replace") if utf16 else _open_binary(path) as fh:
        while block := fh.read(1 << 24):
            if nul in block:
                return True
    return False


def _open_binary(path: str):
    """A binary handle on ``path`` (decompressed when it ends in .gz)."""
    if path.lower().endswith(".gz"):
        import gzip

        return gzip.open(path, "rb")
    return open(path, "rb")


def _read_csv(path: str, encoding: str, sep: str, errors: str = "strict") -> pd.DataFrame:
    try:
        return _parse_csv(path, encoding, sep, errors)
    except pd.errors.EmptyDataError:
        raise MetadataError(
            f"{path}: empty file (no header row). Remove it from --input, or give it a header "
            f"with a video id column ({', '.join(_ID_COLUMNS)}) and rows."
        ) from None
    except pd.errors.ParserError as err:
        raise MetadataError(
            f"{path}: cannot parse as CSV ({' '.join(str(err).split())}). Fix or remove that row, "
            "then run the same command again."
        ) from None


def _read_table(path: str) -> pd.DataFrame:
    """Any tabular file as a DataFrame of strings/objects (no NaN coercion of ids)."""
    import gzip
    import zlib

    try:
        return _read_table_as_named(path)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        # A .gz cut short by an interrupted download, or a plain file named .gz: a gzip traceback.
        raise MetadataError(
            f"{path}: damaged gzip data ({err}). Download or compress it again (or drop the .gz from "
            "the name of a plain file), then run the same command again."
        ) from None


def _read_table_as_named(path: str) -> pd.DataFrame:
    lower = path.lower()
    _refuse_unreadable_container(path)
    if lower.endswith(".parquet"):
        return _read_parquet(path)
    if lower.endswith(_JSON_SUFFIXES):
        records = [_read_keys_only(record) for record in _iter_json_records(path)]
        if not records:
            raise MetadataError(
                f"{path}: no records (empty file). Remove it from --input, or put one JSON object "
                "per line in it."
            )
        # object columns: pandas would turn a number beside a missing key into a float ("5.0")
        return pd.DataFrame(records, dtype=object)
    sep = "\t" if lower.endswith((".tsv", ".tsv.gz")) else ","
    utf16 = _utf16_encoding(path)
    if utf16:
        # PowerShell 5 (`>`, Out-File) and "Unicode" exports: read as latin-1, the header became
        # "ÿþv" and the build stopped on "no video id column".
        return _read_csv(path, utf16, sep)
    try:
        return _read_csv(path, "utf-8", sep)
    except UnicodeDecodeError:
        damage = _utf8_damage(path)
        if damage:
            # A UTF-8 file with a few bad bytes (a scraper cutting a description mid-character):
            # latin-1 would turn every non-ASCII title of the file into mojibake.
            print(f"[dataset_tools] {path}: {damage}")
            return _read_csv(path, "utf-8", sep, errors="replace")
        # Several Kaggle country files are not UTF-8. Windows-1252 (Excel's "CSV" on Windows) is
        # latin-1 plus curly quotes, dashes, "€" and "…" in 0x80-0x9F, which latin-1 turned into
        # control characters ("Don\x92t"); latin-1 never fails and keeps every row otherwise.
        encoding, label = ("cp1252", "Windows-1252") if _decodes(path, "cp1252") else ("latin-1", "latin-1")
        print(f"[dataset_tools] {path}: not UTF-8, reading as {label}")
        table = _read_csv(path, encoding, sep)
        # A UTF-8 byte order mark before a header of a file with some non-UTF-8 bytes: read as
        # Windows-1252 it was part of the first column's name ("ï»¿video_id": no video id column).
        return table.rename(columns={table.columns[0]: str(table.columns[0]).removeprefix("\xef\xbb\xbf")})


def _read_parquet(path: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (ValueError, OSError) as err:  # pyarrow's ArrowInvalid is a ValueError
        # A truncated copy or another file saved as .parquet was a pyarrow traceback.
        reason = " ".join(str(err).split())[:200]
        raise MetadataError(
            f"{path}: not a readable parquet file ({reason}). Copy or export it again, or remove "
            "it from --input."
        ) from None


# Containers the readers do not open, by their first bytes. Read as text they gave "no video id
# column ... found ['PK\x03\x04...']" (the Kaggle download is a .zip), which says nothing useful.
_CONTAINER_MAGIC = (
    (b"PK\x03\x04", "a ZIP archive", "unzip it and pass the files inside"),
    (b"BZh", "bzip2-compressed", "decompress it (bunzip2) or recompress it with gzip as .gz"),
    (b"\xfd7zXZ\x00", "xz-compressed", "decompress it (unxz) or recompress it with gzip as .gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", "decompress it (unzstd) or recompress it with gzip as .gz"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it and pass the files inside"),
)
_GZIP_MAGIC = b"\x1f\x8b"


def _refuse_unreadable_container(path: str) -> None:
    """One line for an archive or a compression other than gzip, and for gzip data whose name
    lacks .gz (or that is gzipped twice): only a name ending in .gz is decompressed, once."""
    head = _read_bytes(path, 8)
    for magic, kind, remedy in _CONTAINER_MAGIC:
        if head.startswith(magic) and (magic != b"BZh" or head[3:4].isdigit()):
            raise MetadataError(f"{path}: {kind}; only plain and gzip (.gz) files are read: {remedy}.")
    if head.startswith(_GZIP_MAGIC) and not path.lower().endswith(".parquet"):
        gz = path.lower().endswith(".gz")
        remedy = "gunzip it once more" if gz else f"rename it to {os.path.basename(path)}.gz"
        raise MetadataError(
            f"{path}: gzip data {'inside gzip data' if gz else 'without a .gz name'}: {remedy}."
        )


def _read_bytes(path: str, size: int = -1) -> bytes:
    """The (decompressed, for .gz) bytes of ``path``: all of them, or the first ``size``."""
    if path.lower().endswith(".gz"):
        import gzip

        with gzip.open(path, "rb") as fh:
            return fh.read(size)
    with open(path, "rb") as fh:
        return fh.read(size)


def _utf16_encoding(path: str) -> str | None:
    """The UTF-16 codec of a text file, else None: ``utf-16`` after a byte order mark (either
    byte order), ``utf-16-le``/``utf-16-be`` without one (a tool that strips the mark). A header
    is ASCII, so without a mark one byte of each pair is NUL; read as Windows-1252, such a file
    stopped the build on "no video id column" with a header full of NULs."""
    head = _read_bytes(path, 256)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf-16"
    pairs = len(head) // 2
    if pairs < 2:
        return None
    even_nuls, odd_nuls = head[0 : 2 * pairs : 2].count(0), head[1 : 2 * pairs : 2].count(0)
    if odd_nuls >= pairs * 0.9 and even_nuls == 0:
        return "utf-16-le"
    if even_nuls >= pairs * 0.9 and odd_nuls == 0:
        return "utf-16-be"
    return None


# Bytes decoded at a time by the encoding checks of a CSV that is not UTF-8: read whole, a 2 GB
# metadata dump was held as bytes and again as text (four times over for a non-Latin script).
_DECODE_BLOCK = 1 << 20


def _decoded_blocks(path: str, encoding: str, errors: str = "strict") -> Iterator[tuple[bytes, str]]:
    """(raw block, its text) through ``path`` (decompressed for .gz), ``_DECODE_BLOCK`` bytes at
    a time; a character cut by a block's end is decoded with the next block. A decode error
    raises with ``start`` counted from the block's first byte."""
    decoder = codecs.getincrementaldecoder(encoding)(errors)
    with _open_binary(path) as fh:
        while block := fh.read(_DECODE_BLOCK):
            yield block, decoder.decode(block)
        yield b"", decoder.decode(b"", final=True)


def _decodes(path: str, encoding: str) -> bool:
    try:
        for _ in _decoded_blocks(path, encoding):
            pass
    except UnicodeDecodeError:
        return False
    return True


def _first_utf8_error_line(path: str) -> int | None:
    """The line of the first byte of ``path`` that is not UTF-8, None when every byte is."""
    lines = 1
    try:
        for block, _ in _decoded_blocks(path, "utf-8"):
            lines += block.count(b"\n")
    except UnicodeDecodeError as err:
        # err.object is the decoder's carried bytes (never a newline) then this block.
        return lines + err.object[: err.start].count(b"\n")
    return None


def _utf8_damage(path: str) -> str | None:
    """For a file that does not decode as UTF-8: a note saying which bytes will be replaced when
    it is UTF-8 nonetheless (more correctly encoded non-ASCII characters than invalid bytes),
    else None (a legacy 8-bit encoding such as latin-1, whose accented letters are all invalid)."""
    first_line = _first_utf8_error_line(path)
    if first_line is None:
        return None
    replaced = real = non_ascii = 0
    tail = b""  # the last bytes of the block before: a U+FFFD written across two blocks counts
    for block, text in _decoded_blocks(path, "utf-8", errors="replace"):
        replaced += text.count("\ufffd")
        non_ascii += len(text) - len(text.encode("ascii", errors="ignore"))
        joined = tail + block
        real += joined.count("\ufffd".encode())
        tail = joined[-2:]
    invalid = replaced - real
    if non_ascii - invalid <= invalid:  # the replacements are non-ASCII: not counted as characters
        return None
    return (
        f"{invalid} invalid UTF-8 sequence(s) (the first on line {first_line}) in a UTF-8 file; "
        "reading it as UTF-8 with those replaced by U+FFFD"
    )


def _not_utf8(path: str) -> MetadataError:
    """The error for JSON input that is not UTF-8, naming the line of its first bad byte (found a
    block at a time: the file is not held)."""
    line = _first_utf8_error_line(path) or 1
    return MetadataError(
        f"{path}:{line}: not UTF-8 (a byte sequence that UTF-8 text never holds). JSON input must be "
        "UTF-8: re-save the file as UTF-8, then run the same command again."
    )


def _kind(value: object) -> str:
    """How a JSON value reads in an error message: ``null``, ``an array``, ``a string``..."""
    if value is None:
        return "null"
    names = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


# Characters read at a time from a JSON file that is no JSON Lines (an array, or objects over many
# lines); a value longer than the text held is read on with as much again.
_JSON_BLOCK = 1 << 20
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
# How near the end of the text held a decode error must be to be taken for a value cut by a
# block's end (a literal, a number, a \uXXXX escape), and read on; further back, it is the file's.
_CUT_REACH = 64


class _JsonValues:
    """(line, value) of each element of the JSON array a file holds, or of each JSON value of a
    file of values one after another (one object over many lines, ``jq .`` of JSON lines), read a
    block at a time: read whole, a 2 GB dump was its text and every record parsed from it at once
    (a yt-dlp record with its formats is hundreds of KB). Only the value being read is held."""

    def __init__(self, path: str, errors: str = "strict"):
        self.path, self.errors = path, errors
        self.decoder = json.JSONDecoder(object_pairs_hook=_json_object)
        self.text, self.pos, self.line = "", 0, 1  # ``line``: the line ``pos`` is on

    def __iter__(self) -> Iterator[tuple[int, object]]:
        # utf-8-sig: a byte order mark (Windows tools write one) is not part of the first value.
        with _open_text(self.path, "utf-8-sig", self.errors) as self.fh:
            if self._peek() != "[":
                while self._peek():
                    yield self._value()
                return
            self._step()
            if self._peek() == "]":
                self._step()
            else:
                yield from self._elements()
            if self._peek():
                raise self._invalid("Extra data after the closing ]", self.pos)

    def _elements(self) -> Iterator[tuple[int, object]]:
        while True:
            yield self._value()
            after = self._peek()
            self._step()
            if after == "]":
                return
            if after != ",":
                why = f"Expecting ',' delimiter, found {after!r}" if after else "no closing ]"
                raise self._invalid(why, self.pos - 1)

    def _value(self) -> tuple[int, object]:
        self._peek()  # raw_decode takes no whitespace before a value
        while True:
            try:
                value, end = self.decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as err:
                if self._may_be_cut(err) and self._more():
                    continue
                raise self._invalid(err.msg, err.pos) from None
            # A value that ends where the text held does may go on (a number: 12|34).
            if end < len(self.text) or not self._more():
                line = self.line
                self._advance(end)
                return line, value

    def _may_be_cut(self, err: json.JSONDecodeError) -> bool:
        return err.msg.startswith("Unterminated string") or len(self.text) - err.pos < _CUT_REACH

    def _peek(self) -> str:
        """The next character that is not JSON whitespace, "" at the end of the file."""
        while True:
            self._advance(_JSON_SPACE.match(self.text, self.pos).end())
            if self.pos < len(self.text) or not self._more():
                return self.text[self.pos : self.pos + 1]

    def _step(self) -> None:
        self._advance(self.pos + 1)

    def _advance(self, end: int) -> None:
        self.line += self.text.count("\n", self.pos, end)
        self.pos = end

    def _more(self) -> bool:
        """Read on (as much again as the text held, at least a block); False at the end of the file."""
        try:
            block = self.fh.read(max(_JSON_BLOCK, len(self.text) - self.pos))
        except UnicodeDecodeError:
            raise _not_utf8(self.path) from None
        if not block:
            return False
        self.text, self.pos = self.text[self.pos :] + block, 0
        return True

    def _invalid(self, why: str, pos: int) -> MetadataError:
        line = self.line + self.text.count("\n", self.pos, pos)
        return MetadataError(
            f"{self.path}:{line}: not valid JSON ({why}). Fix that line, then run the same command again."
        )


def _first_json_char(path: str) -> str:
    """The first character of ``path`` that is not whitespace (a byte order mark skipped), "" when none."""
    with _open_text(path, "utf-8-sig", errors="replace") as fh:
        while block := fh.read(1 << 16):
            if block.strip():
                return block.lstrip()[0]
    return ""


# yt-dlp records that hold videos instead of being one: ``yt-dlp -J`` of a playlist or channel.
_PLAYLIST_TYPES = ("playlist", "multi_video")


def _videos(record: dict) -> Iterator[dict]:
    """The video records one JSON record stands for: itself, or the entries of a yt-dlp playlist
    (nested ones included). Taken as one video, a playlist was one "invalid video id" rejection
    and every video in it was lost."""
    if _is_api_page(record):
        for item in record["items"]:
            yield _api_video(item) if isinstance(item, dict) else {"api_item": item}
        return
    entries = record.get("entries")
    if record.get("_type") not in _PLAYLIST_TYPES or not isinstance(entries, list):
        yield record
        return
    for index, entry in enumerate(entries, 1):
        if isinstance(entry, dict):
            yield from _videos(entry)
        else:  # yt-dlp writes null for an entry it could not extract: rejected, so still counted
            yield {"playlist_id": record.get("id"), "playlist_index": index, "entry": entry}


def _is_api_page(record: dict) -> bool:
    """True for a YouTube Data API list response (``videos.list``, ``search.list``,
    ``playlistItems.list``): taken as one record, it stopped the build with "no video id column"."""
    kind = record.get("kind")
    return isinstance(kind, str) and kind.endswith("ListResponse") and isinstance(record.get("items"), list)


def _api_video(item: dict) -> dict:
    """One Data API item as a flat record: its snippet's title, tags, categoryId, channelId,
    channelTitle, publishedAt, and the video id wherever that resource keeps it (a search result's
    ``id.videoId``, a playlist item's ``snippet.resourceId.videoId``; a channel result has none)."""
    snippet = item.get("snippet") if isinstance(item.get("snippet"), dict) else {}
    flat = _JsonObject({k: v for k, v in item.items() if k != "snippet"} | snippet)
    flat.given_twice = getattr(item, "given_twice", {}) | getattr(snippet, "given_twice", {})
    for holder in (item.get("id"), snippet.get("resourceId"), item.get("contentDetails")):
        if isinstance(holder, dict):
            flat["id"] = holder.get("videoId")
    return flat


class _JsonObject(dict):
    """A JSON object that gives keys more than once: ``given_twice`` counts each such key
    (``json.loads`` keeps only a repeated key's last value)."""

    given_twice: dict[str, int]


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` of the JSON readers: a plain dict, or a ``_JsonObject`` when a key
    repeats, so that a record whose ``title`` is given twice is refused instead of read as its
    last value without a word."""
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    repeated = _JsonObject(obj)
    counts: dict[str, int] = {}
    for key, _ in pairs:
        counts[key] = counts.get(key, 0) + 1
    repeated.given_twice = {key: n for key, n in counts.items() if n > 1}
    return repeated


def _refuse_repeated_keys(path: str, line: int | None, record: dict) -> None:
    """One line when a video record gives a key the readers take more than once
    (``{"title": "a", "title": "b"}``): as for a CSV column given twice, only one value could
    be read, and JSON's rule kept the last without a word."""
    for key, n in getattr(record, "given_twice", {}).items():
        if _column_key(key) in _READ_COLUMNS:
            where = f"{path}:{line}" if line is not None else path
            raise MetadataError(
                f"{where}: key {key!r} is given {n} times in one object and only the last would be read. "
                "Keep one (merge their values into it) or rename the others, then run the same command again."
            )


def _iter_json_records(path: str) -> Iterator[dict]:
    if _starts_with_a_json_line(path) or _first_json_char(path) not in ("[", "{"):
        yield from _streamed_json_lines(path)  # other text: refused at its first line there
        return
    array = _first_json_char(path) == "["
    for index, (line, value) in enumerate(_JsonValues(path)):
        if not isinstance(value, dict):
            what = f"array element {index + 1} is " if array else ""
            raise MetadataError(
                f"{path}:{line}: {what}{_kind(value)}, not an object. JSON input needs one object per video."
            )
        for video in _videos(value):
            _refuse_repeated_keys(path, line, video)
            yield video


def _starts_with_a_json_line(path: str) -> bool:
    """True when the first line of ``path`` that is not blank is a whole JSON object: JSON Lines,
    read a line at a time (:func:`_streamed_json_lines`). The line is only read when it opens with
    ``{``: an array written on one line (``json.dump`` without indent) is the whole file."""
    if _first_json_char(path) != "{":
        return False
    with _open_text(path, "utf-8-sig", errors="replace", newline="\n") as fh:
        first = next((line.strip() for line in fh if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except (ValueError, RecursionError):
        return False


def _streamed_json_lines(path: str) -> Iterator[dict]:
    """The video records of a JSON Lines file, read a line at a time: read whole, the text of a
    yt-dlp ``--dump-json`` of many videos (hundreds of KB each) was held beside its records."""
    try:
        with _open_text(path, "utf-8-sig", newline="\n") as fh:
            for lineno, line in enumerate(fh, 1):
                yield from _line_videos(path, lineno, line)
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _line_videos(path: str, lineno: int, line: str) -> Iterator[dict]:
    """The video records of JSON line ``lineno`` (none for a blank line)."""
    line = line.strip()
    if not line:
        return
    try:
        rec = json.loads(line, object_pairs_hook=_json_object)
    except ValueError as err:
        raise MetadataError(
            f"{path}:{lineno}: not a JSON line ({err}). JSONL input needs one JSON object per line."
        ) from None
    if not isinstance(rec, dict):  # a row skipped here would be lost without a trace
        raise MetadataError(
            f"{path}:{lineno}: {_kind(rec)}, not a JSON object. JSONL input needs one JSON object per line."
        )
    for video in _videos(rec):
        _refuse_repeated_keys(path, lineno, video)
        yield video


def _json_line_of_each_record(path: str) -> Iterator[int]:
    """The line each video record of a JSON Lines file starts on, read a line at a time (a
    playlist's entries: the line of their playlist)."""
    with _open_text(path, "utf-8-sig", errors="replace", newline="\n") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                for _ in _videos(json.loads(line)):
                    yield lineno


def _json_value_line_of_each_record(path: str) -> Iterator[int]:
    """The line each video record of a JSON array (or of JSON values over many lines) starts on:
    that of its element (a playlist's entries: that of their playlist)."""
    for line, value in _JsonValues(path, errors="replace"):
        for _ in _videos(value) if isinstance(value, dict) else [value]:
            yield line


def _read_keys_only(record: dict) -> dict:
    """``record`` with only the keys a reader looks at (``_JSON_KEPT_KEYS``); a record with none of
    them whole, so that its rejection shows what it holds."""
    kept = {key: value for key, value in record.items() if _column_key(key) in _JSON_KEPT_KEYS}
    return kept or record


def _record_lines(path: str, records: int, wanted: set[int]) -> dict[int, int] | None:
    """The file line where each ``wanted`` record starts, for ``rejected_input.jsonl``: the record's
    index was given as its line, one too low in every CSV (the header) and further off after blank
    lines or fields spanning lines. None for parquet (no lines) or when the count disagrees. The
    file is read as a stream and only the wanted lines are kept: a list of every line of the file
    was read (and one of every record's line kept) when one row was rejected."""
    starts = _record_starts(path)
    if starts is None:
        return None
    found, count = {}, 0
    for index, line in enumerate(starts):
        if index in wanted:
            found[index] = line
        count = index + 1
    return found if count == records else None


def _record_starts(path: str) -> Iterator[int] | None:
    """The line each record of ``path`` starts on, as the readers split it (None: parquet)."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        return None
    if lower.endswith(_JSON_SUFFIXES) and _starts_with_a_json_line(path):
        return _json_line_of_each_record(path)
    if lower.endswith(_JSON_SUFFIXES):
        return _json_value_line_of_each_record(path) if _first_json_char(path) in ("[", "{") else None
    return _csv_record_starts(path, "\t" if lower.endswith((".tsv", ".tsv.gz")) else ",")


def _csv_record_starts(path: str, sep: str) -> Iterator[int]:
    # latin-1 decodes any bytes, and UTF-8 never uses the bytes of a newline, quote or separator
    # inside a character: the lines found are the same in whatever encoding the table was read.
    # UTF-16 is the exception: its newline is two bytes, one of them zero.
    with _open_text(path, _utf16_encoding(path) or "latin-1") as fh, _no_field_limit():
        head = [fh.readline()]
        declared = _separator_in_line(head[0])
        if declared:
            sep, head[0] = declared, "\n"
        else:
            while head[-1] and not head[-1].strip():  # blank lines before the header
                head.append(fh.readline())
            sep = _header_separator(head[-1], sep)
        # The records as the readers split them: an unclosed quote is one line, not the rest.
        records = _csv_records(itertools.chain(head, fh), sep)
        next(records, None)  # the header
        for line, _, _ in records:
            yield line


def _column_key(name: object) -> str:
    """A column name as the readers look it up: ``" Video ID"``, ``Video_ID`` and ``video_id`` are
    one column. Spreadsheet exports write headers with spaces around or inside the name; matched
    as written, such a file stopped the build with "no video id column"."""
    return "_".join(str(name).strip().lower().split())


_YTDLP_MARKERS = frozenset(
    {"extractor", "extractor_key", "webpage_url", "upload_date", "_type", "display_id"}
)


def detect_format(path: str, columns: Sequence[str]) -> str:
    """kaggle (trending CSVs, both schemas), ytdlp (``--dump-json``), else csv (generic table)."""
    cols = {_column_key(c) for c in columns}
    if "video_id" in cols and "trending_date" in cols:
        return "kaggle"
    if "id" in cols and cols & _YTDLP_MARKERS:
        return "ytdlp"
    return "csv"


def _pick(columns: dict[str, str], names: Sequence[str]) -> list[str]:
    """The columns present among ``names``, in preference order."""
    return [columns[name] for name in names if name in columns]


def _empty(value: object) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and value != value:  # NaN: a JSON line without this key
        return True
    if value is pd.NaT or value is pd.NA:
        # A missing parquet timestamp read as the text "NaT" sorted after every date, so an
        # undated duplicate won the collapse as the "newest" row.
        return True
    return isinstance(value, str) and not value.strip()


def _first(raw: dict, cols: Sequence[str]) -> object:
    """First non-empty value among ``cols`` (JSON lines differ in which keys they carry)."""
    for col in cols:
        value = raw.get(col)
        if hasattr(value, "tolist") and not isinstance(value, str):
            value = value.tolist()
        if isinstance(value, list):
            if value:
                return value
            continue
        if not _empty(value):
            return value
    return None


def load_category_table(path: str | None) -> dict[int, str]:
    """``{id: name}`` from a YouTube API videoCategories JSON (Kaggle ``US_category_id.json``)."""
    if not path:
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise MetadataError(
            f"{path}: not a videoCategories JSON ({err}); fix or remove it (a Kaggle "
            "<region>_category_id.json next to the input is read automatically), or pass another "
            "with --categories-json"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("items", []), list):
        raise MetadataError(
            f'{path}: not a videoCategories JSON (no "items" list); fix or remove it, or pass '
            "another with --categories-json"
        )
    table = {}
    for item in data.get("items", []):
        if not isinstance(item, dict):
            continue
        cid = youtube.parse_category_id(item.get("id"))
        name = (item.get("snippet") or {}).get("title")
        if cid is not None and name:
            table[cid] = name
    return table


def _sibling_category_json(path: str) -> str | None:
    """Kaggle ships ``USvideos.csv`` with ``US_category_id.json``; find it if it is there."""
    base = os.path.basename(path)
    region = base[:2]
    candidate = os.path.join(os.path.dirname(path), f"{region}_category_id.json")
    return candidate if os.path.exists(candidate) else None


def _kaggle_date(value: object) -> str:
    """Trending date to ISO: 2017 schema ``17.14.11`` is YY.DD.MM; the newer one is ISO already.
    A timestamp keeps the day it is written in, zone or not (``2017-11-14T00:00:00+05:30`` is
    2017-11-14): a trending date names a chart's calendar day, and a day stored as its local
    midnight (a date column localised to its region) is that day; taken in UTC it would move
    back a day east of Greenwich. YouTube's data set writes UTC (``...T00:00:00.000Z``)."""
    text = _date_text(value)
    parts = text.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        yy, dd, mm = parts
        return f"20{yy}-{mm.zfill(2)}-{dd.zfill(2)}"
    return text[:10]


def _ytdlp_publish(value: object) -> str:
    return _date_text(value)


def _date_text(value: object) -> str:
    """A date as text: a parquet date or timestamp as ISO (:func:`_iso`), yt-dlp's ``YYYYMMDD`` as
    ``YYYY-MM-DD``, also as a whole float, other text as it is. An integer column with a gap is a
    float column to pandas: parquet gave ``20200102.0`` and pandas' CSV the text "20200102.0",
    kept as that date (and as a trending date it sorted after every ISO one)."""
    if isinstance(value, (datetime.date, datetime.datetime)):
        return _iso(value)
    text = str(value or "").strip()
    compact = _COMPACT_DATE_RE.fullmatch(text)
    if compact:  # yt-dlp upload_date is YYYYMMDD
        digits = compact.group(1)
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
    return text


_COMPACT_DATE_RE = re.compile(r"(\d{8})(?:\.0*)?")


def _iso(value: datetime.date) -> str:
    """A parquet date or timestamp as the text dates become: ``2020-01-02`` for a date, or for a
    timestamp at midnight without a zone (a date column stored as timestamps, as pandas'
    ``to_datetime("20200102")`` writes it), else ISO ``2020-01-02T10:30:00(+00:00)``. ``str()``
    gave ``2020-01-02 00:00:00``, so the same upload date read two ways."""
    if not isinstance(value, datetime.datetime):
        return value.isoformat()
    if value.tzinfo is None and value.time() == datetime.time():
        return value.date().isoformat()
    return value.isoformat()


# yt-dlp names the site a record came from in these keys (``ie_key`` in --flat-playlist entries).
_EXTRACTOR_COLUMNS = ("extractor", "extractor_key", "ie_key")


def _other_site(raw: dict, cols: Sequence[str]) -> str | None:
    """The extractor of a yt-dlp record from another site (vimeo, dailymotion...), else None.
    Their ids can have 11 characters too: taken as YouTube ids, every variant failed to download."""
    name = _first(raw, cols)
    if name is None or str(name).strip().lower().startswith("youtube"):
        return None
    return str(name).strip()


def _video_id(raw: dict, cols: Sequence[str]) -> str | None:
    """The first candidate column whose value is a valid id or YouTube URL: a table may carry a
    numeric ``id`` next to its ``url``, and the first non-empty value alone would reject every row."""
    for col in cols:
        vid = youtube.normalize_video_id(_first(raw, [col]))
        if vid is not None:
            return vid
    return None


def _category(raw: dict, cat_col: Sequence[str], table: dict[int, str]) -> tuple[int | None, str, bool]:
    """(category id, name, whether the value given was left out) from an id, a name, or yt-dlp's
    list of names. A number that is no category id (negative, fractional, too large) and a value
    that is neither number nor text (true, an object) are left out, and the caller counts them:
    they became None without a word, and 24.5 became category 24."""
    cat_value = _first(raw, cat_col)
    if isinstance(cat_value, list):  # yt-dlp: categories is a list of names
        cat_value = cat_value[0]
    if _empty(cat_value) or _is_nan(cat_value):  # "nan": how a missing value reads as text
        return None, "", False
    if _is_number(cat_value):
        cid = _whole_category_id(cat_value)
        return cid, youtube.category_name(cid, table) or "", cid is None
    if not isinstance(cat_value, str):
        return None, "", True
    cid = youtube.category_id_from_name(cat_value)
    # A category name we have no id for: keep the name.
    return cid, youtube.category_name(cid, table) or cat_value, False


def _whole_category_id(value: object) -> int | None:
    """The category id a number is, when it is a whole one the plan holds; else None."""
    cid = youtube.parse_category_id(value)
    return cid if cid is not None and float(str(value).strip()) == cid else None


def _is_nan(value: object) -> bool:
    return _is_number(value) and math.isnan(float(str(value).strip()))


def _is_number(value: object) -> bool:
    """True for anything float() reads but true/false, "inf" and "nan" included: such a value is no name."""
    if isinstance(value, bool):
        return False
    try:
        float(str(value).strip())
    except ValueError:
        return False
    return True


def _malformed(raw: dict) -> tuple[str, dict] | None:
    """(reason, record) for a CSV row with more fields than the header, else None."""
    bad = raw.pop(_MALFORMED, None)
    if not isinstance(bad, dict):
        return None
    fields, width = bad["fields"], bad["width"]
    reason = f"malformed CSV row at line {bad['line']} ({bad['why']}{len(fields)} fields, header has {width})"
    return reason, {"fields": fields}


def _as_given(raw: dict) -> dict[str, str]:
    """A rejected row as the input gave it: the keys a JSON line lacks (NaN where other lines
    have them) are left out, not written as the text "nan"."""
    return {k: str(v) for k, v in raw.items() if not (isinstance(v, float) and v != v)}


def _canonical_rows(
    path: str, df: pd.DataFrame, fmt: str, table: dict[int, str]
) -> Iterator[tuple[dict | None, dict, str, dict[str, int]]]:
    """Yield (canonical row or None, raw record, reason it was rejected, how many values of each
    ``LEFT_OUT_FIELDS`` field the row leaves out) per input row."""
    _refuse_repeated_columns(path, df.attrs.get(_HEADER) or [c for c in df.columns if c != _MALFORMED])
    cols = {_column_key(c): c for c in df.columns if c != _MALFORMED}
    id_col = _pick(cols, _ID_COLUMNS)
    if not id_col:
        raise MetadataError(
            f"{path}: no video id column; expected one of {list(_ID_COLUMNS)} (found {list(cols.values())}). "
            "Rename the id or URL column to one of those, then run the same command again."
        )
    title_col = _pick(cols, _TITLE_COLUMNS if fmt != "ytdlp" else ("title", "fulltitle"))
    tag_col = _pick(cols, _TAG_COLUMNS)
    cat_col = _pick(cols, _CATEGORY_COLUMNS)
    chan_id_col = _pick(cols, _CHANNEL_ID_COLUMNS)
    chan_title_col = _pick(cols, _CHANNEL_TITLE_COLUMNS)
    pub_col = _pick(cols, _PUBLISH_COLUMNS)
    trend_col = cols.get("trending_date")
    extractor_col = _pick(cols, _EXTRACTOR_COLUMNS)
    for raw in df.to_dict(orient="records"):
        malformed = _malformed(raw)
        if malformed is not None:
            yield None, malformed[1], malformed[0], {}
            continue
        site = _other_site(raw, extractor_col)
        if site is not None:
            yield None, _as_given(raw), f"not a YouTube video (yt-dlp extractor {site!r})", {}
            continue
        vid = _video_id(raw, id_col)
        if vid is None:
            yield None, _as_given(raw), "invalid video id", {}
            continue
        cid, name, category_left_out = _category(raw, cat_col, table)
        tags, not_tags = tag_items(_first(raw, tag_col))
        kept_tags, blank_tags = youtube.read_tags(tags)  # the texts of the items: each read once
        row = {
            "video_id": vid,
            "title": youtube.clean_title(_first(raw, title_col)),
            "tags": kept_tags,
            "category_id": cid,
            "category_name": name,
            "channel_id": str(_first(raw, chan_id_col) or "").strip(),
            "channel_title": youtube.clean_title(_first(raw, chan_title_col)),
            "publish_time": _ytdlp_publish(_first(raw, pub_col)),
            "trending_date": _kaggle_date(_first(raw, [trend_col] if trend_col else [])),
        }
        left_out = {"tags": not_tags, BLANK_TAGS: blank_tags, "category_id": int(category_left_out)}
        yield row, raw, "", left_out


# Every column name the readers take a field from (as ``_column_key`` writes it).
_READ_COLUMNS = frozenset(
    (
        *_ID_COLUMNS, *_TITLE_COLUMNS, "fulltitle", *_TAG_COLUMNS, *_CATEGORY_COLUMNS, *_CHANNEL_ID_COLUMNS,
        *_CHANNEL_TITLE_COLUMNS, *_PUBLISH_COLUMNS, "trending_date", *_EXTRACTOR_COLUMNS,
    )
)  # fmt: skip


# The keys of a JSON record that are kept once it is read: those a field is read from, those
# ``detect_format`` looks at, and those ``_videos`` writes for a playlist's null entry or an API
# item that is no object. A yt-dlp ``--dump-json`` record also carries its formats, thumbnails and
# captions, hundreds of KB a video: all kept, a dump of some ten thousand videos took tens of GB.
_JSON_KEPT_KEYS = _READ_COLUMNS | _YTDLP_MARKERS | {"playlist_id", "playlist_index", "entry", "api_item"}


def _refuse_repeated_columns(path: str, header: Sequence[object]) -> None:
    """One line when two columns the readers take have one name (``id,title,title``, or
    ``title`` beside ``Title``): only one of them could be read, and the other was dropped
    without a word (pandas renamed it ``title.1``; two names of one key kept the last)."""
    seen: dict[str, list[tuple[int, str]]] = {}
    for position, name in enumerate(header, 1):
        seen.setdefault(_column_key(name), []).append((position, str(name)))
    for key, found in seen.items():
        if key in _READ_COLUMNS and len(found) > 1:
            where = ", ".join(f"{name!r} at position {position}" for position, name in found)
            raise MetadataError(
                f"{path}: column {key!r} is given {len(found)} times ({where}) and only one would be read. "
                "Keep one (merge their values into it) or rename the others, then run the same command again."
            )


def _completeness(row: dict) -> int:
    return sum(1 for k in FIELDS if row.get(k) not in (None, "", []))


def _collapse(rows: list[tuple[int, dict]]) -> dict:
    """One row per id: the newest (trending date, then input order), gaps filled from the others
    (most complete wins among the rest)."""
    ordered = sorted(rows, key=lambda t: (t[1]["trending_date"], t[0]), reverse=True)
    best = dict(ordered[0][1])
    for _, other in sorted(ordered[1:], key=lambda t: _completeness(t[1]), reverse=True):
        for key in FIELDS:
            if best.get(key) in (None, "", []) and other.get(key) not in (None, "", []):
                best[key] = other[key]
    return best


class _RecordSource:
    """Where records of ``path`` start (``file.csv:6``, or ``file.parquet row 2``), written into
    ``holder[key]``: the records asked for are noted while the file is read (``note``), and their
    lines found in one pass over the file once it is read (``resolve``), keeping those lines only."""

    def __init__(self, path: str, records: int):
        self.path, self.records = path, records
        self.wanted: list[tuple[int, dict, str]] = []

    def note(self, index: int, holder: dict, key: str) -> None:
        holder[key] = f"{self.path} row {index + 1}"  # what it stays when the file has no lines
        self.wanted.append((index, holder, key))

    def resolve(self) -> None:
        if not self.wanted:
            return
        lines = _record_lines(self.path, self.records, {index for index, _, _ in self.wanted})
        if lines is not None:
            for index, holder, key in self.wanted:
                holder[key] = f"{self.path}:{lines[index]}"


def _count_left_out(
    result: MetadataResult, left_out: dict[str, int], where: _RecordSource, index: int
) -> None:
    for name, count in left_out.items():
        if count:
            result.values_left_out[name] = result.values_left_out.get(name, 0) + count
            if name not in result.first_left_out:
                where.note(index, result.first_left_out, name)


def describe_left_out(result: MetadataResult) -> str | None:
    """One line counting the values kept rows were built without (``values_left_out``), with where
    the first of each kind is; None when there are none."""
    kinds = {
        "tags": "tags item(s) that are no tag (true, 1.5, a nested list or an object)",
        "category_id": "category value(s) that are no category id or name (negative, fractional, true)",
        BLANK_TAGS: 'tags item(s) blank or of invisible characters only ("", "\\u200b")',
    }
    found = [
        f"{count} {kinds[name]}, the first at {result.first_left_out[name]}"
        for name, count in result.values_left_out.items()
        if count
    ]
    if not found:
        return None
    return (
        f"[dataset_tools] values left out of kept rows: {'; '.join(found)} "
        "(values_left_out in summary.json; fix them in the input to keep them)"
    )


def read_metadata(
    inputs: Sequence[str], input_format: str = "auto", categories_json: str | None = None
) -> MetadataResult:
    """Read every input file, normalise ids, collapse duplicates (order of first appearance kept)."""
    if input_format not in FORMATS:
        raise MetadataError(f"--input-format {input_format!r}: choose one of {FORMATS}")
    explicit_table = load_category_table(categories_json)
    result = MetadataResult(rows=[])
    by_id: dict[str, list[tuple[int, dict]]] = {}
    counter = 0
    for path in expand_inputs(inputs):
        df = _read_table(path)
        fmt = input_format
        if fmt == "auto":
            fmt = detect_format(path, list(df.columns))
        elif fmt == "jsonl":
            fmt = "csv"  # generic columns, JSON lines container
        result.formats[path] = fmt
        table = explicit_table or load_category_table(_sibling_category_json(path))
        where = _RecordSource(path, len(df))
        for index, (row, record, reason, left_out) in enumerate(_canonical_rows(path, df, fmt, table)):
            result.input_rows += 1
            if row is None:
                rejection = {"source": "", "reason": reason, "record": record}
                where.note(index, rejection, "source")
                result.rejected.append(rejection)
                continue
            _count_left_out(result, left_out, where, index)
            counter += 1
            by_id.setdefault(row["video_id"], []).append((counter, row))
        where.resolve()
    for _vid, rows in by_id.items():
        result.duplicates += len(rows) - 1
        result.rows.append(_collapse(rows))
    return result
