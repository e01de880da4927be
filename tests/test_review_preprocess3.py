"""The fast path resizes in Pillow's pass order: Pillow 13 resizes the height first when it shrinks
by more than twice as many pixels as the width, and the uint8 rounding between the passes differs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess

# (width, height): Pillow's height-first shapes (33x90 -> 32x87 was 17 levels off on noise, 33x200
# 18), their transposes (width first), upscales, 1-pixel sides and aspects up to the window limit.
SHAPES = [(33, 90), (33, 200), (17, 57), (90, 33), (5, 3), (3, 5), (31, 7), (1, 1), (1, 7), (7, 1)]
SHAPES += [(1, 40), (40, 1), (13, 100), (100, 13), (103, 246), (48, 36), (32, 31), (640, 480), (255, 17)]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _levels_off_processor(processor, data: bytes) -> torch.Tensor:
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    fast = make_device_transform(processor)(make_fast_preprocess(processor)(data)[None], "cpu", torch.float32)
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    return ((fast[0] - ref) * std).abs()


@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_fast_path_follows_pillows_pass_order(shape, resample):
    width, height = shape
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=int(resample)
    )
    rng = np.random.default_rng(width * 1000 + height)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo = np.array(photo_like(rng, max(width, 64), max(height, 64)))[:height, :width]
    for name, pixels in (("noise", noise), ("photo", photo)):
        off = _levels_off_processor(processor, _png(np.ascontiguousarray(pixels)))
        # torch's and PIL's fixed-point passes each round within 1 level; two passes: 2 at most
        assert off.max().item() <= 2.001, (name, shape, off.max().item())
