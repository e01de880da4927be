"""The fast path's DCT-scaled decode against the stated bound, image by image.

The bound (README, test_data_fast_path): mean <= 1.5, 99th percentile <= 12 grey levels off
CLIPImageProcessor. A JPEG decoded DCT-scaled to only 1.25-1.5x the resize target (a 2.5-3x
image) was up to mean 2.2, p99 17 off per image at 32 px; it now decodes in full below 3.2x.
"""

import io
import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import DRAFT_MARGIN, make_fast_preprocess, resized_geometry
from vutrain.data.samples import draft_scale

# image short side / target short side
RATIO_BUCKETS = {"2.5-3x": (2.5, 2.7, 2.9), "3-4x": (3.3, 3.6), "4-6x": (4.0, 5.0), "6-8x": (6.4, 8.0)}


def _jpeg(seed: list[int], w: int, h: int, quality: int) -> bytes:
    buf = io.BytesIO()
    photo_like(np.random.default_rng(seed), w, h).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.parametrize("short", [32, 64])
@pytest.mark.parametrize("bucket", list(RATIO_BUCKETS))
def test_every_image_stays_within_the_bound_per_ratio(short, bucket):
    processor = CLIPImageProcessor(size={"shortest_edge": short}, crop_size={"height": short, "width": short})
    fast, to_float = make_fast_preprocess(processor), make_device_transform(processor)
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    worst = []
    for ratio, (aw, ah), quality in itertools.product(
        RATIO_BUCKETS[bucket], ((1, 1), (4, 3), (9, 16)), (75, 95)
    ):
        side = round(short * ratio)
        w, h = (side * aw // ah, side) if aw >= ah else (side, side * ah // aw)
        data = _jpeg([short, w, h, quality], w, h, quality)
        ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
        out = to_float(fast(data)[None], "cpu", torch.float32)[0]
        levels = ((out - ref) * std).abs().flatten()
        worst.append((levels.mean().item(), levels.quantile(0.99).item(), (w, h, quality)))
    assert max(m for m, _, _ in worst) <= 1.5, max(worst)
    assert max(p for _, p, _ in worst) <= 12, max(worst, key=lambda x: x[1])


@pytest.mark.parametrize(
    "size,short,scale",
    [
        ((1280, 720), 224, 2),  # a maxres YouTube thumbnail keeps the speed win: 640x360 decoded
        ((1920, 1080), 224, 2),
        ((480, 360), 224, 1),  # an hq one never was DCT-scaled at 224 px
        ((86, 86), 32, 1),  # 2.7x: decoded at 1.34x the target it was mean 1.9, p99 16 off
        ((104, 104), 32, 2),  # 3.25x: decoded at 1.63x the target
    ],
)
def test_draft_scale_per_size(size, short, scale):
    target = resized_geometry(*size, short)
    assert draft_scale(size, tuple(math.ceil(v * DRAFT_MARGIN) for v in target)) == scale
