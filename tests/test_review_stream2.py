"""Review of the device-side training augmentation (``vutrain/data/device_transform.py``).

open_clip's ``RandomResizedCrop`` works on PIL images: torchvision's box sampling (with its
centre-crop fallback clamped to the aspect-ratio range) and PIL's bicubic resample.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from vutrain.data.device_transform import crop_and_resize, random_resized_crop_boxes


def _thumbnail(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A thumbnail-like uint8 RGB image: gradients, saturated shapes with hard edges, text-like noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (height + width)], -1)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 8), rng.integers(0, height - 8)
        x1, y1 = x0 + rng.integers(4, width // 2), y0 + rng.integers(4, height // 2)
        colour = tuple(int(v) for v in rng.choice([0, 255], 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(image).copy()
    pixels[height // 3 : height // 3 + 6] = rng.choice([0, 255], (6, width, 3))  # a line of "text"
    return pixels


def test_random_crop_fallback_of_a_non_square_image_is_torchvision_centre_crop():
    """When no attempt fits (a 100 x 300 image at scale 0.9-1.0: any crop of that area is wider
    than 4:3 allows), torchvision takes the centre crop clamped to the ratio range: 100 x 133 at
    top 0, left 83. The whole 3:1 image was taken instead (an aspect the augmentation never makes)."""
    boxes = random_resized_crop_boxes(64, 100, 300, torch.Generator().manual_seed(0))
    expected = torch.tensor([0.0, 83.0, 100.0, 133.0])
    assert torch.equal(boxes, expected.expand(64, 4))
    tall = random_resized_crop_boxes(8, 300, 100, torch.Generator().manual_seed(0))
    assert torch.equal(tall, torch.tensor([83.0, 0.0, 133.0, 100.0]).expand(8, 4))


def test_random_crop_of_a_square_image_keeps_its_boxes():
    """On square images (every preset) the fallback is the whole image, as before: the boxes a
    seed gives are unchanged, so a run resumed across this fix crops as it did."""
    boxes = random_resized_crop_boxes(2000, 64, 64, torch.Generator().manual_seed(3))
    top, left, h, w = boxes.unbind(1)
    whole = (h == 64) & (w == 64)
    assert whole.any() and (~whole).any()
    assert (top[whole] == 0).all() and (left[whole] == 0).all()
    assert (top + h <= 64).all() and (left + w <= 64).all()


def test_random_crop_resamples_as_pil_bicubic():
    """Each image's crop equals PIL's ``crop(box).resize((S, S), BICUBIC)`` of the same uint8 image
    (open_clip's RandomResizedCrop: torchvision crops, then resizes) within 1 grey level after
    rounding. grid_sample's bicubic (a = -0.75, replicated border, no clipping between passes) was up
    to 40 levels off on hard edges; taps read past the box, as ``resize(box=...)`` reads them, put
    the outer pixels up to 8 levels off (until 2026-12-07)."""
    size = 64
    images = [_thumbnail(size, size, seed) for seed in range(6)]
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    boxes = random_resized_crop_boxes(len(images), size, size, torch.Generator().manual_seed(5))
    boxes[0] = torch.tensor([3.0, 1.0, 58.0, 62.0])  # a box that surely is not the whole image
    boxes[1] = torch.tensor([5.0, 2.0, 54.0, 58.0])  # (2, 5, 60, 59) as (left, top, right, bottom)
    out = crop_and_resize(pixels, boxes).round().permute(0, 2, 3, 1).numpy()
    for i, (top, left, ch, cw) in enumerate(boxes.tolist()):
        box = (left, top, left + cw, top + ch)
        box = tuple(int(v) for v in box)
        expected = np.asarray(Image.fromarray(images[i]).crop(box).resize((size, size), Image.BICUBIC))
        diff = np.abs(out[i] - expected.astype(np.float32))
        assert diff.max() <= 1, (i, box, diff.max(), diff.mean())


def test_random_crop_of_the_whole_image_is_the_image():
    pixels = torch.from_numpy(np.stack([_thumbnail(32, 48)])).permute(0, 3, 1, 2).float()
    out = crop_and_resize(pixels, torch.tensor([[0.0, 0.0, 32.0, 48.0]]))
    assert torch.equal(out, pixels)
