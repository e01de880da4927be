"""CLIP image preprocessing without torchvision, equal to HF ``CLIPImageProcessor``.

Resize the shortest side to ``size["shortest_edge"]`` (long side ``int(s * long / short)``, the
processor's resample filter, bicubic for CLIP), centre-crop ``crop_size``, rescale by
``rescale_factor`` (1/255) and normalise with ``image_mean`` / ``image_std``.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _get(obj, name: str):
    value = getattr(obj, name, None)
    if value is None and isinstance(obj, dict):
        value = obj.get(name)
    return value


def _size_value(size, name: str):
    if size is None:
        return None
    value = getattr(size, name, None)
    if value is None and hasattr(size, "get"):
        value = size.get(name)
    return value


class ClipPreprocess:
    """Picklable callable ``PIL.Image -> FloatTensor[3, crop_h, crop_w]`` (DataLoader workers)."""

    def __init__(self, shortest_edge: int, crop_hw: tuple[int, int], resample: int,
                 mean: tuple[float, ...], std: tuple[float, ...], rescale: float = 1 / 255):
        self.shortest_edge, self.crop_hw, self.resample = int(shortest_edge), crop_hw, int(resample)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.rescale = rescale

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # [3, H, W]
        ch, cw = self.crop_hw
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        if top < 0 or left < 0:  # the processor pads small images with zeros; same here
            padded = np.zeros((3, max(ch, new_h), max(cw, new_w)), dtype=np.float32)
            pt, pl = max(0, -top), max(0, -left)
            padded[:, pt:pt + new_h, pl:pl + new_w] = array
            array, top, left = padded, max(0, top), max(0, left)
        array = array[:, top:top + ch, left:left + cw]
        array = (array * np.float32(self.rescale) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


def make_preprocess(image_processor) -> ClipPreprocess:
    """Build the preprocessing callable from a ``CLIPImageProcessor`` (or its dict config).

    Returns:
        callable mapping a PIL image to ``FloatTensor[3, S, S]`` (S = crop size).
    """
    size, crop = _get(image_processor, "size"), _get(image_processor, "crop_size")
    shortest = _size_value(size, "shortest_edge") or _size_value(size, "height")
    crop_h, crop_w = _size_value(crop, "height"), _size_value(crop, "width")
    if shortest is None or crop_h is None or crop_w is None:
        raise ValueError(f"image processor needs size.shortest_edge and crop_size.height/width; "
                         f"got size={size}, crop_size={crop}")
    resample = _get(image_processor, "resample")
    resample = int(Image.Resampling.BICUBIC if resample is None else resample)
    mean = _get(image_processor, "image_mean") or (0.48145466, 0.4578275, 0.40821073)
    std = _get(image_processor, "image_std") or (0.26862954, 0.26130258, 0.27577711)
    rescale = _get(image_processor, "rescale_factor") or 1 / 255
    return ClipPreprocess(shortest, (int(crop_h), int(crop_w)), resample, tuple(mean), tuple(std), rescale)
