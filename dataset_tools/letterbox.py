"""Remove the black bars YouTube adds when a 16:9 frame is stored in a 4:3 thumbnail
(hqdefault 480x360, sddefault 640x480: a letterbox, top and bottom), and those beside a narrower
frame (a vertical Short, a square or 4:3 video in a 16:9 thumbnail: a pillarbox, left and right;
a Short's hqdefault has both), before img2dataset's resizer sees the image."""

from __future__ import annotations

import io

import cv2
import numpy as np

# A bar row is "black" when its mean and spread are both tiny (JPEG noise keeps them above 0),
# leaving out its brightest 1% of pixels: one speck (sensor or JPEG noise) ended the bar there.
# The mean allows "video black" (16, limited-range black shown as is) plus JPEG ringing: at 16 a
# 16/16/16 bar was never a bar row, so such thumbnails kept their bars.
_BLACK_MEAN = 24.0
_BLACK_STD = 8.0
_OUTLIER_SHARE = 0.01
# Bars are cropped only where they frame a video picture: about equal (JPEG ringing may shave a few
# rows off one side) around content of a video's aspect (4:3 = 1.33 up to scope 2.39). Dark rows
# alone also matched a logo on black (cropped to a thin strip, which center_crop then cut through)
# and a night scene's dark sky and ground.
_BAR_MISMATCH = 0.02  # of the height (of the width, for a pillarbox)
_VIDEO_ASPECT = (1.3, 2.5)  # content width / height
# Pillarboxed content: a vertical Short (9:16 = 0.56) up to a 4:3 video (1.33) in a wider frame.
_PILLARED_ASPECT = (0.5, 1.4)


def _dark_rows(gray: np.ndarray) -> np.ndarray:
    """bool [H]: the rows of ``gray`` [H, W] that are black bar rows."""
    width = gray.shape[1]
    outliers = min(width - 1, max(1, int(_OUTLIER_SHARE * width)))
    kept = np.partition(gray, width - outliers - 1, axis=1)[:, : width - outliers].astype(np.float32)
    return (kept.mean(axis=1) < _BLACK_MEAN) & (kept.std(axis=1) < _BLACK_STD)


def letterbox_bounds(img: np.ndarray) -> tuple[int, int] | None:
    """``(top, bottom)`` rows of the content when a top and a bottom black bar of about the same
    height (each at least 5% of it) frame content of a video's aspect, else None.
    ``img``: [H, W] or [H, W, C] uint8."""
    gray = img if img.ndim == 2 else img[..., :3].mean(axis=2)
    if gray.size == 0:
        return None
    height, width = gray.shape
    top, bottom = _edge_runs(_dark_rows(gray))
    return (top, bottom) if _frames_a_video(top, height - bottom, bottom - top, width) else None


def _frames_a_video(top_bar: int, bottom_bar: int, content: int, width: int) -> bool:
    """Whether bars of these heights around ``content`` rows are a letterbox, not dark content."""
    if not _bar_pair(top_bar, bottom_bar, content):
        return False
    return _VIDEO_ASPECT[0] <= width / content <= _VIDEO_ASPECT[1]


def _bar_pair(first_bar: int, second_bar: int, content: int) -> bool:
    """Whether two bars around ``content`` lines are each at least 5% of the length and about equal."""
    length = first_bar + second_bar + content
    min_bar = max(1, int(0.05 * length))
    if min(first_bar, second_bar) < min_bar or content == 0:
        return False
    return abs(first_bar - second_bar) <= max(2, _BAR_MISMATCH * length)


def _edge_runs(dark: np.ndarray) -> tuple[int, int]:
    """``(start, end)``: the lines of ``dark`` [N] (bool) between its leading and trailing dark runs."""
    start = 0
    while start < len(dark) and dark[start]:
        start += 1
    end = len(dark)
    while end > start and dark[end - 1]:
        end -= 1
    return start, end


def pillarbox_bounds(gray: np.ndarray) -> tuple[int, int] | None:
    """``(left, right)`` columns of the content when a left and a right black bar of about the same
    width (each at least 5% of it) frame a picture of a narrower video's aspect (a Short up to 4:3)
    that fills the height; else None. ``gray``: [H, W]. A picture floating on black (a logo, dark
    bars above and below it too) is not a video frame: its columns are left whole."""
    if gray.size == 0:
        return None
    height, width = gray.shape
    left, right = _edge_runs(_dark_rows(gray.T))
    if not _bar_pair(left, width - right, right - left):
        return None
    if not _PILLARED_ASPECT[0] <= (right - left) / height <= _PILLARED_ASPECT[1]:
        return None
    top, bottom = _edge_runs(_dark_rows(gray[:, left:right]))
    floating = min(top, height - bottom) >= max(1, int(0.05 * height))
    return None if floating else (left, right)


def content_box(gray: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(top, bottom, left, right)`` of the picture inside YouTube's bars: the letterbox rows
    (``letterbox_bounds``), then the pillarbox columns of what is left (a Short's hqdefault has
    both); None when there are no bars. ``gray``: [H, W], the luma. Until 2026-12-07 the pillarbox bars
    were left: a Short's maxresdefault kept its 68% black and its hqdefault lost only its top and
    bottom bars."""
    rows = letterbox_bounds(gray) or (0, gray.shape[0])
    columns = pillarbox_bounds(gray[rows[0] : rows[1]])
    if columns is None and rows == (0, gray.shape[0]):
        return None
    return (*rows, *(columns or (0, gray.shape[1])))


def crop_letterbox(data: bytes) -> bytes | None:
    """Lossless (BMP) bytes of the image without its bars (letterbox and pillarbox), or None when
    there is nothing to crop."""
    buffer = np.frombuffer(data, np.uint8)
    img = _as_8_bit(cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED))
    if img is None:
        return None
    # Bars are found on the luma plane (a JPEG's own Y): a 4:2:0 JPEG shares chroma between row
    # pairs, so a saturated edge bled colour into the last bar row of a 480x360 hqdefault (bars of
    # 45 rows end mid-pair) and the crop kept one dark-red row on each side.
    luma = cv2.imdecode(buffer, cv2.IMREAD_GRAYSCALE | cv2.IMREAD_IGNORE_ORIENTATION)  # as img
    gray = luma if luma is not None and luma.shape == img.shape[:2] else img
    box = content_box(gray if gray.ndim == 2 else gray[..., :3].mean(axis=2))
    if box is None:
        return None
    top, bottom, left, right = box
    ok, encoded = cv2.imencode(".bmp", img[top:bottom, left:right])
    return encoded.tobytes() if ok else None


def _as_8_bit(img: np.ndarray | None) -> np.ndarray | None:
    """``img`` as uint8, a 16-bit one scaled (65535 -> 255); None for any other depth (left to the
    resizer uncropped). BMP holds 8 bits: a 16-bit PNG's values were clipped at 255, so a cropped
    thumbnail came out almost white, and its bars (about 0-16 of 65535) were tested on the 8-bit
    scale."""
    if img is None or img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return np.rint(img / 257.0).astype(np.uint8)
    return None


class LetterboxResizer:
    """Wraps img2dataset's ``Resizer``: crops bars first, then delegates (same call signature)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, img_stream, blurring_bbox_list=None):
        """Crop letterbox bars from the encoded image, then resize it with the wrapped Resizer."""
        img_stream.seek(0)
        cropped = crop_letterbox(img_stream.read())
        img_stream.seek(0)
        if cropped is not None:
            img_stream = io.BytesIO(cropped)
        return self.inner(img_stream, blurring_bbox_list)
