"""build, tenth review: a JSON metadata object that gives a key twice.

``json.loads`` keeps a repeated key's last value, so ``{"title": "a", "title": "b"}`` was read as
title "b" without a word, while a CSV that gives a column twice stops the build in one line.

Runtime: ~2 s (metadata reading only, no download).
"""

import os

import pytest

from dataset_tools import metadata
from dataset_tools.cli import main

ID = "okokokokok1"


@pytest.mark.parametrize(
    "name,text,where,key",
    [
        # one JSON line per video (yt-dlp --dump-json)
        ("a.jsonl", '{"id": "V1", "title": "ok"}\n{"id": "V2", "title": "a", "title": "b"}\n', 2, "title"),
        # a JSON array of videos, the element spread over lines: its first line is named
        ("a.json", '[\n {"id": "V1",\n  "tags": "x", "tags": "y"}\n]\n', 2, "tags"),
        # a pretty-printed yt-dlp -J playlist: the entry belongs to the one object starting on line 2
        ("p.json", '\n{"_type": "playlist", "entries": [\n{"id": "V1", "title": "a", "title": "b"}]}\n', 2,
         "title"),
        # a Data API page: the repeated key is inside the item's snippet
        ("api.jsonl", '{"kind": "youtube#videoListResponse", "items": [{"id": "V1", "snippet": '
         '{"title": "a", "title": "b"}}]}\n', 1, "title"),
        # the id itself given twice: which video the row is depends on it
        ("id.jsonl", '{"id": "V1", "id": "V2"}\n', 1, "id"),
    ],
    ids=["jsonl-line", "array-element", "playlist-entry", "api-snippet", "id"],
)  # fmt: skip
def test_a_read_key_given_twice_in_one_object_is_one_line_naming_it(tmp_path, name, text, where, key):
    path = tmp_path / name
    path.write_text(text.replace("V1", ID).replace("V2", "okokokokok2"))
    with pytest.raises(metadata.MetadataError) as err:
        metadata.read_metadata([str(path)])
    message = str(err.value)
    assert message.startswith(f"{path}:{where}: key {key!r} is given 2 times in one object"), message
    assert "only the last would be read" in message and "\n" not in message


def test_keys_not_read_or_nested_may_repeat(tmp_path):
    """Like the CSV check, only the keys the readers take count: a repeated key they never read,
    or one inside a nested object (a yt-dlp format's ``url``), changes nothing that is built."""
    path = tmp_path / "v.jsonl"
    nested = '"formats": [{"url": "u", "url": "v"}]'
    path.write_text(f'{{"id": "{ID}", "title": "t", "view_count": 1, "view_count": 2, {nested}}}\n')
    result = metadata.read_metadata([str(path)])
    assert [(r["video_id"], r["title"]) for r in result.rows] == [(ID, "t")]
    assert result.rejected == []


def test_build_stops_on_it_before_writing_shards(tmp_path, capsys):
    """Through ``build``: exit 2 with one ``error:`` line, as for a CSV column given twice, and no
    plan or shard written from a title that was half the input's."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out"
    inp.write_text(f'{{"id": "{ID}", "title": "first", "title": "second"}}\n')
    assert main(["build", "--input", str(inp), "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {inp}:1: key 'title' is given 2 times in one object and only the last would be read. "
        "Keep one (merge their values into it) or rename the others, then run the same command again."
    )
    assert not os.path.exists(out / "_build" / "plan.parquet")
    assert [n for n in os.listdir(out) if n != "_build"] == []
