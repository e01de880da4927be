"""The fast path against CLIPImageProcessor itself on odd inputs and other resample filters."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor

from vutrain.bench_data import photo_like
from vutrain.data.device_transform import make_device_transform
from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
from vutrain.data.samples import decode_image


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def _levels_off_processor(processor, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """|fast - processor| and |eval path - processor| per value, in grey levels; the reference is
    CLIPImageProcessor's own output on the image as PIL opens it."""
    ref = processor(images=Image.open(io.BytesIO(data)), return_tensors="pt")["pixel_values"][0]
    fast = make_device_transform(processor)(make_fast_preprocess(processor)(data)[None], "cpu", torch.float32)
    exact = make_preprocess(processor)(decode_image({"__key__": "k", "img": data, "png": data}))
    std = torch.tensor(processor.image_std).view(3, 1, 1) * 255
    return ((fast[0] - ref) * std).abs(), ((exact - ref) * std).abs()


@pytest.mark.parametrize("resample", [Image.Resampling.NEAREST, Image.Resampling.BOX])
def test_nearest_and_box_processors_are_not_dct_scaled(resample):
    # A 341x256 JPEG is over 2.5x a 32 px target: bicubic decodes it DCT-scaled. Nearest and box
    # from the DCT-scaled pixels were mean 2-4, p99 12-48 grey levels off the processor.
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, resample=int(resample)
    )
    for seed in range(2):
        data = _encode(photo_like(np.random.default_rng(seed), 341, 256), "JPEG", quality=85)
        fast, exact = _levels_off_processor(processor, data)
        assert fast.max().item() <= 1.001, (resample, seed, fast.mean().item())
        assert exact.max().item() <= 0.001


def _odd_images() -> dict[str, bytes]:
    photo = photo_like(np.random.default_rng(3), 48, 36)
    rgba = np.array(photo.convert("RGBA"))
    rgba[..., 3] = np.linspace(0, 255, 48, dtype=np.uint8)[None, :]
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: neither the processor nor either path applies it
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    frames = [photo, Image.new("RGB", photo.size, (0, 255, 0))]
    return {
        "cmyk_jpeg": _encode(photo.convert("CMYK"), "JPEG", quality=95),
        "grey_jpeg": _encode(photo.convert("L"), "JPEG", quality=95),
        # 16-bit grey is scaled to 8 bits, not clipped as the processor does: test_review_samples1.py.
        "palette_transparency_png": _encode(palette, "PNG", transparency=0),
        "rgba_webp": _encode(Image.fromarray(rgba), "WEBP", lossless=True),
        "exif_rotated_jpeg": _encode(photo, "JPEG", quality=95, exif=exif.tobytes()),
        "1x1_png": _encode(Image.new("RGB", (1, 1), (200, 10, 30)), "PNG"),
        "1x40_jpeg": _encode(photo.resize((1, 40)), "JPEG", quality=95),
        "animated_gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated_webp": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
    }


@pytest.mark.parametrize("name", sorted(_odd_images()))
def test_odd_images_match_the_processor_on_both_paths(name):
    processor = CLIPImageProcessor(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24})
    fast, exact = _levels_off_processor(processor, _odd_images()[name])
    assert exact.max().item() <= 0.001
    assert fast.max().item() <= 1.001
