"""Pixel normalisation and the training augmentation, on the device, for uint8 batches.

The loader workers hand over ``uint8 [B, 3, S, S]`` (cropped and resized once, see
``preprocess.ClipCropUint8``): a quarter of the bytes of fp32 through the worker queues and the
host-to-device copy. The trainer makes one call per micro-batch::

    pixel_values = transform(batch["pixel_values"], device, dtype)

which copies the batch to the device (non-blocking: the loader pins it when CUDA is present),
optionally applies open_clip's training augmentation (``RandomResizedCrop(S, scale=(0.9, 1.0))``,
bicubic), then rescales and normalises with the processor's mean and std in fp32 and casts to
``dtype``. On a GPU these are a few elementwise kernels; in CPU runs the same code runs on the
CPU. Float batches (from a float preprocess, already normalised) are only moved and cast.

Augmentation randomness is a pure function of (seed, rank, batch index), with the batch index
read from the data stream, so a resumed run crops exactly as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

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
    rows = torch.arange(n)
    ch = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.tensor(float(height)))
    cw = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.tensor(float(width)))
    # The fallback (no attempt fits) is the whole image: torchvision's centre crop clamped to the
    # ratio range, which for the square inputs here is the image itself.
    u = torch.rand(n, 2, generator=generator)
    top = torch.floor(u[:, 0] * (height - ch + 1))
    left = torch.floor(u[:, 1] * (width - cw + 1))
    return torch.stack([top, left, ch, cw], dim=1)


def crop_and_resize(pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Resample each image's box back to the full size (bicubic), in one batched kernel.

    Args:
        pixels: float [B, C, H, W] in 0..255.
        boxes: float [B, 4] (top, left, crop_h, crop_w), as from :func:`random_resized_crop_boxes`.
    """
    b, c, height, width = pixels.shape
    top, left, ch, cw = boxes.to(pixels.device, torch.float32).unbind(1)
    theta = torch.zeros(b, 2, 3, device=pixels.device)
    # Output pixel centres map onto the box's pixel centres (align_corners=False convention).
    theta[:, 0, 0], theta[:, 0, 2] = cw / width, (2 * left + cw) / width - 1
    theta[:, 1, 1], theta[:, 1, 2] = ch / height, (2 * top + ch) / height - 1
    grid = F.affine_grid(theta, [b, c, height, width], align_corners=False)
    out = F.grid_sample(pixels, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return out.clamp_(0, 255)  # bicubic overshoots at edges; PIL clips the same way


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
        if x.is_floating_point():  # already normalised by a float preprocess
            return x.to(dtype)
        self.calls += 1
        x = x.float()
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
