"""Metadata parsing: every input format with its quirks, id normalisation, duplicates."""

import json
import os

import pandas as pd
import pytest

from dataset_tools import metadata, youtube

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "dataset_tools")


@pytest.mark.parametrize(
    "value,expected",
    [
        ("dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("  dQw4w9WgXcQ ", "dQw4w9WgXcQ"),
        ("https://www.youtube.com/watch?v=dQw4w9WgXcQ&list=PL1&t=42s", "dQw4w9WgXcQ"),
        ("https://m.youtube.com/watch?feature=share&v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://youtu.be/dQw4w9WgXcQ?si=x", "dQw4w9WgXcQ"),
        ("youtube.com/shorts/dQw4w9WgXcQ?feature=share", "dQw4w9WgXcQ"),
        ("https://www.youtube-nocookie.com/embed/-_-_-_-_-_-?start=3", "-_-_-_-_-_-"),
        ("https://music.youtube.com/watch?v=dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://www.youtube.com/live/dQw4w9WgXcQ", "dQw4w9WgXcQ"),
        ("https://example.com/watch?v=dQw4w9WgXcQ", None),
        ("https://www.youtube.com/watch?v=short", None),
        ("dQw4w9WgXc", None),
        ("", None),
        (None, None),
        ("two words!!", None),
    ],
)
def test_normalize_video_id(value, expected):
    assert youtube.normalize_video_id(value) == expected


def test_tags_titles_categories():
    assert youtube.parse_tags('last week|"john oliver"|"hbo"') == ["last week", "john oliver", "hbo"]
    assert (
        youtube.parse_tags("[none]") == [] and youtube.parse_tags("") == [] and youtube.parse_tags(None) == []
    )
    assert youtube.parse_tags(["a", "a", " b "]) == ["a", "b"]
    assert youtube.parse_tags('["x", "y"]') == ["x", "y"]
    assert youtube.clean_title("Tom &amp;amp; Jerry\n  &#39;s\u00a0show ") == "Tom & Jerry 's show"
    assert youtube.category_name(24) == "Entertainment"
    assert youtube.category_name(24, {24: "Other"}) == "Other"
    assert youtube.category_id_from_name("Comedy") == 23  # the assignable one, not 34
    assert youtube.parse_category_id("24.0") == 24 and youtube.parse_category_id("x") is None


def _by_id(result):
    return {r["video_id"]: r for r in result.rows}


def test_kaggle_2017_schema_with_quirks():
    res = metadata.read_metadata([os.path.join(FIX, "USvideos.csv")])
    assert res.formats[os.path.join(FIX, "USvideos.csv")] == "kaggle"
    assert res.input_rows == 6 and res.duplicates == 1
    assert [r["reason"] for r in res.rejected] == ["invalid video id"]  # reported, not silently lost
    rows = _by_id(res)
    assert set(rows) == {"2kyS6SvSYSE", "1ZAPwfrtAFY", "5qpjK5DgCt4", "d380meD0W0M"}
    casey = rows["2kyS6SvSYSE"]
    # Newest trending day wins (17.15.11 = 2017-11-15, YY.DD.MM).
    assert casey["title"] == "WE WANT TO TALK ABOUT OUR MARRIAGE (updated)"
    assert casey["trending_date"] == "2017-11-15" and casey["tags"] == ["SHANtell martin", "shantell"]
    assert rows["5qpjK5DgCt4"]["title"] == "Racist Superman | Rudy Mancuso & King Bach"
    assert rows["1ZAPwfrtAFY"]["tags"][:2] == [
        "last week tonight trump presidency",
        "last week tonight donald trump",
    ]
    assert rows["d380meD0W0M"]["tags"] == []
    # The sibling US_category_id.json wins over the built-in table.
    assert rows["1ZAPwfrtAFY"]["category_id"] == 24
    assert rows["1ZAPwfrtAFY"]["category_name"] == "Entertainment (US)"
    assert casey["channel_title"] == "CaseyNeistat"


def test_kaggle_new_schema_dedup_fills_gaps():
    res = metadata.read_metadata([os.path.join(FIX, "trending_new.csv")], categories_json=None)
    rows = _by_id(res)
    assert res.formats[os.path.join(FIX, "trending_new.csv")] == "kaggle" and res.duplicates == 1
    apex = rows["M9Pmf9AB4Mo"]
    assert apex["trending_date"] == "2020-08-13"  # newest
    assert apex["tags"][0] == "Apex Legends"  # newest row had no tags: filled from the older row
    assert apex["category_name"] == "Gaming" and apex["channel_id"] == "UC0ZV6M2THA81QT9hrVWJG3A"
    assert apex["title"] == "Apex Legends | Stories from the Outlands – “The Endorsement”"
    assert rows["3C66w5Z0ixs"]["publish_time"] == "2020-08-11T19:20:14Z"


def test_tsv_with_url_forms():
    res = metadata.read_metadata([os.path.join(FIX, "links.tsv")], "csv")
    rows = _by_id(res)
    assert set(rows) == {"dQw4w9WgXcQ", "9bZkp7q19f0", "abcdefghijk", "-_-_-_-_-_-", "ABCDEFGHIJK"}
    assert rows["dQw4w9WgXcQ"]["title"] == "Never Gonna Give You Up"
    assert rows["dQw4w9WgXcQ"]["tags"] == ["music", "80s"] and rows["9bZkp7q19f0"]["tags"] == []
    assert len(res.rejected) == 1 and "example.com" in json.dumps(res.rejected[0])


def test_jsonl_and_parquet(tmp_path):
    res = metadata.read_metadata([os.path.join(FIX, "videos.jsonl")])
    rows = _by_id(res)
    assert rows["AAAAAAAAAAA"]["title"] == "Cats & dogs compilation"
    assert rows["AAAAAAAAAAA"]["tags"] == ["cat", "dog"]
    assert rows["AAAAAAAAAAA"]["category_id"] == 15  # from the category *name*
    assert rows["BBBBBBBBBBB"]["category_name"] == "Education" and rows["BBBBBBBBBBB"]["tags"] == ["a", "b"]
    assert len(res.rejected) == 1
    path = tmp_path / "v.parquet"
    pd.DataFrame(
        {
            "url": ["https://youtu.be/AAAAAAAAAAA", "EEEEEEEEEEE"],
            "title": ["x", "y"],
            "tags": [["t1", "t2"], []],
        }
    ).to_parquet(path)
    rows = _by_id(metadata.read_metadata([str(path)]))
    assert rows["AAAAAAAAAAA"]["tags"] == ["t1", "t2"] and rows["EEEEEEEEEEE"]["tags"] == []


def test_ytdlp_dump_json():
    path = os.path.join(FIX, "ytdlp.jsonl")
    res = metadata.read_metadata([path])
    assert res.formats[path] == "ytdlp"
    rows = _by_id(res)
    bread = rows["CCCCCCCCCCC"]
    assert bread["category_id"] == 26 and bread["category_name"] == "Howto & Style"
    assert bread["channel_title"] == "Bake Channel" and bread["publish_time"] == "2024-01-02"
    assert rows["DDDDDDDDDDD"]["channel_title"] == "Uploader" and rows["DDDDDDDDDDD"]["category_id"] == 42


def test_several_inputs_collapse_across_files(tmp_path):
    extra = tmp_path / "more.csv"
    extra.write_text("video_id,title\n2kyS6SvSYSE,Casey again\nZZZZZZZZZZZ,New one\n")
    res = metadata.read_metadata([os.path.join(FIX, "USvideos.csv"), str(extra)])
    assert len(res.rows) == 5 and res.duplicates == 2


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="--input matched no readable file"):
        metadata.read_metadata([str(tmp_path / "nope.csv")])
    bad = tmp_path / "nocol.csv"
    bad.write_text("foo,bar\n1,2\n")
    with pytest.raises(ValueError, match="no video id column"):
        metadata.read_metadata([str(bad)])
    with pytest.raises(ValueError, match="--input-format"):
        metadata.read_metadata([str(bad)], "xml")
