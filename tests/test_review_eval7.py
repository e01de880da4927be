"""One tag whatever its case or Unicode compatibility form: training ids, zero-shot classes, tag metrics.

"Straße" and "STRASSE" (German, lower-casing keeps the ß), full-width "ＧＴＡ５" beside "GTA5"
(Japanese tag lists) and the ligature "ﬁ" are one tag each: training's tag positives, the
zero-shot classes of ``eval.zeroshot_field=tags``, the tag-metric vocabulary and the dataset tools'
vocabulary (which reads ``tag_text.normalize_tag`` too) all agree. Real tar shards, the real
training and validation streams.
"""

import io
import json
import tarfile

import torch
import torch.nn.functional as F
from PIL import Image

from vutrain.data import TrainStream, ValStream, collect_label_values
from vutrain.data.labels import tag_id
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.eval_multilabel import multilabel_retrieval, tag_vocabulary
from vutrain.tag_text import normalize_tag

PROCESSOR = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}}
SPELLINGS = [  # per sample: the same two tags, spelled differently
    {"title": "a", "tags": ["Straße", "GTA5"]},
    {"title": "b", "tags": ["STRASSE", "ＧＴＡ５"]},  # full-width letters and digit
    {"title": "c", "tags": "strasse, gta５"},
]


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (30, 90, 200)).save(buf, "JPEG")
    return buf.getvalue()


def _write_shard(path, metas: list[dict]) -> str:
    image = _jpeg()
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            for ext, data in (("jpg", image), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _tokenize(texts):
    ids = torch.tensor([[len(t), sum(map(ord, t)) % 1000] for t in texts])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _train_tag_ids(spec: str, n: int) -> set[tuple[int, ...]]:
    stream = TrainStream(
        spec,
        batch_size=n,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=1,
        shuffle_buffer=1,
        num_samples=n,
        preprocess=make_fast_preprocess(PROCESSOR),
        tokenize=_tokenize,
        positives="tags",
    )
    with stream:
        labels = next(stream)["labels"]
    return {tuple(sorted(i for i in row.tolist() if i >= 0)) for row in labels}


def _val_batch(spec: str) -> dict:
    pixels = torch.zeros(3, 16, 16)
    stream = ValStream(
        spec, preprocess=lambda image: pixels, tokenize=_tokenize, batch_size=64, label_field="tags"
    )
    return next(iter(stream))


def test_case_and_width_spellings_are_one_tag_in_training_zero_shot_and_tag_metrics(tmp_path):
    """Each sample carries the same two tags: training gives every sample the same two ids (the
    samples are positives of each other), zero-shot has two classes, the tag vocabulary two tags.
    Lower-casing made "straße"/"strasse" and "ｇｔａ５"/"gta5" four ids, four classes, four tags."""
    spec = _write_shard(tmp_path / "tags.tar", SPELLINGS)
    assert _train_tag_ids(spec, 3) == {tuple(sorted([tag_id("strasse"), tag_id("gta5")]))}

    classes = collect_label_values(spec, "tags")
    assert classes == ["gta5", "strasse"]
    batch = _val_batch(spec)
    assert all(set(labels) == set(classes) for labels in batch["label_sets"])
    assert tag_vocabulary(batch["tags"]) == classes


def test_a_perfect_model_scores_full_tag_map_over_german_spellings(tmp_path):
    """An encoder that places each image at its tags' prompts scores eval/tags_map 1.0 over one
    "strasse" tag; with "straße" and "strasse" two vocabulary tags, each image carried one of them
    only, and the other's column ranked images of the same tag as negatives."""
    spec = _write_shard(tmp_path / "val.tar", [*SPELLINGS[:2], {"title": "d", "tags": ["Brücke"]}])
    templates = ["a thumbnail of {}."]

    def encode_text(prompts):  # a text tower that tells every distinct prompt apart
        return F.one_hot(torch.tensor([sum(map(ord, p)) % 4999 for p in prompts]), 4999).float()

    tags = _val_batch(spec)["tags"]
    images = torch.stack(
        [
            encode_text([templates[0].format(normalize_tag(t)) for t in sample_tags]).sum(0)
            for sample_tags in tags
        ]
    )
    metrics = multilabel_retrieval(images, tags, encode_text, templates)
    assert metrics["eval/tags_vocab"] == 3.0
    assert metrics["eval/tags_map"] == 1.0


def test_the_tag_text_shown_to_the_model_stays_readable():
    """The one form is the prompt text too: lower-case with a word-final Greek sigma kept ("ς",
    not the "σ" that case folding writes), compatibility forms written plainly."""
    assert normalize_tag("ΟΔΟΣ  Αθηνών") == "οδος αθηνών" == normalize_tag("οδος αθηνών")
    assert normalize_tag(" ﬁre ＧＴＡ５ ") == "fire gta5"
    assert normalize_tag("Straße") == normalize_tag("STRASSE") == "strasse"
