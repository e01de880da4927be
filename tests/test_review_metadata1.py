"""Inputs as real users hand them over: UTF-16 without a byte order mark, ids pasted from a web
page with invisible characters, and Excel's ``sep=`` first line."""

from __future__ import annotations

import pytest

from dataset_tools import metadata, youtube

ROWS = "video_id,title\nabcdefghijk,Caf\u00e9 night\nbcdefghijkl,Second\nnot-an-id,Third\n"


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_utf16_without_byte_order_mark_is_read_and_rejections_name_their_line(tmp_path, encoding):
    path = tmp_path / "export.csv"
    path.write_bytes(ROWS.replace("\n", "\r\n").encode(encoding))
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"]) for r in result.rows] == [
        ("abcdefghijk", "Caf\u00e9 night"),
        ("bcdefghijkl", "Second"),
    ]
    assert result.input_rows == 3
    assert [(r["source"], r["reason"]) for r in result.rejected] == [(f"{path}:4", "invalid video id")]


@pytest.mark.parametrize(
    "pasted",
    [
        "\u200babcdefghijk",
        "abcdefghijk\ufeff",
        "\u2060abcdefghijk\u00a0",
        "abcdef\u00adghijk",
        "https://youtu.be/abcdefghijk\u200b",
        "\u200bhttps://www.youtube.com/watch?v=abcdefghijk&t=42",
        "https://www.youtube.com/shorts/abcdefghijk\u200b",
        "\ufeffhttps://www.youtube.com/embed/abcdefghijk?autoplay=1",
    ],
)
def test_invisible_characters_around_a_pasted_id_are_ignored(pasted):
    assert youtube.normalize_video_id(pasted) == "abcdefghijk"


def test_invisible_characters_leave_titles_alone_and_bad_ids_rejected(tmp_path):
    path = tmp_path / "pasted.csv"
    path.write_text(
        "video_id,title\n"
        "\u200babcdefghijk\u200b,zero\u200bwidth\n"
        "\u200babcdefghij\u200b,ten characters\n"
        "abcdefghijk!\u200b,bad character\n",
        encoding="utf-8",
    )
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"]) for r in result.rows] == [("abcdefghijk", "zero\u200bwidth")]
    assert result.input_rows == 3
    assert [r["source"] for r in result.rejected] == [f"{path}:3", f"{path}:4"]


@pytest.mark.parametrize("sep", [",", ";", "\t"])
def test_excel_sep_line_names_the_separator(tmp_path, sep):
    path = tmp_path / "excel.csv"
    lines = [f"sep={sep}", f"video_id{sep}title", f"abcdefghijk{sep}One two", f"bad{sep}Rejected"]
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"]) for r in result.rows] == [("abcdefghijk", "One two")]
    assert [r["source"] for r in result.rejected] == [f"{path}:4"]


def test_excel_sep_line_with_a_malformed_row_keeps_line_numbers(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("sep=;\nvideo_id;title\nabcdefghijk;One\nbcdefghijkl;Two;extra\n", encoding="cp1252")
    result = metadata.read_metadata([str(path)])
    assert [r["video_id"] for r in result.rows] == ["abcdefghijk"]
    assert result.input_rows == 2
    assert [r["source"] for r in result.rejected] == [f"{path}:4"]
    assert "malformed CSV row at line 4" in result.rejected[0]["reason"]
