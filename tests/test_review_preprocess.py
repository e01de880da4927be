"""Image preprocessing against transformers' own CLIPImageProcessor on settings it accepts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess


def _image(width: int, height: int) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_one_number_mean_and_std_normalise_every_channel_as_the_processor():
    """transformers takes ``"image_mean": 0.5`` (one number for all channels, as some exported
    configs have it); the eval and fast paths crashed at start-up with "'float' object is not
    iterable"."""
    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_mean=0.5, image_std=0.5
    )
    image = _image(16, 16)
    expected = torch.from_numpy(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))
    assert torch.allclose(make_preprocess(processor)(image), expected, atol=1e-5)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    pixels = make_fast_preprocess(processor)(buf.getvalue())
    on_device = make_device_transform(processor)(pixels[None], "cpu", torch.float32)[0]
    assert torch.allclose(on_device, expected, atol=1e-5)


def test_a_mean_without_three_values_is_one_error_naming_the_file():
    processor = {"size": {"shortest_edge": 16}, "crop_size": {"height": 16, "width": 16}, "image_mean": [0.5]}
    with pytest.raises(ValueError, match="image_mean has 1 values.*preprocessor_config.json"):
        make_preprocess(processor)
