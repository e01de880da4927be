"""Sample decoding (vutrain/data/samples.py): 16-bit greyscale images, made by Pillow, through the
real decode paths of training (the fast path, and the PIL path of the stream) and of eval; the skip
of a shard whose keys hold a dot."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from tar_shards import image_bytes, one_rank_stream, write_members

from vutrain.data import TrainStream
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
from vutrain.data.samples import decode_image, decode_image_array, decode_sample, iter_raw_samples

PROCESSOR = {"size": {"shortest_edge": 24}, "crop_size": {"height": 24, "width": 24}}
TRANSPARENT = 40000  # a 16-bit grey of the gradient below, made transparent by a PNG tRNS chunk


def _gradient16() -> np.ndarray:
    """A 48x36 16-bit grey gradient over the whole range, 0 to 65535."""
    return np.linspace(0, 65535, 48 * 36).round().astype(np.uint16).reshape(36, 48)


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


SIXTEEN_BIT = {
    "png_I;16": lambda v: _encode(Image.fromarray(v), "PNG"),
    "tiff_I;16B": lambda v: _encode(Image.fromarray(v.astype(">u2")), "TIFF"),
    "pgm_I": lambda v: _encode(Image.fromarray(v), "PPM"),  # Pillow opens a 16-bit PGM as mode I
    "png_I;16_tRNS": lambda v: _encode(Image.fromarray(v), "PNG", transparency=TRANSPARENT),
}


def _expected_rgb(values: np.ndarray, name: str) -> np.ndarray:
    """The 8-bit picture: each value's high byte, as viewers show it; white where transparent."""
    grey = (values >> 8).astype(np.uint8)
    if name.endswith("tRNS"):
        grey[values == TRANSPARENT] = 255  # composited onto white, as every transparency is
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("name", sorted(SIXTEEN_BIT))
def test_sixteen_bit_grey_is_scaled_to_8_bits_on_every_decode_path(name):
    """Pillow's convert clipped each value at 255: a real 16-bit greyscale image trained (and was
    evaluated) as an almost white one, silently."""
    values = _gradient16()
    data = SIXTEEN_BIT[name](values)
    assert Image.open(io.BytesIO(data)).mode in ("I;16", "I;16B", "I")  # what Pillow makes of it
    expected = _expected_rgb(values, name)
    assert 100 < expected.mean() < 150  # the gradient, not a white page

    np.testing.assert_array_equal(decode_image_array(data), expected)  # training's fast path
    raw = {"__key__": "k", "png": data}
    np.testing.assert_array_equal(np.asarray(decode_image(raw)), expected)  # eval's, and the stream's

    # Both preprocesses give exactly the pixels of the 8-bit picture saved as an 8-bit PNG.
    eight_bit = _encode(Image.fromarray(expected), "PNG")
    fast = make_fast_preprocess(PROCESSOR)
    torch.testing.assert_close(fast(data), fast(eight_bit), atol=0, rtol=0)
    exact = make_preprocess(PROCESSOR)
    eight_bit_raw = {"__key__": "k", "png": eight_bit}
    torch.testing.assert_close(exact(decode_image(raw)), exact(decode_image(eight_bit_raw)), atol=0, rtol=0)


def test_sixteen_bit_grey_png_in_a_shard_trains_and_evaluates_as_its_picture(tmp_path):
    """Through a real tar shard: the training stream's fast path, its PIL path (fast_preprocess
    off) and eval's decode_sample all see the 8-bit picture, and nothing is skipped."""
    values = _gradient16()
    expected = _expected_rgb(values, "png")
    shard = write_members(
        tmp_path / "grey16.tar",
        [("a.png", SIXTEEN_BIT["png_I;16"](values)), ("a.txt", b"a grey gradient")],
    )

    fast = TrainStream(
        shard,
        preprocess=make_fast_preprocess(PROCESSOR),
        tokenize=lambda texts: {"input_ids": [[1]] * len(texts), "attention_mask": [[1]] * len(texts)},
        batch_size=1,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        shuffle_buffer=1,
        num_samples=1,
    )
    with fast:
        pixels = next(fast)["pixel_values"][0]
        assert fast.skipped() == {}
    eight_bit = _encode(Image.fromarray(expected), "PNG")
    torch.testing.assert_close(pixels, make_fast_preprocess(PROCESSOR)(eight_bit), atol=0, rtol=0)

    with one_rank_stream(shard, 1, shuffle_buffer=1) as pil_path:  # a preprocess that keeps the pixels
        pixels = next(pil_path)["pixel_values"][0]
        assert pil_path.skipped() == {}
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), expected)

    (raw,) = iter_raw_samples(shard)
    image, caption, _ = decode_sample(raw, "{txt}")
    assert caption == "a grey gradient"
    np.testing.assert_array_equal(np.asarray(image), expected)


def test_a_shard_with_dots_in_its_keys_names_the_cause_of_its_skips(tmp_path, caplog):
    """``photo.001.jpg``: the key ends at the first dot (webdataset's rule), so photo.000 to
    photo.002 are one sample ``photo`` without a ``txt``; its skip said only "no value for caption
    field 'txt'", with nothing to tell a user that the file names were the cause."""
    members = []
    for i in range(3):
        members += [(f"photo.{i:03d}.jpg", image_bytes()), (f"photo.{i:03d}.txt", b"a dotted one")]
    members += [("good.jpg", image_bytes()), ("good.txt", b"a good one")]
    shard = write_members(tmp_path / "dotted.tar", members)

    with caplog.at_level(logging.WARNING), one_rank_stream(shard, 1, shuffle_buffer=1) as stream:
        assert next(stream)["input_ids"].tolist() == [[len("a good one")]]
        assert stream.skipped() == {"missing_caption": 1}
    skips = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(skips) == 1
    assert "photo.000.jpg, photo.000.txt, photo.001.jpg, ..." in skips[0]
    assert "a key ends at the first dot of a file name" in skips[0]
