"""Pixel normalisation and the training augmentation, on the device, for uint8 batches.

The loader workers hand over ``uint8 [B, 3, S, S]`` (cropped and resized once, see
``preprocess.ClipCropUint8``): a quarter of the bytes of fp32 through the worker queues and the
host-to-device copy. The trainer makes one call per micro-batch::

    pixel_values = transform(batch["pixel_values"], device, dtype)

which copies the batch to the device (non-blocking: the loader pins it when CUDA is present),
optionally applies open_clip's training augmentation (``RandomResizedCrop(S, scale=(0.9, 1.0))``,
torchvision's boxes and PIL's bicubic, as open_clip crops PIL images), then rescales and
normalises with the processor's mean and std in fp32 and casts to ``dtype``. On a GPU these are
a few gathers and elementwise kernels; in CPU runs the same code runs on the
CPU. Float batches (from a float preprocess, already normalised) are only moved and cast.

Augmentation randomness is a pure function of (seed, rank, batch index), with the batch index
read from the data stream, so a resumed run crops exactly as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch

from .preprocess import normalisation

OPEN_CLIP_SCALE = (0.9, 1.0)
"""open_clip's ``RandomResizedCrop`` area range for training (``image_transform(is_train=True)``)."""
ASPECT_RATIOS = (3 / 4, 4 / 3)
"""torchvision's default aspect-ratio range of the random crop."""
_ATTEMPTS = 10  # torchvision's rejection-sampling attempts before it falls back to a centre crop


def random_resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = OPEN_CLIP_SCALE,
    ratio: tuple[float, float] = ASPECT_RATIOS,
) -> torch.Tensor:
    """torchvision ``RandomResizedCrop.get_params`` for ``n`` images at once.

    Returns:
        float [n, 4]: (top, left, crop_h, crop_w) in pixels of each crop.
    """
    area = height * width
    target = area * torch.empty(n, _ATTEMPTS).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n, _ATTEMPTS).uniform_(
        math.log(ratio[0]), math.log(ratio[1]), generator=generator
    )
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full((n,), -1))
    rows, found = torch.arange(n), first >= 0
    fallback_h, fallback_w = _fallback_crop(height, width, ratio)
    ch = torch.where(found, h[rows, first.clamp(min=0)], torch.tensor(float(fallback_h)))
    cw = torch.where(found, w[rows, first.clamp(min=0)], torch.tensor(float(fallback_w)))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(found, torch.floor(u[:, 0] * (height - ch + 1)), float((height - fallback_h) // 2))
    left = torch.where(found, torch.floor(u[:, 1] * (width - cw + 1)), float((width - fallback_w) // 2))
    return torch.stack([top, left, ch, cw], dim=1)


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(crop_h, crop_w) of torchvision's fallback when no attempt fits: the whole image, clamped to
    the ratio range (a centre crop), so a non-square image is never taken at an aspect outside it."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return int(round(width / min(ratio))), width
    if in_ratio > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def crop_and_resize(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Resample each image's box back to the full size with PIL's bicubic, batched on the device.

    open_clip crops PIL images, so its resample is PIL's: the bicubic with a = -0.5 of the crop,
    taps clipped at the crop's border and renormalised. ``grid_sample``'s bicubic (a = -0.75, replicated
    border) was sharper: mean 0.6, p99 6, single pixels 19 grey levels off PIL's on a photo.

    Args:
        pixels: float [B, C, H, W] in 0..255.
        boxes: float [B, 4] (top, left, crop_h, crop_w), as from :func:`random_resized_crop_boxes`;
            each box lies inside its image (an upscale or the identity, as every such crop is).
    """
    # fp32 inside an autocast region too: autocast runs these matmuls in bf16 (fp16), up to 2 grey
    # levels off PIL's bicubic (the weights rounded to 8 bits, the sums to whole levels).
    if torch.amp.is_autocast_available(pixels.device.type):
        with torch.autocast(pixels.device.type, enabled=False):
            return _crop_and_resize(pixels, boxes)
    return _crop_and_resize(pixels, boxes)


def _crop_and_resize(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    height, width = pixels.shape[2:]
    top, left, ch, cw = boxes.to(pixels.device, torch.float32).unbind(1)
    rows = _bicubic_matrix(top, ch, height, height)  # [B, height, H]
    cols = _bicubic_matrix(left, cw, width, width)  # [B, width, W]
    # PIL's order: along the width first, its result rounded and clipped to uint8, then along the
    # height (the clipping matters where the first pass overshoots a saturated edge).
    out = (pixels @ cols.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)
    resampled = rows.unsqueeze(1) @ out
    return resampled.clamp_(0, 255)


_TAPS = 5
"""Source pixels an upscaling bicubic (support 2) reads per output pixel, at most."""


def _pil_bicubic(t: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    t = t.abs()
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = (((t - 5) * t + 8) * t - 4) * a
    return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _bicubic_matrix(start: torch.Tensor, length: torch.Tensor, out_size: int, in_size: int) -> torch.Tensor:
    """PIL's ``precompute_coeffs`` for one axis of each box, as a dense [B, out_size, in_size]
    resampling matrix (a batched matmul applies it: far faster than per-tap gathers on a CPU).
    Output pixel centres map onto the box's (``start + (x + 0.5) * scale``)."""
    positions = torch.arange(out_size, device=start.device, dtype=torch.float32) + 0.5
    center = start[:, None] + positions * (length / out_size)[:, None]
    # PIL: (int)(center - support + 0.5), support 2. The taps stop at the box's edges, as they do
    # where open_clip (torchvision) crops first and resizes the crop: clipped at the image border
    # instead, as PIL's resize(box=...) clips, the outer pixels read past the box (up to 8 levels).
    end = (start + length)[:, None]
    lo = torch.maximum(torch.trunc(center - 1.5), start[:, None])
    hi = torch.minimum(torch.trunc(center + 2.5), end).clamp_(max=in_size)
    source = lo[..., None] + torch.arange(_TAPS, device=start.device, dtype=torch.float32)
    weights = _pil_bicubic(source - center[..., None] + 0.5) * (source < hi[..., None])
    weights = weights / weights.sum(-1, keepdim=True)
    index = source.clamp_(max=in_size - 1).long()
    matrix = torch.zeros(*center.shape, in_size, device=start.device, dtype=torch.float32)
    return matrix.scatter_add_(2, index, weights)  # clamped taps carry weight 0


class DeviceTransform:
    """``transform(pixels, device, dtype)``: uint8 [B, 3, S, S] -> normalised ``dtype`` on ``device``.

    Args:
        mean, std, rescale: the processor's ``image_mean``, ``image_std``, ``rescale_factor``.
        random_resized_crop: apply open_clip's training crop (``data.random_resized_crop``).
        seed, rank: fix the crops with the batch index.
        position: returns the data stream's batch index (``TrainStream.batches_seen``), so
            crops survive a resume; None counts calls instead.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        rescale: float = 1 / 255,
        random_resized_crop: bool = False,
        seed: int = 0,
        rank: int = 0,
        position: Callable[[], int] | None = None,
        scale: tuple[float, float] = OPEN_CLIP_SCALE,
    ):
        # (x * rescale - mean) / std as one multiply-add per element: x * gain + bias
        self.gain = torch.tensor([rescale / s for s in std]).view(1, -1, 1, 1)
        self.bias = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1)
        self.random_resized_crop, self.scale = random_resized_crop, scale
        self.seed, self.rank, self.position = seed, rank, position
        self.calls = 0
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _coefficients(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.gain.to(device), self.bias.to(device))
        return self._on_device[device]

    def _generator(self) -> torch.Generator:
        index = self.position() if self.position is not None else self.calls
        digest = hashlib.blake2b(f"crop/{self.seed}/{self.rank}/{index}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))

    def __call__(self, pixels: torch.Tensor, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The model's ``pixel_values``: [B, 3, S, S] of ``dtype`` on ``device``, contiguous."""
        device = torch.device(device)
        x = pixels.to(device, non_blocking=True)
        # Contiguous whatever the input's layout, in the cast's own copy: a channels-last batch
        # kept its layout through the cast and addcmul, so pixel_values' strides differed by input.
        if x.is_floating_point():  # already normalised by a float preprocess
            return x.to(dtype, memory_format=torch.contiguous_format)
        self.calls += 1
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        if self.random_resized_crop:
            boxes = random_resized_crop_boxes(
                x.shape[0], x.shape[2], x.shape[3], self._generator(), self.scale
            )
            # The boxes come from a CPU generator (the same crops on any device). A blocking
            # host-to-GPU copy waits for the device's whole queue (the previous step's backward
            # and optimizer step): one stall per micro-batch. From pinned memory the copy is
            # queued like the pixels' instead.
            if device.type == "cuda":
                boxes = boxes.pin_memory()
            x = crop_and_resize(x, boxes.to(device, non_blocking=True))
        gain, bias = self._coefficients(device)
        return torch.addcmul(bias, x, gain).to(dtype)


def make_device_transform(
    image_processor,
    random_resized_crop: bool = False,
    seed: int = 0,
    rank: int = 0,
    position: Callable[[], int] | None = None,
) -> DeviceTransform:
    """The :class:`DeviceTransform` with ``image_processor``'s mean, std and rescale factor."""
    mean, std, rescale = normalisation(image_processor)
    return DeviceTransform(
        mean, std, rescale, random_resized_crop=random_resized_crop, seed=seed, rank=rank, position=position
    )
