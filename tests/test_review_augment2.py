"""Review of the training augmentation on the device (``vutrain/data/device_transform.py``), part 2.

The crops against torchvision's ``RandomResizedCrop(scale=(0.9, 1.0), ratio=(3/4, 4/3))`` as
open_clip trains with it (torchvision is not installed: its documented ``get_params`` is written
out below), one crop per image, seeded by (seed, rank, batch index) alone, the processor's
normalisation with and without the crop, and the crop in fp32 inside an autocast region.
"""

from __future__ import annotations

import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.data.device_transform import make_device_transform, random_resized_crop_boxes
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _torchvision_get_params(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of torchvision's ``RandomResizedCrop.get_params``, scale (0.9, 1), ratio
    3:4-4:3: 10 tries of a uniform area and a log-uniform aspect, rounded, kept if the box fits
    (then a uniform offset); else the centre crop, clamped to the ratio range."""
    area, log_lo, log_hi = height * width, math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.9, 1.0)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif in_ratio > 4 / 3:
        h, w = height, round(height * 4 / 3)
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the two CDFs)."""
    grid = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), grid, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


@pytest.mark.parametrize("size", [32, 224])
def test_crop_areas_aspects_and_offsets_follow_torchvision(size):
    """20,000 boxes against 20,000 of the reference: the area share, the aspect ratio and the
    offset within the free range have the same distributions (KS < 0.03; sampling noise at this n
    is about 0.01, a scale of (0.08, 1), a linear aspect or a fixed offset give 0.2 and more),
    with the same share of whole-image crops (the fallback and the attempts that round to it)."""
    n = 20_000
    rng = random.Random(1)
    ref = np.array([_torchvision_get_params(size, size, rng) for _ in range(n)], dtype=np.float64)
    got = random_resized_crop_boxes(n, size, size, torch.Generator().manual_seed(1)).double().numpy()
    for name, boxes in (("reference", ref), ("vutrain", got)):
        top, left, h, w = boxes.T
        assert (top >= 0).all() and (left >= 0).all(), name
        assert (top + h <= size).all() and (left + w <= size).all(), name
    area = lambda b: b[:, 2] * b[:, 3] / size**2  # noqa: E731
    aspect = lambda b: np.log(b[:, 3] / b[:, 2])  # noqa: E731
    assert _ks(area(got), area(ref)) < 0.03
    assert _ks(aspect(got), aspect(ref)) < 0.03
    assert area(got).min() >= 0.85 and np.abs(aspect(got)).max() <= math.log(4 / 3) + 0.1
    assert abs(np.mean(area(got)) - np.mean(area(ref))) < 0.002
    whole = lambda b: np.mean((b[:, 2] == size) & (b[:, 3] == size))  # noqa: E731
    assert abs(whole(got) - whole(ref)) < 0.01, (whole(got), whole(ref))
    for axis, extent in ((0, 2), (1, 3)):  # the offset as a share of its free range: uniform
        free = size - got[:, extent]
        share = (got[free > 0, axis] + 0.5) / (free[free > 0] + 1)
        ref_free = size - ref[:, extent]
        ref_share = (ref[ref_free > 0, axis] + 0.5) / (ref_free[ref_free > 0] + 1)
        assert _ks(share, ref_share) < 0.03


def _processor(size: int = 32, **extra) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **extra
    )


def test_each_image_of_a_batch_gets_its_own_crop():
    """64 copies of one image in one batch come out in many different crops, and an image's
    crop does not depend on its neighbours' pixels."""
    image = torch.randint(
        0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    batch = image.repeat(64, 1, 1, 1)
    out = make_device_transform(_processor(), True, seed=3, position=lambda: 7)(batch, "cpu", torch.float32)
    distinct = {tuple(o.flatten()[::37].tolist()) for o in out}
    assert len(distinct) >= 16, len(distinct)  # 27 here: at 32 px few boxes exist; one crop per batch: 1
    # the same box per index whatever the other images are
    other = batch.clone()
    other[1:] = 255 - other[1:]
    out2 = make_device_transform(_processor(), True, seed=3, position=lambda: 7)(other, "cpu", torch.float32)
    assert torch.equal(out[0], out2[0])


def _crop(seed: int, rank: int, index: int, pixels: torch.Tensor) -> torch.Tensor:
    return make_device_transform(_processor(), True, seed=seed, rank=rank, position=lambda: index)(
        pixels, "cpu", torch.float32
    )


def test_crops_depend_on_seed_rank_and_batch_index_alone():
    """The same (seed, rank, batch index) crops the same, whatever the transform did before (a
    fresh one after a resume has made no calls); another seed, rank or index crops otherwise; the
    global torch RNG (dropout, the model's init) is left as it was."""
    pixels = torch.randint(
        0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    used = make_device_transform(_processor(), True, seed=5, rank=1, position=lambda: 12)
    for _ in range(3):
        used(pixels, "cpu", torch.float32)
    rng_before = torch.random.get_rng_state()
    base = _crop(5, 1, 12, pixels)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert torch.equal(used(pixels, "cpu", torch.float32), base)
    for seed, rank, index in ((6, 1, 12), (5, 0, 12), (5, 2, 12), (5, 1, 13), (5, 1, 11)):
        other = _crop(seed, rank, index, pixels)
        same = [torch.equal(a, b) for a, b in zip(other, base)]
        # at 32 px two draws give the same box now and then (often the whole image)
        assert sum(same) <= 6, (seed, rank, index, same)


def _png(color: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "extra,mean,std",
    [
        ({}, CLIP_MEAN, CLIP_STD),  # CLIP's constants
        ({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}, (0.5,) * 3, (0.5,) * 3),  # SigLIP's
        ({"image_mean": [0.1, 0.5, 0.9], "image_std": [0.2, 0.3, 0.4]}, (0.1, 0.5, 0.9), (0.2, 0.3, 0.4)),
    ],
)
@pytest.mark.parametrize("crop", [False, True])
def test_normalisation_is_the_processors_with_and_without_the_crop(extra, mean, std, crop):
    """A flat-coloured image (its crop is the same flat colour) comes out as (rgb / 255 - mean) / std
    per channel, in RGB order, equal to the processor's own pixels: 0..255 rescaled once, the
    processor's (or CLIP's) mean and std, with the crop on and off."""
    processor = _processor(**extra)
    color = (200, 30, 120)
    data = _png(color, (40, 32))
    uint8 = make_fast_preprocess(processor)(data)
    transform = make_device_transform(processor, crop, seed=0, position=lambda: 1)
    out = transform(uint8[None].repeat(4, 1, 1, 1), "cpu", torch.float32)
    want = (torch.tensor(color) / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out, want.view(1, 3, 1, 1).expand_as(out), atol=1e-5, rtol=0)
    reference = make_preprocess(processor)(Image.open(io.BytesIO(data)))
    torch.testing.assert_close(out[0], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_crop_is_fp32_inside_an_autocast_region(dtype):
    """Called inside ``torch.autocast(bf16)`` (a caller's training step under autocast), the crop
    gives the pixels it gives outside (then cast to ``dtype``): autocast ran its resampling
    matmuls in bf16, up to 0.03 (2 grey levels) off."""
    pixels = torch.randint(
        0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    transform = make_device_transform(_processor(64), True, seed=1, position=lambda: 3)
    plain = transform(pixels, "cpu", dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = transform(pixels, "cpu", dtype)
    assert autocast.dtype == dtype
    assert torch.equal(autocast, plain), (autocast.float() - plain.float()).abs().max().item()
