"""Review of the window resize of extreme aspect ratios with nearest and box resampling.

The processor upscales a 7x300 image at 32 px to 32x1371 and puts one row centre at exactly
150.0; the window's ``resize(box=...)`` computed it from a float32 box as 149.99998, and nearest
or box took the row above (up to 248 grey levels off). The window now uses PIL's arithmetic of
the full resize, so its pixels equal the processor's bit for bit on PNGs.
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess


@pytest.mark.parametrize("resample", [0, 4, 2, 3, 1, 5])  # nearest, box, bilinear, bicubic, lanczos, hamming
@pytest.mark.parametrize("shape", [(7, 300), (300, 7), (11, 900), (1, 500), (500, 1), (50, 1000)])
@pytest.mark.parametrize("short", [24, 32])
def test_window_of_an_extreme_aspect_png_is_the_processors_pixels(resample, shape, short):
    w, h = shape
    processor = CLIPImageProcessor(
        size={"shortest_edge": short}, crop_size={"height": short, "width": short}, resample=resample
    )
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "PNG")
    ref = processor(images=image, return_tensors="pt")["pixel_values"][0]
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    fast = make_device_transform(processor)(
        make_fast_preprocess(processor)(buf.getvalue())[None], "cpu", torch.float32
    )
    for name, pixels in (("fast", fast[0].float()), ("eval", make_preprocess(processor)(image))):
        levels = ((pixels - ref) * std).abs().max().item()
        assert levels < 0.01, (name, levels)
