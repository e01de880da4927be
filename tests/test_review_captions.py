"""A caption is the sample's text, never the repr of a non-text value; a blank title is no title.

Shards are written by hand (webdataset tar: ``<key>.jpg`` + ``<key>.json`` [+ ``<key>.txt``]) and
read through the real caption decoding, the tokenizer's text reader, the training stream and the
zero-shot class reader.
"""

import io
import json
import math
import tarfile

import pytest
import torch
from PIL import Image

from vutrain.data import TrainStream, collect_label_values
from vutrain.data.labels import category_label
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.samples import SkipSample, decode_caption, decode_meta
from vutrain.data.tokenizer import iter_shard_texts

PROCESSOR = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 200, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shard(path, samples: list[tuple[dict, str | None]]) -> str:
    image = _jpeg()
    with tarfile.open(path, "w") as tar:
        for i, (meta, txt) in enumerate(samples):
            members = [("jpg", image), ("json", json.dumps(meta).encode())]  # NaN as JSON NaN
            if txt is not None:
                members.append(("txt", txt.encode()))
            for ext, data in sorted(members):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _caption(meta: dict, txt: str | None, template: str = "{title}") -> str:
    raw = {"__key__": "k", "json": json.dumps(meta).encode()}
    if txt is not None:
        raw["txt"] = txt.encode()
    return decode_caption(raw, decode_meta(raw), template)


NO_TEXT_TITLES = ["  ", "\t\n", ["a", "b"], {"x": 1}, True, math.nan]


@pytest.mark.parametrize("title", NO_TEXT_TITLES, ids=repr)
def test_blank_or_non_text_title_falls_back_to_txt_as_a_missing_one(title):
    """A blank title was skipped as ``empty_caption`` though the ``.txt`` held the caption, and a
    list, object, true or NaN (pandas' missing value) became the caption "['a', 'b']", "{'x': 1}",
    "True", "nan". Now each counts as no title: the ``.txt`` is the caption, as for a null title."""
    assert _caption({"title": None}, "from txt") == "from txt"
    assert _caption({"title": title}, "from txt") == "from txt"
    assert _caption({"title": title, "tags": ["cats"]}, "from txt", "{title}. tags: {tags}") == (
        "from txt. tags: cats"
    )


@pytest.mark.parametrize("title", NO_TEXT_TITLES, ids=repr)
def test_blank_or_non_text_title_without_txt_is_skipped_as_missing_caption(title):
    with pytest.raises(SkipSample) as info:
        _caption({"title": title}, None)
    assert info.value.reason == "missing_caption"


def test_non_text_field_is_skipped_with_its_type_and_numbers_stay_text():
    """Another field that holds no text is a ``missing_field`` skip naming what it held (a NaN
    ``category_name`` rendered "Cats / nan", NaN tags "Cats. tags: "); numbers are text, an
    integral float as its integer (20.0 is how pandas writes 20 in a column with gaps)."""
    with pytest.raises(SkipSample) as info:
        _caption({"title": "Cats", "category_name": ["Pets"]}, None, "{title} / {category_name}")
    assert info.value.reason == "missing_field"
    assert "list" in str(info.value) and "category_name" in str(info.value)
    with pytest.raises(SkipSample) as info:
        _caption({"title": "Cats", "category_name": math.nan}, None, "{title} / {category_name}")
    assert info.value.reason == "missing_field"
    for missing_tags in (None, math.nan):  # NaN rendered "Cats. tags: " where null was skipped
        with pytest.raises(SkipSample) as info:
            _caption({"title": "Cats", "tags": missing_tags}, None, "{title}. tags: {tags}")
        assert info.value.reason == "missing_field"
    assert _caption({"title": 5}, "txt") == "5"
    assert _caption({"title": 5.0}, "txt") == "5"
    assert _caption({"title": 2.5}, "txt") == "2.5"
    assert _caption({"title": "x", "category_id": 20.0}, None, "{title} [{category_id}]") == "x [20]"


def test_shard_captions_read_by_the_tokenizer_use_the_txt_for_blank_and_non_text_titles(tmp_path):
    """Through a real shard: every sample gives its ``.txt`` caption, none is skipped or a repr."""
    samples = [({"title": t}, f"caption {i}") for i, t in enumerate(NO_TEXT_TITLES)]
    samples.append(({"title": "real title"}, "ignored"))
    spec = _write_shard(tmp_path / "t.tar", samples)
    texts = list(iter_shard_texts(spec, "{title}"))
    assert texts == [f"caption {i}" for i in range(len(NO_TEXT_TITLES))] + ["real title"]


def test_category_id_as_decimal_text_is_the_same_class_as_the_number(tmp_path):
    """``"20.0"`` (a float column written as text) was no label (-1) in training and no zero-shot
    class, while the number 20.0 and the text "20" were category 20 (the dataset tools read all three
    as 20). A fractional or non-finite text stays no label."""
    assert [category_label(v) for v in ("20.0", " 20.0 ", "20", 20.0, 20)] == [20] * 5
    assert [category_label(v) for v in ("20.5", "nan", "inf", "1e400", "abc", "")] == [-1] * 6
    metas = [{"title": "a", "category_id": "20.0"}, {"title": "b", "category_id": 20}]
    spec = _write_shard(tmp_path / "c.tar", [(m, None) for m in metas])
    stream = TrainStream(
        spec,
        batch_size=2,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=3,
        shuffle_buffer=1,
        num_samples=2,
        preprocess=make_fast_preprocess(PROCESSOR),
        tokenize=lambda texts: {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)},
        positives="category",
    )
    with stream:
        labels = next(stream)["labels"]
    assert labels.tolist() == [20, 20]
    assert collect_label_values(spec, "category_id") == ["20"]
