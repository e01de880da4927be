"""Review of the training augmentation on the device (``vutrain/data/device_transform.py``).

Regression guards, no fix: the random crop's boxes against torchvision's ``RandomResizedCrop``
(re-implemented here, torchvision is not installed), and the crops of a resumed stream.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream
from vutrain.data.device_transform import make_device_transform, random_resized_crop_boxes
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.synthetic import write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

IMAGE = 32


def _torchvision_crop_size(height: int, width: int, rng: random.Random) -> tuple[int, int]:
    """(crop_h, crop_w) of torchvision's ``RandomResizedCrop.get_params``, scale (0.9, 1), ratio 3:4-4:3."""
    area, log_lo, log_hi = height * width, math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.9, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        return round(width / (3 / 4)), width
    if in_ratio > 4 / 3:
        return height, round(height * 4 / 3)
    return height, width


@pytest.mark.parametrize("height,width", [(32, 32), (30, 36)])
def test_crop_sizes_follow_torchvision_in_distribution(height, width):
    """The (crop_h, crop_w) histogram of 30,000 boxes is within 0.03 total variation of
    torchvision's (sampling noise measured 0.005-0.011): the same rejection sampling, the same
    rounding, the same share of whole-image fallbacks."""
    n = 30_000
    rng = random.Random(0)
    expected = Counter(_torchvision_crop_size(height, width, rng) for _ in range(n))
    boxes = random_resized_crop_boxes(n, height, width, torch.Generator().manual_seed(0))
    got = Counter((int(h), int(w)) for h, w in boxes[:, 2:].tolist())
    distance = sum(abs(expected[k] - got[k]) for k in set(expected) | set(got)) / (2 * n)
    assert distance < 0.03, (distance, expected.most_common(4), got.most_common(4))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    # every offset is reachable: torchvision's randint(0, size - crop + 1)
    narrow = w == width - 2
    assert set(left[narrow].tolist()) == {0.0, 1.0, 2.0}


@pytest.fixture(scope="module")
def stream_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("augment")
    info = write_synthetic(str(root / "syn"), 64, 16, image_size=IMAGE, seed=3, val_samples=8)
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 300, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return info["train_shards"], processor, make_tokenize(tok, 16)


def _augmented_batches(parts, count: int, state: dict | None = None) -> tuple[list[torch.Tensor], dict]:
    """``count`` batches of a fresh stream (resumed from ``state``) through the trainer's crop."""
    shards, processor, tokenize = parts
    stream = TrainStream(
        shards,
        preprocess=make_fast_preprocess(processor),
        tokenize=tokenize,
        batch_size=4,
        rank=1,
        world_size=2,
        num_workers=0,
        seed=5,
        shuffle_buffer=8,
    )
    if state is not None:
        stream.load_state_dict(state)
    transform = make_device_transform(
        processor, random_resized_crop=True, seed=5, rank=1, position=lambda: stream.batches_seen
    )
    out = [transform(next(stream)["pixel_values"], "cpu", torch.float32) for _ in range(count)]
    return out, json.loads(json.dumps(stream.state_dict()))


def test_resumed_stream_crops_as_the_uninterrupted_one(stream_parts):
    """6 batches straight == 3 batches, state_dict, a fresh stream and transform, 3 batches:
    the same pixels and the same crops (the crops are seeded by the stream's batch index, which
    the state restores)."""
    straight, _ = _augmented_batches(stream_parts, 6)
    first, state = _augmented_batches(stream_parts, 3)
    resumed, _ = _augmented_batches(stream_parts, 3, state)
    for got, want in zip(first + resumed, straight):
        assert torch.equal(got, want)
