"""A tags string that spells a list, read by the trainer as `dataset_tools build` reads it.

pandas writes a list column to CSV as ``['a', 'b']`` (JSON dumps write ``["a", "b"]``), as many
Kaggle YouTube datasets ship their tags; plain img2dataset keeps that string. ``youtube.parse_tags``
reads it as the list it spells; the trainer (``tag_text.tag_values``) split it on "," into the tags
'["a' and 'b"]'. Real tars through the real stream and ``collect_label_values``; real split/dedup
row conforming (``reshard.conform_row``) through a real dedup run.

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from tar_shards import image_bytes, read_captions, write_built_shard, write_members

from dataset_tools import dedup, youtube
from dataset_tools.reshard import conform_row
from vutrain.data.labels import tag_id
from vutrain.data.val import collect_label_values
from vutrain.tag_text import normalize_tag, tag_values

TEMPLATE = "{title}. tags: {tags}"
# By form: the tags string plain img2dataset keeps, and the tags it spells.
FORMS = {
    "json": ('["Tom &amp; Jerry", "cat and mouse"]', ["Tom & Jerry", "cat and mouse"]),
    "python": ("['lofi hip hop', \"it's chill\", 'beats']", ["lofi hip hop", "it's chill", "beats"]),
    "pipe_inside": ('["a|b", "c, d"]', ["a|b", "c, d"]),
    "numbers_and_null": ('[2024, "live", null]', ["2024", "live"]),
    "python_none": ("['x', None]", ["x"]),
    "spaces_only": ("[ ]", []),
    # Not a list: a title-like tag that starts with a bracket stays text, as before.
    "bracketed_text": ("[remix] best of", ["[remix] best of"]),
    "pipe_bracketed": ("[MV]|BTS|Dynamite [MV]", ["[MV]", "BTS", "Dynamite [MV]"]),
    "unquoted": ("[a], b", ["[a]", "b"]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_tag_values_read_a_list_spelling_string_as_parse_tags_does(form):
    """The trainer's tags of the string are the tags `build` writes for it, and the tags it spells."""
    text, tags = FORMS[form]
    assert [t.strip() for t in tag_values(text)] == tags == youtube.parse_tags(text)
    assert tag_values(youtube.parse_tags(text)) == tags


def test_a_bracketed_string_that_is_no_list_of_tags_is_read_as_before():
    # A nested list is a list whose item is no tag (test_review_tags.py: it was split on its commas);
    # bracketed text that is no list keeps its brackets (parse_tags reads it alike since
    # test_review_captions5.py).
    assert tag_values('[["a", "b"]]') == []
    assert tag_values("[remix] best of [live]") == ["[remix] best of [live]"]


def _sample(key: str, meta: dict) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.jpg", image_bytes()),
        (f"{key}.txt", meta["title"].encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


@pytest.fixture
def shard(tmp_path):
    """One plain img2dataset sample per form, then `build`'s sample of each (tags parse_tags wrote)."""
    members = []
    for i, (form, (text, _)) in enumerate(FORMS.items()):
        members += _sample(f"{i:03d}", {"title": f"plain {form}", "tags": text})
        members += _sample(f"{i + 100:03d}", {"title": f"built {form}", "tags": youtube.parse_tags(text)})
    return write_members(tmp_path / "000000.tar", members)


def _read(shard: str, count: int) -> dict[str, tuple[str, set[int]]]:
    read = read_captions(shard, count, TEMPLATE)
    parts = [caption.split(". tags: ") for caption, _ in read]  # title, tags
    return {title: (tags, ids) for (title, tags), (_, ids) in zip(parts, read, strict=True)}


def test_a_list_spelling_string_trains_on_the_tags_it_spells(shard):
    """Caption and tag positives of a plain sample are those of the built sample of the same tags."""
    read = _read(shard, 2 * len(FORMS))
    for form, (_, tags) in FORMS.items():
        caption, ids = read[f"plain {form}"]
        assert caption == ", ".join(tags), form
        assert ids == {tag_id(t) for t in tags}, form
        assert read[f"built {form}"] == (caption, ids), form


def test_eval_tag_classes_are_the_spelled_tags(shard):
    classes = collect_label_values(shard, "tags")
    assert classes == sorted({normalize_tag(t) for _, tags in FORMS.values() for t in tags})


def test_conform_row_splits_a_list_spelling_string_into_its_items():
    schema = pa.schema([("tags", pa.list_(pa.string()))])
    for form, (text, tags) in FORMS.items():
        parts = conform_row({"tags": text}, schema)["tags"]
        assert tag_values(parts) == tag_values(text), form
        assert [t.strip() for t in tag_values(parts)] == tags, form


def test_dedup_writes_a_plain_list_spelling_string_as_the_list_it_spells(tmp_path):
    """A built shard in the folder makes tags a list column; the plain shard's '["a", "b"]' was
    split on "," into '["a"' and ' "b"]', which training then read as the tags '["a' and 'b"]'."""
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    os.makedirs(src)
    built_schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("tags", pa.list_(pa.string()))])
    plain_schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("tags", pa.string())])
    forms = list(FORMS)
    built = [
        {"key": f"00000{i:04d}", "status": "success", "tags": youtube.parse_tags(FORMS[f][0])}
        for i, f in enumerate(forms)
    ]
    plain = [{"key": f"00001{i:04d}", "status": "success", "tags": FORMS[f][0]} for i, f in enumerate(forms)]
    write_built_shard(src, 0, built, built_schema)
    write_built_shard(src, 1, plain, plain_schema)
    assert dedup.dedup(src, filter_output=out)["kept"] == 2 * len(forms)
    parquets = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".parquet"))
    rows = {r["key"]: r for r in ds.dataset(parquets, format="parquet").to_table().to_pylist()}
    for i, form in enumerate(forms):
        assert [t.strip() for t in tag_values(rows[f"00001{i:04d}"]["tags"])] == FORMS[form][1], form
    assert rows["000010000"]["tags"] == ["Tom &amp; Jerry", "cat and mouse"]
