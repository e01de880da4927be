"""Review of the metadata readers against real-world input files: headers written by spreadsheets,
damaged parquet and gzip files, archives and other compressions (real files on disk, the real
``python -m dataset_tools build`` entry point for the error lines)."""

import bz2
import gzip
import json
import lzma
import zipfile

import pandas as pd
import pytest

from dataset_tools import cli
from dataset_tools.metadata import read_metadata

VID = "dQw4w9WgXcQ"
CSV = f"video_id,title\n{VID},hello\n".encode()


def _build_error(tmp_path, path, capsys) -> str:
    """The stderr of a build of ``path``, which must stop with exit 2 and one line."""
    code = cli.main(["build", "--input", str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_headers_with_spaces_around_or_inside_and_any_case_find_their_columns(tmp_path):
    # Matched as written, " video_id" and "Video ID" stopped the build with "no video id column".
    (tmp_path / "a.csv").write_text(f" Video ID , Title ,Channel Title\n{VID},hello,chan\n")
    (tmp_path / "USvideos.csv").write_text(
        "video_id, trending_date ,title\nabcdefghijk,18.01.02,old\nabcdefghijk,18.02.02,new\n"
    )
    result = read_metadata([str(tmp_path / "a.csv"), str(tmp_path / "USvideos.csv")])
    rows = {row["video_id"]: row for row in result.rows}
    assert rows[VID]["title"] == "hello" and rows[VID]["channel_title"] == "chan"
    # " trending_date " is the Kaggle column: its 2017 YY.DD.MM dates pick the newest duplicate.
    assert result.formats[str(tmp_path / "USvideos.csv")] == "kaggle"
    assert rows["abcdefghijk"]["title"] == "new" and rows["abcdefghijk"]["trending_date"] == "2018-02-02"
    assert result.rejected == []


def test_a_damaged_parquet_or_another_file_named_parquet_is_one_error_line(tmp_path, capsys):
    good = tmp_path / "good.parquet"
    pd.DataFrame({"video_id": [VID], "title": ["hello"]}).to_parquet(good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[:-20])  # an interrupted copy: no footer
    assert "cut.parquet: not a readable parquet file" in _build_error(tmp_path, cut, capsys)
    other = tmp_path / "table.parquet"
    other.write_bytes(CSV)
    assert "table.parquet: not a readable parquet file" in _build_error(tmp_path, other, capsys)


def _zip_bytes(tmp_path) -> bytes:
    with zipfile.ZipFile(tmp_path / "archive.zip", "w") as zf:
        zf.writestr("USvideos.csv", CSV)
    return (tmp_path / "archive.zip").read_bytes()


@pytest.mark.parametrize(
    "name, pack, says",
    [
        ("USvideos.csv.zip", _zip_bytes, "a ZIP archive"),
        ("videos.csv.bz2", lambda _: bz2.compress(CSV), "bzip2-compressed"),
        ("videos.jsonl.xz", lambda _: lzma.compress(json.dumps({"id": VID}).encode()), "xz-compressed"),
        ("videos.csv.zst", lambda _: bytes.fromhex("28b52ffd") + b"\x00" * 8, "zstd-compressed"),
        ("videos.csv", lambda _: gzip.compress(CSV), "gzip data without a .gz name"),
        ("videos.csv.gz", lambda _: gzip.compress(gzip.compress(CSV)), "gzip data inside gzip data"),
    ],
)
def test_archives_and_other_compressions_are_one_line_naming_what_they_are(
    tmp_path, capsys, name, pack, says
):
    # Read as text they stopped the build with "no video id column ... found ['PK\x03\x04...']".
    path = tmp_path / name
    path.write_bytes(pack(tmp_path))
    err = _build_error(tmp_path, path, capsys)
    assert f"{name}: {says}" in err and "no video id column" not in err


def test_a_gzip_file_cut_short_or_a_plain_file_named_gz_is_one_error_line(tmp_path, capsys):
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(gzip.compress(CSV)[:-12])  # an interrupted download
    assert "cut.csv.gz: damaged gzip data" in _build_error(tmp_path, cut, capsys)
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps({"id": VID}) + "\n")
    assert "plain.jsonl.gz: damaged gzip data" in _build_error(tmp_path, plain, capsys)
    whole = tmp_path / "whole.csv.gz"
    whole.write_bytes(gzip.compress(CSV))
    assert [row["video_id"] for row in read_metadata([str(whole)]).rows] == [VID]


def test_youtube_data_api_list_responses_give_their_videos(tmp_path):
    # A videos.list page (pretty-printed), search.list and playlistItems.list pages as JSON lines:
    # each page was one record without a video id column and stopped the build.
    snippet = {"title": "Live &amp; loud", "tags": ["rock", "live"], "categoryId": "10", "channelId": "UCx"}
    videos = {"kind": "youtube#videoListResponse", "items": [{"id": VID, "snippet": snippet}]}
    (tmp_path / "videos.json").write_text(json.dumps(videos, indent=2))
    search = {
        "kind": "youtube#searchListResponse",
        "items": [
            {"id": {"kind": "youtube#video", "videoId": "abcdefghijk"}, "snippet": {"title": "found"}},
            {"id": {"kind": "youtube#channel", "channelId": "UCy"}, "snippet": {"title": "a channel"}},
        ],
    }
    playlist = {
        "kind": "youtube#playlistItemListResponse",
        "items": [
            {"id": "UExpdGVtMQ", "snippet": {"title": "in list", "resourceId": {"videoId": "-bcdefghijk"}}}
        ],
    }
    (tmp_path / "pages.jsonl").write_text(json.dumps(search) + "\n" + json.dumps(playlist) + "\n")
    result = read_metadata([str(tmp_path / "videos.json"), str(tmp_path / "pages.jsonl")])
    rows = {row["video_id"]: row for row in result.rows}
    assert rows[VID]["title"] == "Live & loud" and rows[VID]["tags"] == ["rock", "live"]
    assert rows[VID]["category_name"] == "Music" and rows[VID]["channel_id"] == "UCx"
    assert rows["abcdefghijk"]["title"] == "found" and rows["-bcdefghijk"]["title"] == "in list"
    assert result.input_rows == 4 and len(result.rows) == 3
    # The channel result is no video: rejected with the line of its page, not dropped.
    [rejected] = result.rejected
    assert rejected["source"].endswith("pages.jsonl:1") and rejected["reason"] == "invalid video id"


def test_ndjson_files_are_json_lines_named_or_in_a_folder(tmp_path):
    """.ndjson (newline-delimited JSON, as BigQuery exports and many scrapers name JSON lines) was
    read as a CSV: the build stopped on "no video id column ... found ['{"id": ...']", and a folder
    given as --input skipped such files without a word."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.ndjson").write_text(json.dumps({"id": VID, "title": "plain"}) + "\n")
    with gzip.open(folder / "b.NDJSON.gz", "wt") as f:
        f.write(json.dumps({"id": "abcdefghijk", "title": "zipped"}) + "\n")
    result = read_metadata([str(folder)])
    assert sorted(row["title"] for row in result.rows) == ["plain", "zipped"]
    assert read_metadata([str(folder / "a.ndjson")]).rows[0]["video_id"] == VID


def test_a_bom_before_a_header_of_a_file_read_as_windows_1252_names_the_column(tmp_path):
    """A UTF-8 byte order mark, then a header, in a file with a byte that is not UTF-8 (a title
    written in Windows-1252): read as Windows-1252, the mark became part of the first column's name
    ("ï»¿video_id") and the build stopped on "no video id column"."""
    path = tmp_path / "a.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo_id,title\n" + VID.encode() + b",caf\xe9 \x93quoted\x94\n")
    (row,) = read_metadata([str(path)]).rows
    assert row["video_id"] == VID and row["title"] == "café “quoted”"
