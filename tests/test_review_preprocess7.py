"""Coverage pins from the seventh preprocessing review (no bug found behind either).

- The centre crop's offset where the margin is odd, and the zero padding where it is odd: both
  paths take CLIPImageProcessor's pixels bit for bit (floor, not torchvision ``center_crop``'s
  round; the padding's extra row goes first, as the processor's ``ceil``).
- The device normalisation of every uint8 value equals the processor's, in fp32 within rounding
  and exactly once cast to bf16 / fp16 (no uint8 overflow, no second rounding).
"""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
from vutrain.data.samples import decode_image


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def _unnormalised(**geometry) -> CLIPImageProcessor:
    """A processor whose output is the cropped 0..255 pixels themselves: exact comparisons."""
    return CLIPImageProcessor(do_rescale=False, do_normalize=False, **geometry)


@pytest.mark.parametrize(
    "geometry,image_wh,top_left",
    [
        # no resize (the short side already is 20): margins 13 x 11 rows/columns, both odd
        ({"size": {"shortest_edge": 20}, "crop_size": {"height": 7, "width": 9}}, (20, 33), (13, 5)),
        ({"size": {"shortest_edge": 20}, "crop_size": {"height": 9, "width": 7}}, (35, 20), (5, 14)),
        # a squash to the image's own size, then a crop with odd margins
        ({"size": {"height": 21, "width": 30}, "crop_size": {"height": 8, "width": 11}}, (30, 21), (6, 9)),
        # a crop larger than the image: 3 rows / columns of zeros, 2 of them first
        ({"size": {"shortest_edge": 5}, "crop_size": {"height": 8, "width": 8}}, (5, 5), (-2, -2)),
    ],
)
def test_centre_crop_takes_the_processors_pixels_at_odd_margins(geometry, image_wh, top_left):
    processor = _unnormalised(**geometry)
    w, h = image_wh
    pixels = np.random.default_rng(7).integers(1, 256, (h, w, 3), dtype=np.uint8)  # 0 marks padding
    data = _png(pixels)
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    fast = make_fast_preprocess(processor)(data)
    exact = make_preprocess(processor)(decode_image({"__key__": "k", "png": data}))
    assert torch.equal(fast.float(), ref)
    assert torch.equal(exact, ref)
    ch, cw = processor.crop_size["height"], processor.crop_size["width"]
    top, left = top_left
    expected = np.zeros((ch, cw, 3), dtype=np.uint8)
    window = pixels[max(top, 0) : max(top, 0) + ch, max(left, 0) : max(left, 0) + cw]
    pad_top, pad_left = max(-top, 0), max(-left, 0)  # zero rows / columns before the image
    expected[pad_top : pad_top + window.shape[0], pad_left : pad_left + window.shape[1]] = window
    assert torch.equal(fast, torch.from_numpy(expected).permute(2, 0, 1))


@pytest.mark.parametrize(
    "normalisation",
    [
        {},  # CLIP's mean and std
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},  # SigLIP's
        {"do_normalize": False},
    ],
)
def test_every_uint8_value_normalises_as_the_processor_in_each_precision(normalisation):
    processor = CLIPImageProcessor(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, **normalisation
    )
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = np.stack([ramp, ramp[::-1], ramp.T], axis=-1)  # every value in every channel
    ref = processor(images=Image.fromarray(image), return_tensors="pt")["pixel_values"]
    transform = make_device_transform(processor)
    batch = torch.from_numpy(image).permute(2, 0, 1)[None].contiguous()
    assert torch.allclose(transform(batch, "cpu", torch.float32), ref, rtol=0, atol=1e-6)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(transform(batch, "cpu", dtype), ref.to(dtype)), dtype
