"""Metadata with one column given twice: ``id,title,title``, two ``tags``, ``title`` beside
``Title``. Only one of them could be read (pandas renamed the second ``title.1``, and two names
of one column kept the last), so the other's values were dropped without a word; now one line
names the column and where it is, before anything is built."""

from __future__ import annotations

import pytest

from dataset_tools import metadata


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("twice.csv", "video_id,title,title\nabcdefghijk,,Real\n", "'title' at position 3"),
        ("tags.tsv", "video_id\ttags\ttags\nabcdefghijk\ta|b\tc|d\n", "'tags' at position 3"),
        ("cased.csv", "Video ID,title,Title\nabcdefghijk,,Real\n", "'Title' at position 3"),
        ("excel.csv", "sep=;\nvideo_id;title;title\nabcdefghijk;;Real title\n", "'title' at position 2"),
        ("quoted.csv", 'video_id,title,title\n"abcdefghijk,Real title\n', "'title' at position 3"),
        ("keys.jsonl", '{"video_id": "abcdefghijk", "title": "", "Title": "R"}\n', "'Title' at position 3"),
    ],
)  # fmt: skip
def test_a_column_given_twice_is_one_line_naming_it(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(metadata.MetadataError) as refused:
        metadata.read_metadata([str(path)])
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: column ") and expected in message
    assert "only one would be read" in message


def test_a_repeated_column_that_is_never_read_is_no_error(tmp_path):
    """Two ``notes`` columns are nobody's business: no field is read from them."""
    path = tmp_path / "notes.csv"
    path.write_text("video_id,title,notes,notes\nabcdefghijk,A title,a,b\n")
    rows = metadata.read_metadata([str(path)]).rows
    assert [(r["video_id"], r["title"]) for r in rows] == [("abcdefghijk", "A title")]
