"""Review of the two readers of a ``tags`` field: `dataset_tools build` (``youtube.parse_tags``, read
through the real metadata reader from real CSV and JSON-lines files) and training (``tag_values``
-> ``sample_label``'s tag ids). Items of a list that are no tag (true, 1.5, Infinity, a nested list)
were tags "True", "1.5", "['a', 'b']" in a built shard and no tag in training, and a string
spelling such a list was split on its commas into tags such as '["a"' and 'b"]]'."""

from __future__ import annotations

import csv
import json

from dataset_tools.metadata import read_metadata
from vutrain.data.labels import sample_label, tag_id
from vutrain.tag_text import tag_items, tag_values

# A tags field as written -> the tags both readers take from it.
STRING_CASES = {
    '["cats", ["a", "b"], 1.5, true, null, 2024]': ["cats", "2024"],
    "['cats', ['a', 'b'], 'dogs']": ["cats", "dogs"],
    "['cats', nan, 'dogs']": ["cats", "dogs"],  # pandas' CSV form of a list holding NaN
    "[NaN]": [],
    "[1.5]": [],
    '["a", Infinity]': ["a"],
    "[music, live]": ["music", "live"],  # an unquoted list is still its items
    "[remix] best of [live]": ["[remix] best of [live]"],  # bracketed words are still one tag
}
NATIVE_CASES = [
    (["cats", 1.5, True, ["a", "b"], {"x": 1}, None, float("nan"), 2024.0, 7], ["cats", "2024", "7"]),
    (True, []),
    (5.0, ["5"]),
]


def _trainer_ids(value) -> set[int]:
    return set(sample_label({"tags": value}, "tags"))


def _built_tags(path) -> list[list[str]]:
    return [row["tags"] for row in read_metadata([str(path)]).rows]


def test_a_tags_string_reads_alike_in_the_build_and_in_training(tmp_path):
    """A CSV tags column through the metadata reader gives the tags whose ids training gives the
    same string (a plain img2dataset shard keeps the string as it is)."""
    path = tmp_path / "videos.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video_id", "title", "tags"])
        for i, tags in enumerate(STRING_CASES):
            writer.writerow([f"vid{i:08d}", f"title {i}", tags])
    built = _built_tags(path)
    for (value, expected), tags in zip(STRING_CASES.items(), built, strict=True):
        assert tags == expected, value
        assert {tag_id(t) for t in tags} == _trainer_ids(value), value


def test_a_tags_list_reads_alike_in_the_build_and_in_training(tmp_path):
    """A JSON-lines tags list (and a lone value) through the metadata reader: the items that are no
    tag are left out by both readers (they were the build's tags "1.5", "True", "['a', 'b']",
    "{'x': 1}", "nan"), and 2024.0 is the tag "2024" in both (the build wrote "2024.0")."""
    path = tmp_path / "videos.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i, (tags, _) in enumerate(NATIVE_CASES):
            f.write(json.dumps({"video_id": f"vid{i:08d}", "title": f"title {i}", "tags": tags}) + "\n")
    built = _built_tags(path)
    for (value, expected), tags in zip(NATIVE_CASES, built, strict=True):
        assert tags == expected, value
        assert {tag_id(t) for t in tags} == _trainer_ids(value), value


def test_tag_items_counts_the_items_that_are_no_tag():
    """Nulls and NaN are missing items (not counted, as a missing field is no tags); every other
    item that is no tag is counted, so a caller can report what it left out."""
    assert tag_items('["cats", ["a"], 1.5, true, null, NaN, 2024]') == (["cats", "2024"], 3)
    assert tag_items(["cats", {"x": 1}, None, float("nan"), 3.0]) == (["cats", "3"], 1)
    assert tag_items("cats|dogs") == (["cats", "dogs"], 0)
    assert tag_items(None) == ([], 0) and tag_items(float("nan")) == ([], 0)
    assert tag_values('["cats", ["a", "b"]]') == ["cats"]  # was the tags '["cats"' and '["a"' and 'b"]]'
