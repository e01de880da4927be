"""CLIP image preprocessing without torchvision, equal to HF ``CLIPImageProcessor``.

Resize the shortest side to ``size["shortest_edge"]`` (long side ``int(s * long / short)``, the
processor's resample filter, bicubic for CLIP), or to exactly ``size["height"] x size["width"]``
(the processor's squash, e.g. SigLIP's), centre-crop ``crop_size`` (unless ``do_center_crop`` is
false), rescale by ``rescale_factor`` (1/255) and normalise with ``image_mean`` / ``image_std``
(``do_rescale`` / ``do_normalize`` false skip them). Other processor settings (no resize, a
``longest_edge`` or ``max_height`` size, no crop after a shortest-edge resize: images of varying
size) are refused at start-up with a one-line error.

Two implementations of that one geometry:

- :class:`ClipPreprocess` (``make_preprocess``): PIL image -> normalised float [3, S, S], the
  processor's exact semantics (eval, export, ``data.fast_preprocess=false``).
- :class:`ClipCropUint8` (``make_fast_preprocess``): encoded bytes -> uint8 [3, S, S], for the
  training workers. A JPEG at least 3.2x the target is decoded DCT-scaled (``Image.draft``; not for
  a nearest or box resample, see ``_DRAFT_FILTERS``), and
  the one resize is torch's antialiased bicubic on uint8 (PIL's filter, its two passes in PIL's
  order: within 2 grey levels of ``Image.resize``, about 3x faster). Rescale and normalisation
  run later on the device (``device_transform.py``), where they cost nothing.
"""

from __future__ import annotations

import math

import numpy as np
import PIL
import torch
import torch.nn.functional as F
from PIL import Image

from .samples import decode_image_array, draft_scale, jpeg_size, to_rgb


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


def _size_dict(size, default_to_square: bool):
    """``size`` / ``crop_size`` as transformers' ``get_size_dict`` reads them. A dict config
    (``json.load`` of a preprocessor_config.json) may hold one number, as OpenAI's CLIP configs do
    (``"size": 224, "crop_size": 224``: shortest edge 224, a 224 x 224 crop), or a (height, width)
    pair; the processor object turns them into dicts, a dict config was refused ("needs
    size.shortest_edge or size.height/width; got size=224")."""
    if isinstance(size, int) and not isinstance(size, bool):
        return {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": size[0], "width": size[1]}
    return size


Resize = int | tuple[int, int]
"""The processor's resize: the shortest edge (an int), or a fixed (height, width)."""


class ClipPreprocess:
    """Picklable callable ``PIL.Image -> FloatTensor[3, crop_h, crop_w]`` (DataLoader workers)."""

    def __init__(
        self,
        resize: Resize,
        crop_hw: tuple[int, int],
        resample: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        rescale: float = 1 / 255,
    ):
        self.resize, self.crop_hw, self.resample = _resize_spec(resize), crop_hw, int(resample)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
        self.rescale = rescale

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Resize, centre-crop and normalise one image."""
        image = to_rgb(image)
        w, h = image.size
        new_w, new_h = resized_geometry(w, h, self.resize)
        if _needs_window(new_w, new_h, self.crop_hw):
            # As the fast path: the full resize of a 1 x 60000 image is 224 x 13 million pixels, in
            # fp32 below some 35 GB, which killed the eval (and the run) at that sample.
            vertical_first = _vertical_first((w, h), new_w, new_h)
            size, offset = crop_window(new_w, new_h, self.crop_hw)
            image = window_resize(
                np.asarray(image), (new_w, new_h), offset, size, (w, h), self.resample, vertical_first
            )
            new_w, new_h = size
        elif (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), resample=self.resample)
        array = np.asarray(image, dtype=np.float32).transpose(2, 0, 1)  # [3, H, W]
        ch, cw = self.crop_hw
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        if top < 0 or left < 0:  # the processor pads small images with zeros; same here
            padded = np.zeros((3, max(ch, new_h), max(cw, new_w)), dtype=np.float32)
            pt, pl = max(0, -top), max(0, -left)
            padded[:, pt : pt + new_h, pl : pl + new_w] = array
            array, top, left = padded, max(0, top), max(0, left)
        array = array[:, top : top + ch, left : left + cw]
        array = (array * np.float32(self.rescale) - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


WINDOW_RESIZE_RATIO = 16
"""A resize whose output has more than this many times the crop's pixels resizes the crop's window
only. The processor's full resize of an extreme aspect ratio is enormous (a 1x10000 JPEG of 31 kB
at shortest edge 224: 224 x 2,240,000 pixels, 5.7 s and 3.9 GB in one loader worker; a 1x65535
one would take some 25 GB and kill the worker, and with it the run, at the same sample again on
every resume). Every image up to a 16:1 aspect ratio keeps the full resize; the eval path
(``ClipPreprocess``) windows the same images (its fp32 full resize of a 1x60000 image was some 35 GB)."""


def _needs_window(new_w: int, new_h: int, crop_hw: tuple[int, int]) -> bool:
    return new_w * new_h > WINDOW_RESIZE_RATIO * crop_hw[0] * crop_hw[1]


def crop_window(new_w: int, new_h: int, crop_hw: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The part of a resize to (new_w, new_h) that the centre crop keeps: its size (the crop on an
    axis it fits, the whole resized axis on one it pads) and its offset in the resized image.
    Resize it with :func:`window_resize`."""
    size, offset = [], []
    for new, crop in ((new_w, crop_hw[1]), (new_h, crop_hw[0])):
        start = (new - crop) // 2
        lo, length = (start, crop) if start >= 0 else (0, new)
        size.append(length)
        offset.append(lo)
    return (size[0], size[1]), (offset[0], offset[1])


_FILTER_SUPPORT = {
    int(Image.Resampling.BOX): 0.5,
    int(Image.Resampling.BILINEAR): 1.0,
    int(Image.Resampling.HAMMING): 1.0,
    int(Image.Resampling.BICUBIC): 2.0,
}
"""PIL's filter radii in source pixels at scale 1 (``Resample.c``); lanczos, and anything else, 3."""


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        px = x * math.pi
        w = np.sin(px) / px * (np.float32(0.54) + np.float32(0.46) * np.cos(px))
    return np.where(x == 0, 1.0, np.where(x >= 1, 0.0, w))


def _sinc(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(x == 0, 1.0, np.sin(x * math.pi) / (x * math.pi))


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0)
    )


_FILTERS = {
    int(Image.Resampling.BOX): lambda x: np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0),
    int(Image.Resampling.BILINEAR): lambda x: np.maximum(1 - np.abs(x), 0.0),
    int(Image.Resampling.HAMMING): _hamming,
    int(Image.Resampling.BICUBIC): _bicubic,
    int(Image.Resampling.LANCZOS): lambda x: np.where((x >= -3) & (x < 3), _sinc(x) * _sinc(x / 3), 0.0),
}
"""PIL's filter functions (``Resample.c``), on float64 as there."""

_PRECISION_BITS = 22
"""PIL's fixed-point coefficients for 8-bit images (``32 - 8 - 2``)."""


def _window_taps(
    in_size: int, extent: float, new: int, lo: int, length: int, resample: int
) -> tuple[np.ndarray, np.ndarray]:
    """(source indices, fixed-point weights), each [length, taps], of output pixels lo .. lo + length
    of PIL's resize of [0, extent) of an axis of ``in_size`` pixels to ``new``: PIL's own arithmetic
    for the full resize (``precompute_coeffs``; nearest: ``ImagingScaleAffine``'s running sum).

    ``resize(box=...)`` of the window instead computes the pixel centres from a float32 box: a
    centre the full resize puts at exactly 150.0 became 149.99998, and nearest or box took the
    row next to the processor's (up to 248 grey levels off on a 7x300 image at 32 px)."""
    scale = float(np.float32(extent)) / new
    if resample == Image.Resampling.NEAREST:
        steps = np.full(lo + length, scale)
        steps[0] = scale * 0.5
        position = np.add.accumulate(steps)[lo:]  # sequential, as PIL's += per output pixel
        index = position.astype(np.int64)[:, None]  # positions are >= 0: C's (int) truncation
        inside = index < in_size  # PIL leaves a pixel outside the source black
        return np.minimum(index, in_size - 1), np.where(inside, 1 << _PRECISION_BITS, 0)
    filterscale = max(scale, 1.0)
    support = _FILTER_SUPPORT.get(int(resample), 3.0) * filterscale
    taps = np.arange(math.ceil(support) * 2 + 1)
    center = (np.arange(lo, lo + length) + 0.5) * scale
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    count = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - first
    x = (taps + first[:, None] - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(taps < count[:, None], _FILTERS.get(int(resample), _FILTERS[1])(x), 0.0)
    total = np.zeros(length)
    for t in range(len(taps)):  # PIL's sequential sum (numpy's sum is pairwise)
        total = total + weights[:, t]
    weights = weights / np.where(total == 0, 1.0, total)[:, None]
    fixed = np.trunc(weights * (1 << _PRECISION_BITS) + np.where(weights < 0, -0.5, 0.5))
    return np.minimum(first[:, None] + taps, in_size - 1), fixed.astype(np.int64)


def window_resize(
    array: np.ndarray,
    full: tuple[int, int],
    offset: tuple[int, int],
    size: tuple[int, int],
    extent: tuple[float, float],
    resample: int,
    vertical_first: bool,
) -> np.ndarray:
    """The window ``size`` at ``offset`` (from :func:`crop_window`) of PIL's resize of the region
    [0, extent) of a uint8 [H, W, 3] array to ``full`` = (w, h): the same pixels, bit for bit,
    without the full resize's memory. Its two passes run in the full resize's order
    (``vertical_first``, from :func:`_vertical_first` of the full size), each PIL's arithmetic
    (``_window_taps``) on the rows and columns the filters reach only.
    """
    taps = [
        _window_taps(
            array.shape[axis], extent[1 - axis], full[1 - axis], offset[1 - axis], size[1 - axis], resample
        )
        for axis in (0, 1)
    ]
    # crop to what the filters reach: the first pass then stays window-sized on the other axis
    reach = [(int(index.min()), int(index.max()) + 1) for index, _ in taps]
    array = array[reach[0][0] : reach[0][1], reach[1][0] : reach[1][1]]
    for axis in (0, 1) if vertical_first else (1, 0):
        index, fixed = taps[axis]
        index = index - reach[axis][0]
        shape = (-1, 1, 1) if axis == 0 else (1, -1, 1)
        total = np.int64(1 << (_PRECISION_BITS - 1))
        for t in range(index.shape[1]):
            total = total + np.take(array, index[:, t], axis=axis).astype(np.int64) * fixed[:, t].reshape(
                shape
            )
        array = np.clip(total >> _PRECISION_BITS, 0, 255).astype(np.uint8)
    return array


def _resize_spec(resize) -> Resize:
    return (int(resize[0]), int(resize[1])) if isinstance(resize, (tuple, list)) else int(resize)


def resized_geometry(width: int, height: int, resize: Resize) -> tuple[int, int]:
    """(new_w, new_h) of the processor's resize: shortest side -> ``resize`` (an int), or exactly
    ``resize = (height, width)``."""
    if isinstance(resize, tuple):
        return resize[1], resize[0]
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


DRAFT_MARGIN = 1.6
"""DCT-scaled decode only down to 1.6x the resize target, never to the target itself: the final
antialiased bicubic then still shapes the result. Decoding straight to the target leaves the
JPEG's box-like DCT scaling as the only filter (measured on thumbnail-like JPEGs: 99th percentile
25-36 grey levels off the processor). With 1.25x, images decoded to 1.25-1.5x the target were
still up to mean 2.2, p99 17 off per image at 32 px (the fast path's bound: mean 1.5, p99 12);
from 1.6x on at most mean 1.3, p99 11. 1.6, not Pillow's 2 (``thumbnail``'s reducing_gap), keeps
a 1280x720 thumbnail at 224 px DCT-scaled (decoded at 640x360, 1.61x): about 1.5x faster."""

_DRAFT_FILTERS = frozenset(
    int(f)
    for f in (
        Image.Resampling.BICUBIC,
        Image.Resampling.BILINEAR,
        Image.Resampling.LANCZOS,
        Image.Resampling.HAMMING,
    )
)
"""Resample filters after which a DCT-scaled decode stays within the fast path's tolerance. Nearest
picks single source pixels and box averages whole ones: from a DCT-halved image they pick and
average other pixels than the processor (measured on thumbnail-like JPEGs at 32 px: nearest mean
3-4, p99 35-48, box p99 12-21 grey levels off), so those JPEGs decode in full."""

_TORCH_FILTERS = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}


class ClipCropUint8:
    """Picklable callable ``encoded image bytes -> ByteTensor[3, crop_h, crop_w]`` (RGB).

    The processor's geometry (shortest side to ``resize``, or exactly ``resize = (h, w)``; centre
    crop, zero padding when the crop is larger) computed from the original size; decode DCT-scaled
    (1/2, 1/4 or 1/8) when
    the JPEG is at least twice ``DRAFT_MARGIN`` x the resized size; one antialiased resize.
    Raises SkipSample(undecodable_image).
    """

    reads_bytes = True
    """TrainStream hands this preprocess the image member's bytes, not a decoded PIL image."""

    def __init__(self, resize: Resize, crop_hw: tuple[int, int], resample: int):
        self.resize, self.crop_hw, self.resample = _resize_spec(resize), crop_hw, int(resample)

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode (JPEG draft mode where possible), resize and centre-crop one encoded image to uint8."""
        size = jpeg_size(data)
        target = resized_geometry(*size, self.resize) if size else None
        draft_to = None
        if target and self.resample in _DRAFT_FILTERS:
            draft_to = tuple(math.ceil(v * DRAFT_MARGIN) for v in target)
        array = decode_image_array(data, draft_to)
        h, w = array.shape[:2]
        scale = draft_scale(size, draft_to) if draft_to else 1
        if target is None or (w, h) != (-(-size[0] // scale), -(-size[1] // scale)):
            # not a JPEG (PNG, WebP), or a frame header that disagrees with the decoded pixels:
            # the geometry of the decoded image
            target = resized_geometry(w, h, self.resize)
            extent = (w, h)
        else:
            # A DCT-scaled decode of a size that 1/scale does not divide has a last row/column
            # that covers only part of a block: the image spans size / scale decoded pixels, not
            # all of them. Resizing the whole array would stretch it by up to one decoded pixel.
            extent = (size[0] / scale, size[1] / scale)
        new_w, new_h = target
        if _needs_window(new_w, new_h, self.crop_hw):  # an extreme aspect ratio
            vertical_first = _vertical_first(extent, new_w, new_h)
            size, offset = crop_window(new_w, new_h, self.crop_hw)
            resized = window_resize(
                array, (new_w, new_h), offset, size, extent, self.resample, vertical_first
            )
            return self._crop(torch.from_numpy(resized).permute(2, 0, 1), *size)
        # [3, h, w] as a channels-last view of the decoder's HWC array: torch's uint8
        # antialiased kernels are vectorised for it, and they return a contiguous [3, h', w'].
        pixels = torch.from_numpy(array).permute(2, 0, 1)
        if (w, h) != (new_w, new_h):
            pixels = self._resize(pixels, new_w, new_h, extent)
        return self._crop(pixels, new_w, new_h)  # a view: the collation copies it once

    def _resize(
        self, pixels: torch.Tensor, new_w: int, new_h: int, extent: tuple[float, float]
    ) -> torch.Tensor:
        """Resize the region [0, extent) of ``pixels`` (all of it, or less after a partial block)."""
        h, w = pixels.shape[1:]
        mode = _TORCH_FILTERS.get(self.resample)
        if mode is None:  # lanczos, nearest, ...: PIL's own filter (slower, still one resize)
            image = Image.fromarray(pixels.permute(1, 2, 0).numpy())
            box = (0.0, 0.0, *extent)
            resized = np.array(image.resize((new_w, new_h), resample=self.resample, box=box))
            return torch.from_numpy(resized).permute(2, 0, 1)
        if _vertical_first(extent, new_w, new_h) and (new_w, extent[0]) != (w, w):
            # Pillow's order: torch's one call always runs the width pass first, and the uint8
            # rounding between the passes differs (up to 17 grey levels on noise, 33x90 -> 32x87).
            pixels = _interpolate(pixels, new_w=w, new_h=new_h, extent=(w, extent[1]), mode=mode)
            return _interpolate(pixels, new_w, new_h, extent=(extent[0], new_h), mode=mode)
        return _interpolate(pixels, new_w, new_h, extent, mode)

    def _crop(self, pixels: torch.Tensor, new_w: int, new_h: int) -> torch.Tensor:
        ch, cw = self.crop_hw
        top, left = (new_h - ch) // 2, (new_w - cw) // 2
        if top >= 0 and left >= 0:
            return pixels[:, top : top + ch, left : left + cw]
        out = torch.zeros((3, ch, cw), dtype=torch.uint8)  # the processor pads with zeros
        y0, x0 = max(top, 0), max(left, 0)
        y1, x1 = min(top + ch, new_h), min(left + cw, new_w)
        out[:, y0 - top : y1 - top, x0 - left : x1 - left] = pixels[:, y0:y1, x0:x1]
        return out


_PILLOW_ORDERS_PASSES = int(PIL.__version__.split(".")[0]) >= 13
"""Pillow 13 picks the order of its two resize passes (``ImagingResampleInner``); older ones
always resize the width first."""


def _vertical_first(extent: tuple[float, float], new_w: int, new_h: int) -> bool:
    """Whether PIL's ``resize`` of a (width, height) = ``extent`` region runs its height pass first:
    from Pillow 13, when the height shrinks by more than twice as many pixels as the width (or the
    width grows). Measured on Pillow 13.0.0: every one of some 400 random shapes up to 60 px
    matches this rule bit for bit, none the other order."""
    width, height = extent
    return _PILLOW_ORDERS_PASSES and new_h < height and 2 * (width - new_w) < height - new_h


def _interpolate(
    pixels: torch.Tensor, new_w: int, new_h: int, extent: tuple[float, float], mode: str
) -> torch.Tensor:
    """torch's antialiased resize of the region [0, extent) of ``pixels`` [3, h, w] to
    [3, new_h, new_w]; an axis whose size and extent stay is not resampled."""
    h, w = pixels.shape[1:]
    if extent == (w, h):
        out = F.interpolate(
            pixels.unsqueeze(0), size=(new_h, new_w), mode=mode, antialias=True, align_corners=False
        )
        return out[0]
    # The scale factors map [0, extent) onto the output (as PIL's resize with a box); the
    # output is at least (new_h, new_w) and its first rows and columns are the image.
    out = F.interpolate(
        pixels.unsqueeze(0),
        scale_factor=(_scale_to_cover(h, new_h, extent[1]), _scale_to_cover(w, new_w, extent[0])),
        mode=mode,
        antialias=True,
        align_corners=False,
        recompute_scale_factor=False,
    )
    return out[0, :, :new_h, :new_w]


def _scale_to_cover(size: int, new: int, extent: float) -> float:
    """``new / extent``, one ulp up where ``int(size * scale)`` (the output size interpolate makes)
    would round to ``new - 1`` on an axis that the image fills (``extent == size``)."""
    scale = new / extent
    return scale if math.floor(size * scale) >= new else math.nextafter(scale, math.inf)


def _geometry(image_processor) -> tuple[Resize, tuple[int, int], int]:
    """(resize, crop (height, width), resample) of a processor; ValueError for a geometry these
    implementations do not reproduce (training would see other pixels than the exported model)."""
    size = _size_dict(_get(image_processor, "size"), default_to_square=False)
    crop = _size_dict(_get(image_processor, "crop_size"), default_to_square=True)
    if _get(image_processor, "do_resize") is False:
        raise ValueError(
            "the image processor has do_resize=false (images of any size); set do_resize=true in "
            "its preprocessor_config.json"
        )
    unsupported = [k for k in ("longest_edge", "max_height", "max_width") if _size_value(size, k)]
    if unsupported:
        raise ValueError(
            f"the image processor's size has {', '.join(unsupported)} ({size}); only "
            "size.shortest_edge or size.height + size.width are supported: edit preprocessor_config.json"
        )
    shortest = _size_value(size, "shortest_edge")
    height, width = _size_value(size, "height"), _size_value(size, "width")
    if shortest:
        resize: Resize = int(shortest)
    elif height and width:
        resize = (int(height), int(width))  # the processor squashes to exactly this size
    else:
        raise ValueError(
            f"the image processor needs size.shortest_edge or size.height/width; got size={size}"
        )
    if _get(image_processor, "do_center_crop") is False:
        if isinstance(resize, int):
            raise ValueError(
                "the image processor has do_center_crop=false after a shortest-edge resize, which "
                "gives images of varying size; set do_center_crop=true or size.height/width"
            )
        crop_hw = resize
    else:
        crop_h, crop_w = _size_value(crop, "height"), _size_value(crop, "width")
        if crop_h is None or crop_w is None:
            raise ValueError(f"the image processor needs crop_size.height/width; got crop_size={crop}")
        crop_hw = (int(crop_h), int(crop_w))
    resample = _get(image_processor, "resample")
    resample = int(Image.Resampling.BICUBIC if resample is None else resample)
    return resize, crop_hw, resample


def crop_size(image_processor) -> tuple[int, int]:
    """(height, width) of the images the processor makes: what the vision tower expects."""
    return _geometry(image_processor)[1]


def normalisation(image_processor) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """(image_mean, image_std, rescale_factor) of a processor, CLIP's values where unset;
    ``do_normalize`` / ``do_rescale`` false give mean 0 and std 1 / a factor of 1."""
    rescale = _get(image_processor, "rescale_factor") or 1 / 255
    if _get(image_processor, "do_normalize") is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    else:
        mean = _per_channel(image_processor, "image_mean", (0.48145466, 0.4578275, 0.40821073))
        std = _per_channel(image_processor, "image_std", (0.26862954, 0.26130258, 0.27577711))
    if _get(image_processor, "do_rescale") is False:
        rescale = 1.0
    return mean, std, float(rescale)


def _per_channel(image_processor, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    """The processor's ``name`` as three floats. transformers takes one number for all three
    channels (``"image_mean": 0.5`` in a preprocessor_config.json); that crashed the start-up
    with "'float' object is not iterable"."""
    value = _get(image_processor, name)
    if value is None:
        return default
    if np.ndim(value) == 0:
        return (float(value),) * 3
    values = tuple(float(v) for v in value)
    if len(values) != 3:
        raise ValueError(
            f"the image processor's {name} has {len(values)} values ({list(values)}); RGB images need "
            f"3 (or one number for all three): edit preprocessor_config.json"
        )
    return values


def make_fast_preprocess(image_processor) -> ClipCropUint8:
    """The training workers' preprocessing: bytes -> uint8 [S, S, 3] (see :class:`ClipCropUint8`).

    Normalise its batches with ``device_transform.make_device_transform(image_processor)``.
    """
    return ClipCropUint8(*_geometry(image_processor))


def make_preprocess(image_processor) -> ClipPreprocess:
    """Build the preprocessing callable from a ``CLIPImageProcessor`` (or its dict config).

    Returns:
        callable mapping a PIL image to ``FloatTensor[3, S, S]`` (S = crop size).
    """
    resize, crop_hw, resample = _geometry(image_processor)
    mean, std, rescale = normalisation(image_processor)
    return ClipPreprocess(resize, crop_hw, resample, mean, std, rescale)
