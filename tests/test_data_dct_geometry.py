"""The fast path's DCT-scaled decode of JPEGs whose size the scale does not divide.

libjpeg decodes a 1/s-scaled JPEG to ceil(size / s) pixels: the last row and column cover only
part of a block. Resizing the whole decoded array stretched the image by up to one decoded pixel
(a sub-pixel shift against the processor's pixels: mean 3, p99 up to 47 grey levels on these
images). The tolerance is the one of test_data_fast_path (mean <= 1.5, p99 <= 12).
"""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import DRAFT_MARGIN, make_fast_preprocess, make_preprocess
from vutrain.data.samples import draft_scale


def _levels(processor, data: bytes) -> torch.Tensor:
    ref = make_preprocess(processor)(Image.open(io.BytesIO(data)).convert("RGB"))
    out = make_device_transform(processor)(make_fast_preprocess(processor)(data)[None], "cpu", torch.float32)
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    return ((out[0] - ref) * std).abs().flatten()


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.LANCZOS])
@pytest.mark.parametrize("size", [(301, 203), (1001, 333), (333, 1001), (105, 4000)])
def test_partial_last_block_keeps_the_geometry(size, resample):
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=int(resample)
    )
    margin = math.ceil(32 * DRAFT_MARGIN)
    target = (margin, margin * max(size) // min(size))
    assert draft_scale(size, target if size[0] < size[1] else target[::-1]) > 1  # DCT-scaled
    diffs = []
    for seed in range(2):
        buf = io.BytesIO()
        photo_like(np.random.default_rng(seed), *size).save(buf, "JPEG", quality=90)
        diffs.append(_levels(processor, buf.getvalue()))
    diff = torch.cat(diffs)
    assert diff.mean().item() <= 1.5 and diff.quantile(0.99).item() <= 12, (
        diff.mean().item(),
        diff.quantile(0.99).item(),
    )


@pytest.mark.parametrize("size", [(640, 480), (333, 1001)])
def test_422_chroma_decodes_in_full_and_keeps_the_tolerance(size):
    """libjpeg-turbo's DCT-scaled decode of 4:2:2 chroma is not the full decode + resize the
    processor does (p99 11-19, max 48 grey levels at 64 px): such JPEGs are decoded in full."""
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    diffs = []
    for seed in range(2):
        buf = io.BytesIO()
        photo_like(np.random.default_rng(seed), *size).save(buf, "JPEG", quality=90, subsampling=1)  # 4:2:2
        diffs.append(_levels(processor, buf.getvalue()))
    diff = torch.cat(diffs)
    # a full decode: PIL's filter on both sides (test_data_fast_path: at most one level)
    assert diff.max().item() <= 1.001, (diff.mean().item(), diff.quantile(0.99).item(), diff.max().item())
