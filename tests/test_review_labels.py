"""A tag or a category is one thing to every reader: training positives, zero-shot classes, tag metrics.

Shards are written by hand (webdataset tar: ``<key>.jpg`` + ``<key>.json``) and read through the
real training stream, validation stream and metrics.
"""

import io
import json
import math
import tarfile
import unicodedata

import torch
import torch.nn.functional as F
from PIL import Image

from vutrain.data import TrainStream, ValStream, collect_label_values
from vutrain.data.labels import normalize_tag, tag_id
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.tokenizer import train_bpe_tokenizer
from vutrain.eval_multilabel import multilabel_retrieval, tag_vocabulary

CAFE_NFC = unicodedata.normalize("NFC", "Café")
CAFE_NFD = unicodedata.normalize("NFD", "café")
PROCESSOR = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shard(path, metas: list[dict]) -> str:
    image = _jpeg()
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):  # NaN as JSON NaN
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _tokenize(texts):
    ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _train_labels(spec: str, positives: str, n: int) -> tuple[torch.Tensor, dict]:
    stream = TrainStream(
        spec,
        batch_size=n,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=3,
        shuffle_buffer=1,
        num_samples=n,
        preprocess=make_fast_preprocess(PROCESSOR),
        tokenize=_tokenize,
        positives=positives,
    )
    with stream:
        batch = next(stream)
        return batch["labels"], stream.skipped()


def _val_batch(spec: str, field: str) -> dict:
    pixels = torch.zeros(3, 16, 16)  # the labels are under test, not the pixels
    stream = ValStream(
        spec, preprocess=lambda image: pixels, tokenize=_tokenize, batch_size=64, label_field=field
    )
    return next(iter(stream))


TAG_METAS = [
    {"title": "a", "tags": [CAFE_NFC, "Lets Play"]},
    {"title": "b", "tags": [CAFE_NFD, "lets  play"]},  # decomposed é, two spaces
    {"title": "c", "tags": " CAFÉ ,LETS\tPLAY"},  # one comma-separated string
    {"title": "d", "tags": ["minecraft"]},
]


def test_tag_spellings_are_one_tag_for_training_zero_shot_and_tag_metrics(tmp_path):
    """ "Café" composed (NFC) or decomposed (NFD) and "lets  play" with two spaces are the tags of
    the others: the training ids were different (two tags counted as two, so the samples were no
    positives of each other), the tag vocabulary had two columns and zero-shot two classes."""
    spec = _write_shard(tmp_path / "tags.tar", [m for m in TAG_METAS[:3] for _ in range(2)])
    labels, skipped = _train_labels(spec, "tags", 6)
    assert skipped == {}
    ids = {tuple(sorted(i for i in row.tolist() if i >= 0)) for row in labels}
    assert ids == {tuple(sorted([tag_id("café"), tag_id("lets play")]))}

    classes = collect_label_values(spec, "tags")
    assert classes == ["café", "lets play"]
    batch = _val_batch(spec, "tags")
    assert all(set(s) == set(classes) for s in batch["label_sets"])
    assert tag_vocabulary(batch["tags"]) == classes
    assert {tag_id(c) for c in classes} == set(ids.pop())


def test_a_perfect_model_scores_full_tag_map_whatever_the_unicode_form(tmp_path):
    """An encoder that knows each image's tags (the text tower sees NFC: the tokenizer normalises
    so, and both "café" forms tokenise alike) scored eval/tags_map < 1 when the vocabulary held
    "café" twice: the two columns tied, and ties count against the model."""
    spec = _write_shard(tmp_path / "val.tar", TAG_METAS)
    tokenizer = train_bpe_tokenizer(["café lets play minecraft"] * 8, str(tmp_path / "tok"), vocab_size=300)
    templates = ["a thumbnail of {}."]
    assert (
        tokenizer(templates[0].format(CAFE_NFC))["input_ids"]
        == tokenizer(templates[0].format(CAFE_NFD))["input_ids"]
    )

    def encode_text(prompts):  # a text tower that tells apart exactly what the tokenizer does
        rows = [hash(tuple(tokenizer(p)["input_ids"])) % 9973 for p in prompts]
        return F.one_hot(torch.tensor(rows), 9973).float()

    tags = _val_batch(spec, "tags")["tags"]
    images = torch.stack(  # each image at its tags' prompts
        [
            encode_text([templates[0].format(normalize_tag(t)) for t in sample_tags]).sum(0)
            for sample_tags in tags
        ]
    )
    metrics = multilabel_retrieval(images, tags, encode_text, templates)
    assert metrics["eval/tags_vocab"] == 3.0
    assert metrics["eval/tags_map"] == 1.0


CATEGORY_METAS = [
    {"title": "a", "category_id": 20, "category_name": "Gaming"},
    {"title": "b", "category_id": "20", "category_name": "Gaming "},
    {"title": "c", "category_id": 20.0, "category_name": " Gaming"},  # pandas int column with gaps
    {"title": "d", "category_id": math.nan, "category_name": math.nan},  # pandas' missing value
    {"title": "e", "category_id": math.inf},
    {"title": "f", "category_id": 20.5},
    {"title": "g", "category_id": 7, "category_name": "Music"},
    {"title": "h", "category_id": 2**70},
]


def test_category_ids_numeric_string_or_float_are_one_class_and_bad_ones_no_label(tmp_path):
    """20, "20" and 20.0 are category 20 in training and one zero-shot class; NaN, Infinity, 20.5
    and an id beyond int64 are no label (-1) and no class. Infinity dropped its sample as a
    preprocess error, 20.5 was category 20, 2**70 crashed the batch's collate; zero-shot made
    "20.0" a class beside "20" and NaN a class "nan"; "Gaming " a class beside "Gaming"."""
    spec = _write_shard(tmp_path / "cat.tar", CATEGORY_METAS)
    labels, skipped = _train_labels(spec, "category", len(CATEGORY_METAS))
    assert skipped == {}
    assert sorted(labels.tolist()) == [-1, -1, -1, -1, 7, 20, 20, 20]

    assert collect_label_values(spec, "category_id") == ["20", "7"]
    assert collect_label_values(spec, "category_name") == ["Gaming", "Music"]
    batch = _val_batch(spec, "category_name")
    assert sorted(map(tuple, batch["label_sets"])) == [()] * 4 + [("Gaming",)] * 3 + [("Music",)]


def test_tags_that_are_numbers_or_blank_read_alike_in_captions_ids_and_vocab():
    """A tag written as a JSON number (2024) was dropped from the training ids and the vocabulary
    but rendered in `{tags}` captions, and blank entries rendered as "cats, , funny"."""
    from vutrain.data.captions import render_caption
    from vutrain.data.labels import sample_label
    from vutrain.tag_text import tag_values

    meta = {"tags": ["Cats", " ", 2024, None, 5.0, "funny"]}
    assert tag_values(meta["tags"]) == ["Cats", "2024", "5", "funny"]
    assert render_caption("{tags}", meta, None) == "Cats, 2024, 5, funny"
    assert sample_label(meta, "tags") == sorted({tag_id(t) for t in ("cats", "2024", "5", "funny")})


def test_a_lone_number_in_the_tags_field_is_one_tag_everywhere():
    """A tags column whose value is one number (a parquet column of numbers, `"tags": 2024`) was no
    tag for training, the metrics and the vocabulary, while a list [2024] was the tag "2024"."""
    from vutrain.data.captions import render_caption
    from vutrain.data.labels import sample_label
    from vutrain.tag_text import tag_values

    meta = {"tags": 2024}
    assert tag_values(2024) == tag_values([2024]) == ["2024"]
    assert render_caption("{tags}", meta, None) == "2024"
    assert sample_label(meta, "tags") == [tag_id("2024")]
    assert tag_values(True) == [] and tag_values(2.5) == []
