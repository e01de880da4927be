"""Metadata reader, third review: values a kept row leaves out are counted, a header's separator
wins over the file's name, and dates an integer column with a gap wrote as floats read as dates.

Runtime: ~8 s on 2 busy cores (one real build against the loopback fake host, one process).
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from small_builds import build_args

from dataset_tools import metadata
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

A, B, C, D = "aaaaaaaaaaa", "bbbbbbbbbbb", "ccccccccccc", "ddddddddddd"


def _by_id(result: metadata.MetadataResult) -> dict[str, dict]:
    return {row["video_id"]: row for row in result.rows}


def test_tag_items_and_category_values_left_out_are_counted_with_where(tmp_path):
    # A tags item that is no tag and a category value that is no category were dropped without a
    # count anywhere, and a fractional category id was cut to a real one (24.5 became 24).
    table = tmp_path / "videos.csv"
    table.write_text(
        f"video_id,title,category_id\n{A},fine,24\n{B},negative,-1\n{C},fractional,24.5\n{D},missing,nan\n"
    )
    lines = tmp_path / "videos.jsonl"
    lines.write_text(
        json.dumps({"id": "eeeeeeeeeee", "tags": ["ok"], "categories": ["Music"]}) + "\n"
        + json.dumps({"id": "fffffffffff", "tags": ["a", True, 1.5, ["x"], None], "categories": [True]})
        + "\n"
    )  # fmt: skip
    result = metadata.read_metadata([str(table), str(lines)])
    rows = _by_id(result)
    assert rows[A]["category_id"] == 24 and rows[C]["category_id"] is None and rows[D]["category_id"] is None
    assert rows["fffffffffff"]["tags"] == ["a"] and rows["fffffffffff"]["category_name"] == ""
    assert rows["eeeeeeeeeee"]["category_id"] == 10
    assert result.values_left_out == {"tags": 3, "category_id": 3}
    assert result.first_left_out == {"category_id": f"{table}:3", "tags": f"{lines}:2"}
    line = metadata.describe_left_out(result)
    assert "\n" not in line and "3 tags item(s)" in line and "3 category value(s)" in line
    assert f"{table}:3" in line and f"{lines}:2" in line


def test_nothing_left_out_is_no_line(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text(f"video_id,tags,category_id\n{A},a|b,24\n{B},,Some name\n")
    result = metadata.read_metadata([str(path)])
    assert result.values_left_out == {"tags": 0, "category_id": 0}
    assert metadata.describe_left_out(result) is None
    assert _by_id(result)[B]["category_name"] == "Some name"


def test_the_build_counts_left_out_values_in_summary_and_one_line(tmp_path, capsys):
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    inp.write_text(f'video_id,title,tags,category_id\n{A},one,"[""a"", true]",1e99\n{B},two,x,24\n')
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(build_args(host.url_template, inp, out, "--image-size", "32")) == 0
    summary = json.loads((out / "_build" / "summary.json").read_text())
    assert summary["values_left_out"] == {"tags": 1, "category_id": 1}
    said = [line for line in capsys.readouterr().out.splitlines() if "values left out" in line]
    assert len(said) == 1 and f"{inp}:2" in said[0]


@pytest.mark.parametrize(
    "name, text",
    [
        ("semicolon.csv", "video_id;title;tags\n{A};First, part two;a|b\nbad;x;y\n{B};T;a;extra\n"),
        ("tabs.csv", "video_id\ttitle\ttags\n{A}\tFirst, part two\ta|b\nbad\tx\ty\n{B}\tT\ta\textra\n"),
        ("commas.tsv", 'video_id,title,tags\n{A},"First, part two",a|b\nbad,x,y\n{B},T,a,extra\n'),
        ("bom.csv", "\ufeffVideo ID;Title;Tags\n{A};First, part two;a|b\nbad;x;y\n{B};T;a;extra\n"),
    ],
)  # fmt: skip
def test_the_header_separator_wins_over_the_files_name(tmp_path, name, text):
    # Excel with a decimal comma saves "CSV" with ";", many .csv exports are tab-separated: read
    # with the name's separator the header was one column, and the build stopped on "no video id column".
    path = tmp_path / name
    path.write_text(text.format(A=A, B=B), encoding="utf-8")
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"], r["tags"]) for r in result.rows] == [
        (A, "First, part two", ["a", "b"])
    ]
    assert [(r["source"], r["reason"][:15]) for r in result.rejected] == [
        (f"{path}:3", "invalid video i"),
        (f"{path}:4", "malformed CSV r"),
    ]


def test_a_header_without_an_id_column_under_any_separator_is_still_the_id_error(tmp_path):
    path = tmp_path / "none.csv"
    path.write_text("name;title\nx;y\n")
    with pytest.raises(metadata.MetadataError, match="no video id column"):
        metadata.read_metadata([str(path)])


def test_dates_an_integer_column_with_a_gap_wrote_as_floats_read_as_dates(tmp_path):
    # pandas makes an integer column with a gap floats: parquet gave 20200102.0 and pandas' CSV the
    # text "20200102.0", both kept as that "date" (a trending date sorted after every ISO one).
    parquet = tmp_path / "dates.parquet"
    table = pa.table(
        {
            "video_id": [A, B],
            "upload_date": pa.array([20200102.0, None], pa.float64()),
            "trending_date": pa.array([20200105.0, 20200104.0], pa.float64()),
        }
    )
    pq.write_table(table, parquet)
    text = tmp_path / "dates.csv"
    text.write_text(
        f"video_id,publish_time,trending_date\n{A},20200102.0,2020-01-03\n{C},20191231,20200101.0\n"
    )
    rows = _by_id(metadata.read_metadata([str(parquet), str(text)]))
    assert rows[A]["publish_time"] == "2020-01-02" and rows[A]["trending_date"] == "2020-01-05"
    assert rows[B]["publish_time"] == "" and rows[B]["trending_date"] == "2020-01-04"
    assert rows[C]["publish_time"] == "2019-12-31" and rows[C]["trending_date"] == "2020-01-01"


def test_json_records_keep_only_the_keys_the_readers_take(tmp_path):
    # A yt-dlp --dump-json record carries its formats, thumbnails and captions (hundreds of KB):
    # all were held (and written into a rejection), so a dump of many videos took tens of GB.
    formats = [{"format_id": str(n), "url": "https://example.invalid/" + "x" * 200} for n in range(50)]
    dump = tmp_path / "dump.jsonl"
    dump.write_text(
        "\n"
        + json.dumps({"id": A, "title": "kept", "extractor": "youtube", "formats": formats}) + "\n"
        + json.dumps({"id": "1234", "title": "vimeo", "extractor": "vimeo", "formats": formats}) + "\n"
        + json.dumps({"what": "no key the readers take"}) + "\n"
    )  # fmt: skip
    result = metadata.read_metadata([str(dump)])
    assert result.formats == {str(dump): "ytdlp"}
    assert [(r["video_id"], r["title"]) for r in result.rows] == [(A, "kept")]
    assert [(r["source"], r["record"]) for r in result.rejected] == [
        (f"{dump}:3", {"id": "1234", "title": "vimeo", "extractor": "vimeo"}),
        (f"{dump}:4", {"what": "no key the readers take"}),
    ]
