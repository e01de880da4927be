"""Sample decoding (vutrain/data/samples.py), second review: 32-bit integer greyscale (Pillow's mode
``I``) that declares no 16-bit range converts as CLIPImageProcessor converts it, on both decode
paths; only 16-bit greyscale (``I;16``, a 16-bit PGM's ``I``) is scaled by its high byte."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_review_samples1 import SIXTEEN_BIT, _encode, _gradient16
from transformers import CLIPImageProcessor

from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
from vutrain.data.samples import decode_image, decode_image_array

PROCESSOR = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})


def _gradient8(dtype) -> np.ndarray:
    """A 48x36 grey gradient over 0-255, held in a wider integer type."""
    return np.linspace(0, 255, 48 * 36).round().astype(dtype).reshape(36, 48)


def _processor_pixels(data: bytes) -> torch.Tensor:
    """What the exported model's processor makes of the file."""
    return PROCESSOR(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("dtype", [np.int32, np.uint32])
def test_a_32_bit_tiff_of_8_bit_values_is_its_picture_on_both_paths(dtype):
    """It was read as 16-bit, keeping each value's high byte: 0 for all of them, a black image
    instead of the gradient the processor sees."""
    values = _gradient8(dtype)
    data = _encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"  # what Pillow makes of it
    expected = np.repeat(values.astype(np.uint8)[..., None], 3, axis=2)
    assert 100 < expected.mean() < 150  # the gradient, not a black page

    np.testing.assert_array_equal(decode_image_array(data), expected)  # training's fast path
    raw = {"__key__": "k", "png": data}
    np.testing.assert_array_equal(np.asarray(decode_image(raw)), expected)  # eval's, and the stream's

    reference = _processor_pixels(data)
    exact = make_preprocess(PROCESSOR)(decode_image(raw))
    torch.testing.assert_close(exact, reference, atol=1e-5, rtol=0)
    uint8_pixels = make_fast_preprocess(PROCESSOR)(data)
    fast = make_device_transform(PROCESSOR)(uint8_pixels[None], "cpu", torch.float32)[0]
    levels = (fast - reference).abs() * torch.tensor(PROCESSOR.image_std).view(3, 1, 1) * 255
    assert levels.max().item() <= 1.001  # the fast path's tolerance (tests/test_data_fast_path.py)


def test_a_32_bit_tiff_over_255_clips_as_the_processor_does():
    """No 16-bit range is declared: values over 255 clip, as the processor clips them."""
    values = np.array([[0, 100, 255, 256, 70000, -5]], dtype=np.int32).repeat(4, axis=0)
    data = _encode(Image.fromarray(values), "TIFF")
    expected = np.repeat(np.clip(values, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(decode_image_array(data), expected)
    np.testing.assert_array_equal(np.asarray(decode_image({"__key__": "k", "png": data})), expected)


def test_a_16_bit_pgm_and_an_in_memory_16_bit_image_keep_their_scaling():
    """The 16-bit rule still holds where 16 bits are declared: a PGM (Pillow's ``I``, 0-65535) and
    an ``I;16`` image made in memory, handed to the preprocess without a file."""
    values = _gradient16()
    expected = (values >> 8).astype(np.uint8)
    pgm = SIXTEEN_BIT["pgm_I"](values)
    assert Image.open(io.BytesIO(pgm)).mode == "I"
    np.testing.assert_array_equal(decode_image_array(pgm)[..., 0], expected)
    in_memory = Image.fromarray(values)
    assert in_memory.mode == "I;16"
    preprocess = make_preprocess(PROCESSOR)
    eight_bit = Image.fromarray(expected).convert("RGB")
    torch.testing.assert_close(preprocess(in_memory), preprocess(eight_bit), atol=0, rtol=0)


@pytest.mark.parametrize("random_resized_crop", [False, True])
def test_device_transform_returns_contiguous_pixels_for_a_channels_last_batch(random_resized_crop):
    """A channels-last batch kept its layout through the cast and the normalisation: pixel_values
    were not contiguous, as the transform promises, and their strides depended on the input."""
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, 24, 24), dtype=torch.uint8, generator=generator)
    channels_last = pixels.contiguous(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    outputs = []
    for batch in (pixels, channels_last):
        transform = make_device_transform(PROCESSOR, random_resized_crop=random_resized_crop, seed=3)
        outputs.append(transform(batch, "cpu", torch.bfloat16))
    assert outputs[1].is_contiguous() and outputs[1].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[1], outputs[0], atol=0, rtol=0)  # the same crops and values
    # A batch a float preprocess normalised already is only cast: contiguous too.
    floats = make_device_transform(PROCESSOR)(channels_last.float(), "cpu", torch.bfloat16)
    assert floats.is_contiguous()
