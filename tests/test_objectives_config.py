"""Config keys of the objectives: choices, keys that do not apply to the chosen loss, the loss
each config builds, and the labels the data stream derives from `loss.positives`."""

from __future__ import annotations

import os

import pytest
import torch

from vutrain.config import ConfigError, load_config
from vutrain.data.labels import collate_labels, sample_label, tag_id
from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss, build_loss_from_config

TINY = os.path.join(os.path.dirname(__file__), "..", "vutrain", "configs", "tiny.yaml")
BASE = ["data.train_shards=/data/{00000..00003}.tar", "data.val_shards=", "eval.every=0"]


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["loss.name=clip", "loss.bidir=true"], ["loss.bidir", "only to siglip"]),
        (["loss.name=siglip", "loss.local_loss=false"], ["loss.local_loss", "only to clip"]),
        (["loss.name=clip", "loss.uniform_weight=2"], ["loss.uniform_weight", "align_uniform"]),
        (["loss.name=align_uniform", "loss.positives=tags"], ["loss.positives", "clip, siglip"]),
        (["loss.positives=video"], ["loss.positives='video'", "pair, category, tags"]),
        (["loss.name=align_uniform", "loss.uniform_t=0"], ["loss.uniform_t must be > 0"]),
        (["loss.positives=tags", "loss.backend=triton"], ["does not support loss.positives=tags"]),
        (["loss.name=siglip", "loss.bidir=true", "loss.backend=triton"], ["loss.bidir=false"]),
        (["train.accumulation=sum"], ["train.accumulation='sum'", "gradcache, plain"]),
    ],
)
def test_keys_that_do_not_apply_are_errors(overrides, words):
    with pytest.raises(ConfigError) as err:
        load_config(TINY, BASE + overrides)
    for word in words:
        assert word in str(err.value)


def test_each_config_builds_its_loss_with_its_keys():
    cfg = load_config(TINY, BASE + ["loss.name=siglip", "loss.bidir=true", "loss.positives=category"])
    loss = build_loss_from_config(cfg.loss, rank=0, world_size=1)
    assert isinstance(loss, SigLipLoss) and loss.bidir
    cfg = load_config(
        TINY,
        BASE
        + ["loss.name=align_uniform", "loss.align_weight=0.5", "loss.uniform_weight=3", "loss.uniform_t=4"],
    )
    loss = build_loss_from_config(cfg.loss, rank=0, world_size=1)
    assert isinstance(loss, AlignUniformLoss)
    assert (loss.align_weight, loss.uniform_weight, loss.t) == (0.5, 3.0, 4.0)
    cfg = load_config(TINY, BASE + ["loss.local_loss=false"])
    loss = build_loss_from_config(cfg.loss, rank=0, world_size=1)
    assert isinstance(loss, ClipLoss) and not loss.local_loss


def test_labels_from_metadata():
    meta = {"category_id": 17, "tags": ["Cats", " cats ", "Funny", ""]}
    assert sample_label(meta, "pair") is None
    assert sample_label(meta, "category") == 17
    assert sample_label({}, "category") == -1  # no category: a positive of itself only
    assert sample_label({"category_id": "x"}, "category") == -1
    ids = sample_label(meta, "tags")
    assert ids == sorted({tag_id("cats"), tag_id("funny")}) and len(ids) == 2
    assert sample_label({"tags": "a, b"}, "tags") == sorted({tag_id("a"), tag_id("b")})
    batch = collate_labels([ids, [], [tag_id("funny")]], "tags")
    assert batch.shape == (3, 2) and batch.dtype == torch.long
    assert batch[1].tolist() == [-1, -1] and batch[2, 1] == -1
    assert collate_labels([3, -1], "category").tolist() == [3, -1]
    assert collate_labels([None, None], "pair") is None
    with pytest.raises(ValueError, match="pair, category, tags"):
        sample_label(meta, "video")


def test_train_stream_carries_labels_of_its_own_samples(tmp_path):
    """positives=category|tags: batch["labels"] row i belongs to sample i (checked via its title)."""
    from vutrain.data import TrainStream
    from vutrain.data.synthetic import CLASSES, write_synthetic

    info = write_synthetic(str(tmp_path / "syn"), 48, 24, image_size=16, seed=3, val_samples=8)

    def stream(positives):
        return TrainStream(
            info["train_shards"],
            preprocess=lambda img: torch.zeros(1),
            tokenize=lambda caps: {"captions": list(caps)},
            batch_size=8,
            rank=0,
            world_size=1,
            num_workers=0,
            seed=0,
            shuffle_buffer=10,
            positives=positives,
        )

    with stream("category") as s:
        batch = next(s)
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (8,)
    for caption, label in zip(batch["captions"], batch["labels"].tolist()):
        colour, shape = CLASSES[label].split(" ")
        assert colour in caption.lower() and shape in caption.lower()
    with stream("tags") as s:
        batch = next(s)
    assert batch["labels"].dim() == 2 and batch["labels"].shape[0] == 8
    for caption, ids in zip(batch["captions"], batch["labels"].tolist()):
        words = caption.lower().split()
        assert any(tag_id(w) in ids for w in words)  # the title's colour / shape are tags
    with stream("pair") as s:
        assert "labels" not in next(s)
    with pytest.raises(ValueError, match="pair, category, tags"):
        stream("video")
