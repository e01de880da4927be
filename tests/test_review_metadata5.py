"""Metadata reader, fifth review: tags texts that are blank or invisible are counted; a JSON array
(or objects over many lines) is read a block at a time, a value cut by a block's end included; the
lines of rejected records are found in one streaming pass that keeps only those lines.

Runtime: ~15 s on 2 busy cores (a 24 MB JSON array and a 20 MB CSV read under tracemalloc).
"""

from __future__ import annotations

import json

import pytest
from test_review_metadata4 import _peak_bytes

from dataset_tools import metadata

A, B, C = "aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc"


def test_blank_and_invisible_tags_texts_are_counted_apart(tmp_path):
    # A tag "\u200b" (or "", " ", "&#8203;") is left out of the shards; it was counted nowhere.
    table = tmp_path / "videos.csv"
    table.write_text(f"video_id,tags\n{A},a|b\n{B},cats\u200b|\u200b|\ufeffMusic\n", encoding="utf-8")
    lines = tmp_path / "videos.jsonl"
    lines.write_text(json.dumps({"id": C, "tags": ["x", "", " ", "\u2060", "&#8203;", True]}) + "\n")
    result = metadata.read_metadata([str(table), str(lines)])
    assert {r["video_id"]: r["tags"] for r in result.rows} == {A: ["a", "b"], B: ["cats", "Music"], C: ["x"]}
    # "tags" keeps counting items of another type (true): blank texts have their own count.
    assert result.values_left_out == {"tags": 1, "category_id": 0, "blank_tags": 5}
    assert result.first_left_out == {"blank_tags": f"{table}:3", "tags": f"{lines}:1"}
    line = metadata.describe_left_out(result)
    assert "5 tags item(s) blank or of invisible characters only" in line and f"{table}:3" in line


def test_no_blank_tags_text_is_no_count(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text(f"video_id,tags\n{A},a|b\n{B},\n{C},[none]\n")
    assert metadata.read_metadata([str(path)]).values_left_out == {"tags": 0, "category_id": 0}


def _array_text(records: list[dict], indent: int | None) -> str:
    return json.dumps(records, indent=indent, ensure_ascii=indent is None)  # escaped, or not


RECORDS = [
    {"id": A, "title": 'caf\u00e9 "quoted" \\ \u2028 \U0001f600', "view_count": 123456789, "tags": ["a"]},
    {"id": "bad", "title": "rejected", "duration": 1.5e3},
    {"id": B, "title": "x" * 40, "tags": ["b", "\u200b"], "like_count": None, "ok": True},
    {"_type": "playlist", "id": "PL1", "entries": [{"id": C, "title": "in a playlist"}, None]},
]


@pytest.mark.parametrize("block", [1, 7, 1 << 20])
@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_array_read_in_blocks_is_the_array(tmp_path, monkeypatch, block, indent):
    # Every value cut by a block's end somewhere (a 1-character block cuts each token).
    monkeypatch.setattr(metadata, "_JSON_BLOCK", block)
    path = tmp_path / "videos.json"
    path.write_text("\ufeff \n" + _array_text(RECORDS, indent) + "\n\n", encoding="utf-8")
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"]) for r in result.rows] == [
        (A, 'caf\u00e9 "quoted" \\ \U0001f600'),
        (B, "x" * 40),
        (C, "in a playlist"),
    ]  # fmt: skip (the line separator is whitespace to a title)
    text = path.read_text(encoding="utf-8")
    line_of = {key: text[: text.index(f'"{key}"')].count("\n") + 1 for key in ("bad", "_type", B)}
    if indent:  # an element's line is that of its opening brace
        line_of = {key: line - 1 for key, line in line_of.items()}
    assert [(r["source"], r["reason"][:12]) for r in result.rejected] == [
        (f"{path}:{line_of['bad']}", "invalid vide"),
        (f"{path}:{line_of['_type']}", "invalid vide"),  # the null entry: its playlist's line
    ]
    assert result.first_left_out == {"blank_tags": f"{path}:{line_of[B]}"}


@pytest.mark.parametrize(
    "text, where, says",
    [
        ('[\n {"id": "aaaaaaaaaaa"},\n {"id": "bbbbbbbbbbb", "title": }\n]\n', ":3:", "not valid JSON"),
        ('[\n {"id": "aaaaaaaaaaa"}\n {"id": "bbbbbbbbbbb"}\n]\n', ":3:", "Expecting ','"),
        ('[\n {"id": "aaaaaaaaaaa"},\n {"id": "bbbbbbbbbbb"}\n', ":4:", "no closing ]"),
        ('[\n {"id": "aaaaaaaaaaa"}\n]\n{"id": 1}\n', ":4:", "Extra data"),
        ('[\n {"id": "aaaaaaaaaaa"},\n\n 5\n]', ":4:", "array element 2 is a number, not an object"),
        ('{\n "id": "aaaaaaaaaaa"\n}\n"text"\n', ":4:", "a string, not an object"),
        ('[{"id": "aaaaaaaaaaa", "title": "cut', ":1:", "Unterminated string"),
    ],
)  # fmt: skip
def test_a_malformed_json_array_names_its_line(tmp_path, monkeypatch, text, where, says):
    monkeypatch.setattr(metadata, "_JSON_BLOCK", 5)
    path = tmp_path / "videos.json"
    path.write_text(text)
    with pytest.raises(metadata.MetadataError) as err:
        metadata.read_metadata([str(path)])
    message = str(err.value)
    assert message.startswith(f"{path}{where}") and says in message and "\n" not in message


def test_pretty_printed_objects_one_after_another_are_read(tmp_path):
    # `jq . dump.jsonl` writes each object over many lines: it stopped with "not a JSON line".
    path = tmp_path / "pretty.json"
    path.write_text("".join(json.dumps(r, indent=2) + "\n" for r in RECORDS))
    result = metadata.read_metadata([str(path)])
    assert [r["video_id"] for r in result.rows] == [A, B, C]
    text = path.read_text()
    opening = [text[: text.index(f'"{key}"')].count("\n") for key in ("bad", "_type")]
    assert [r["source"] for r in result.rejected] == [f"{path}:{line}" for line in opening]


def test_a_large_json_array_is_read_a_block_at_a_time(tmp_path):
    # Read whole, a 2 GB dump was its text and every record parsed from it (formats and all) at
    # once; a rejection then read the text and parsed it again to find the record's line.
    formats = [{"format_id": str(n), "url": "https://example.invalid/" + "x" * 400} for n in range(24)]
    path = tmp_path / "dump.json"
    with open(path, "w") as fh:
        fh.write("[\n")
        for n in range(2000):
            fh.write(json.dumps({"id": f"{n:011d}", "title": f"t{n}", "formats": formats}, indent=1) + ",\n")
        fh.write(json.dumps({"id": "bad", "formats": formats}) + "\n]\n")
    size = path.stat().st_size
    result, peak = _peak_bytes(metadata.read_metadata, [str(path)])
    assert len(result.rows) == 2000 and result.rejected[0]["source"].startswith(f"{path}:")
    assert peak < size / 2, (peak, size)  # the old reader: 2.6 times the size


def test_rejected_csv_rows_find_their_lines_without_holding_the_file(tmp_path):
    # One rejected row read every line of the CSV into a list (and kept a line per record).
    path = tmp_path / "big.csv"
    with open(path, "w") as fh:
        fh.write("video_id,title,description\n")
        fh.write('bad,"a title\nover two lines",x\n')
        for n in range(2000):
            fh.write(f"{n:011d},t{n},{'d' * 10_000}\n")
    (bad,) = metadata.read_metadata([str(path)]).rejected
    assert bad["source"] == f"{path}:2"
    lines, peak = _peak_bytes(metadata._record_lines, str(path), 2001, {0, 2000})
    assert lines == {0: 2, 2000: 2003} and peak < 4 * 10_000 * 10, peak  # the old lookup: 20 MB
