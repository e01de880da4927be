"""One rule for tags across the dataset tools and the trainer: a plain img2dataset shard's tags
string and a built shard's tags list (``youtube.parse_tags``, what `build` writes) come out of split
and dedup as the tags the trainer reads (``tag_text.tag_values``), for pipe-joined, comma-joined,
quoted and entity-laden strings. Real shards, real split and dedup, real pyarrow.

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import os
import unicodedata

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from tar_shards import write_built_shard

from dataset_tools import dedup, split, youtube
from vutrain.tag_text import tag_values, unescape_entities

# A tags string as plain img2dataset keeps it (Kaggle's pipe-joined form, a scraper's comma-joined
# one, quoted tags, HTML entities), by case name.
CASES = {
    "pipe": 'cats|"funny dogs"|x',
    "comma": "Cats, dogs,,x",
    "quoted": "'a', \"b c\"",
    "entities": "&quot;Tom &amp;amp; Jerry&quot;|It&#39;s|&lt;3",
    "quoted_entities": "&quot;tag&quot;,&#39;two words&#39;",
    "none": "[none]",
}

BUILT_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("video_id", pa.string()),
        ("tags", pa.list_(pa.string())),
    ]
)
PLAIN_SCHEMA = pa.schema(
    [("key", pa.string()), ("status", pa.string()), ("url", pa.string()), ("tags", pa.string())]
)


def _mixed_folder(src: str) -> dict[str, tuple[str, str]]:
    """Shard 00000 as `build` writes it (tags a list, ``parse_tags`` of each case's string) and
    shard 00001 as plain img2dataset writes it (the string itself); key -> (kind, case)."""
    os.makedirs(src)
    built, plain, cases = [], [], {}
    for i, (case, text) in enumerate(CASES.items()):
        built.append(
            {
                "key": f"00000{i:04d}",
                "status": "success",
                "video_id": f"vid{i:08d}",
                "tags": youtube.parse_tags(text),
            }
        )
        plain.append({"key": f"00001{i:04d}", "status": "success", "url": f"http://h/{i}.jpg", "tags": text})
        cases[built[-1]["key"]], cases[plain[-1]["key"]] = ("built", case), ("plain", case)
    write_built_shard(src, 0, built, BUILT_SCHEMA)
    write_built_shard(src, 1, plain, PLAIN_SCHEMA)
    return cases


def _output_rows(folders) -> dict[str, dict]:
    rows = {}
    for folder in folders:
        parquets = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".parquet"))
        if parquets:
            rows.update({r["key"]: r for r in ds.dataset(parquets, format="parquet").to_table().to_pylist()})
    return rows


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_plain_and_built_tags_come_out_as_the_tags_the_trainer_reads(tmp_path, command):
    # split and dedup split a plain shard's tags string on "," alone when a built shard in the same
    # folder made the column a list: Kaggle's "cats|funny dogs|x" became the one tag
    # 'cats|"funny dogs"|x' (the trainer reads three from the string) and "[none]" the tag "[none]".
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    cases = _mixed_folder(src)
    if command == "split":
        split.split(src, out, by="hash", val_fraction=0.5)
        folders = [os.path.join(out, "train"), os.path.join(out, "val")]
    else:
        assert dedup.dedup(src, filter_output=out)["kept"] == len(cases)
        folders = [out]
    rows = _output_rows(f for f in folders if os.path.isdir(f))
    assert set(rows) == set(cases)
    read = {cases[key]: tag_values(row["tags"]) for key, row in rows.items()}  # what training reads
    for case, text in CASES.items():
        # The plain sample's output list reads as its input string read; the built one's as
        # `build` cleaned it; the two are the same tags (a plain comma-joined tag keeps the
        # whitespace around it, as the trainer reads the string: ids strip it).
        assert read["plain", case] == tag_values(text), case
        assert read["built", case] == youtube.parse_tags(text), case
        assert [t.strip() for t in read["plain", case]] == read["built", case], case
    assert read["plain", "pipe"] == ["cats", "funny dogs", "x"]
    assert read["plain", "none"] == [] and rows["000010005"]["tags"] == []
    assert read["built", "entities"] == ["Tom & Jerry", "It's", "<3"]


def test_a_plain_tags_string_keeps_its_parts_as_they_are():
    # Split as the trainer splits it, but kept as written: joined, the parts are the string again.
    from dataset_tools.reshard import conform_row

    schema = pa.schema([("tags", pa.list_(pa.string()))])
    for text in CASES.values():
        parts = conform_row({"tags": text}, schema)["tags"]
        assert tag_values(parts) == tag_values(text), text
        if parts:
            assert ("|" if "|" in text else ",").join(parts) == text
    assert conform_row({"tags": "a|b, c"}, schema)["tags"] == ["a", "b, c"]
    assert conform_row({"tags": " NaN "}, schema)["tags"] == []


@pytest.mark.parametrize("text", list(CASES.values()))
def test_parse_tags_decodes_entities_before_stripping_quotes(text):
    # Quotes were stripped before decoding: a built parquet kept '"tag"' for "&quot;tag&quot;",
    # where the trainer reads "tag" from the same string (vocab and inspect showed the quotes).
    tags = youtube.parse_tags(text)
    assert tags == [" ".join(t.split()) for t in tag_values(text)]
    assert not any(t[:1] in "\"'" or t[-1:] in "\"'" for t in tags)


def test_parse_tags_decodes_a_lists_entities_before_stripping_quotes():
    assert youtube.parse_tags(["&quot;tag&quot;", "&#39;x&#39;"]) == ["tag", "x"] == tag_values("\"tag\"|'x'")


def test_clean_title_decodes_entities_as_the_trainer_does():
    for text in ("Tom &amp;amp; Jerry", "&amp;amp;amp;amp;lt;", "It&#39;s &quot;x&quot;", "a & b", "&bogus;"):
        expected = " ".join(unicodedata.normalize("NFC", unescape_entities(text)).split())
        assert youtube.clean_title(text) == expected
