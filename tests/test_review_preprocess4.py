"""The crop's window of an extreme aspect ratio is resized in the full resize's pass order.

Images beyond about 16:1 have only the crop's window resized (``crop_window``). One PIL
``resize(box=...)`` lets Pillow 13 pick the order of its two uint8 passes from the window's sizes,
not the full image's as the processor's resize does: a 2x300 noise image at 32 px was 13 grey
levels off ``CLIPImageProcessor``, a 3x1000 one 22 (45 with lanczos), on the fast path and on
eval's path alike. Now both are within the 2 levels of a full resize (PNGs: no DCT scaling).
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess

# (width, height): 1xN / Nx1, upscaled thin images (the window went height first, the full resize
# width first), tall ones that shrink (both height first) and their transposes.
SHAPES = [(1, 500), (500, 1), (2, 300), (300, 2), (3, 1000), (1000, 3), (2, 67), (5, 97), (7, 300)]
SHAPES += [(4, 1200), (1, 3000), (50, 1000), (1000, 50), (40, 2000), (33, 700), (700, 33)]


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buf, "PNG")
    return buf.getvalue()


def _processor(size: int, resample: int) -> CLIPImageProcessor:
    return CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=resample
    )


def _levels_off(processor, data: bytes) -> dict[str, torch.Tensor]:
    """|fast - processor| and |eval - processor| in grey levels, [3, S, S] each."""
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    uint8 = make_fast_preprocess(processor)(data)[None]
    fast = make_device_transform(processor)(uint8, "cpu", torch.float32)[0]
    evaluated = make_preprocess(processor)(Image.open(io.BytesIO(data)))
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    return {"fast": ((fast - ref) * std).abs(), "eval": ((evaluated - ref) * std).abs()}


RESAMPLES = [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS]
RESAMPLES += [Image.Resampling.HAMMING]


@pytest.mark.parametrize("resample", RESAMPLES, ids=[r.name.lower() for r in RESAMPLES])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_window_resize_matches_the_processors_full_resize(shape, resample):
    width, height = shape
    rng = np.random.default_rng(width * 10000 + height)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo = np.array(photo_like(rng, max(width, 64), max(height, 64)))[:height, :width]
    for size in (32, 24):
        processor = _processor(size, int(resample))
        for name, pixels in (("noise", noise), ("photo", photo)):
            for path, off in _levels_off(processor, _png(pixels)).items():
                # torch's / PIL's fixed-point passes round within 1 level each: 2 at most
                assert off.max().item() <= 2.001, (path, name, shape, size, off.max().item())


def test_window_resize_of_a_dct_scaled_jpeg_stays_within_the_dct_tolerance():
    # 600x12000 at 64 px: decoded at 1/4 (150x3000), resized 64x1280, windowed (over 16x the crop)
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    photo_like(rng, 600, 12000).save(buf, "JPEG", quality=90)
    off = _levels_off(_processor(64, int(Image.Resampling.BICUBIC)), buf.getvalue())["fast"]
    assert off.mean().item() <= 1.5 and off.flatten().quantile(0.99).item() <= 12, (
        off.mean().item(),
        off.flatten().quantile(0.99).item(),
    )
