"""`--crop-letterbox` on real Pillow-encoded JPEGs (quality 75-95, 4:2:0, so the bars carry JPEG
noise and ringing): "video black" bars (16/16/16) are cropped like pure black ones, a saturated
edge is cropped at exactly its bar rows (4:2:0 chroma bled into the last bar row of hqdefault),
and dark content, a logo crossing a bar and tiny images stay as the README says; pillarbox bars
are cropped too.
The reference is the plain rule on the source image before encoding: rows whose mean is dark.

Runtime: ~3 s.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from dataset_tools.letterbox import crop_letterbox

_DARK = 24  # the documented rule's threshold on a row's mean (video black 16 plus JPEG noise)


def _jpeg(img: np.ndarray, quality: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, "JPEG", quality=quality)  # Pillow's default 4:2:0 subsampling
    return out.getvalue()


def _cropped(data: bytes) -> np.ndarray | None:
    cropped = crop_letterbox(data)
    return None if cropped is None else cv2.imdecode(np.frombuffer(cropped, np.uint8), cv2.IMREAD_COLOR)


def _reference_rows(src: np.ndarray) -> tuple[int, int]:
    """Content rows of the unencoded image: the first and last row whose mean is not dark."""
    content = np.flatnonzero(src.mean(axis=(1, 2)) >= _DARK)
    return int(content[0]), int(content[-1]) + 1


def _smooth(rng, rows: int, width: int, low: int = 40, high: int = 220) -> np.ndarray:
    coarse = rng.integers(low, high, (rows // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return cv2.resize(coarse, (width, rows), interpolation=cv2.INTER_LINEAR)


def _letterboxed(content: np.ndarray, top: int, bottom: int, bar: int) -> np.ndarray:
    rows, width = content.shape[:2]
    img = np.full((top + rows + bottom, width, 3), bar, np.uint8)
    img[top : top + rows] = content
    return img


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("bar", [0, 16])
@pytest.mark.parametrize("bars", [(45, 45), (44, 46), (60, 60)])
def test_black_and_video_black_bars_are_cropped_exactly(bar, bars, quality):
    # A 16/16/16 bar ("video black") sat exactly on the old threshold (mean < 16): with JPEG noise
    # no bar row counted and the thumbnail kept its bars.
    top, bottom = bars
    width = 640 if top == 60 else 480
    src = _letterboxed(
        _smooth(np.random.default_rng(top), 270 if width == 480 else 360, width), top, bottom, bar
    )
    first, last = _reference_rows(src)
    got = _cropped(_jpeg(src, quality))
    assert got is not None and got.shape == (last - first, width, 3)
    assert (first, last) == (top, src.shape[0] - bottom)


@pytest.mark.parametrize("quality", [75, 85, 95])
@pytest.mark.parametrize("colour", [(255, 0, 0), (0, 0, 255), (220, 30, 60)])
def test_a_saturated_edge_is_cropped_at_its_bar_rows(colour, quality):
    # hqdefault's 45-row bars end mid chroma pair: the shared chroma of a red or blue edge made the
    # last bar row dark red (row mean 20-30), and the crop kept it on each side (44, 316).
    content = np.tile(np.array(colour, np.uint8), (270, 480, 1))
    content[40:] = _smooth(np.random.default_rng(1), 230, 480)
    content[-40:] = np.array(colour, np.uint8)
    src = _letterboxed(content, 45, 45, 0)
    got = _cropped(_jpeg(src, quality))
    assert got is not None and got.shape == (270, 480, 3)
    assert got[0].mean() > 40 and got[-1].mean() > 40  # first and last kept rows are the content's


def test_dark_content_and_overlays_are_not_cropped_as_bars():
    rng = np.random.default_rng(2)
    dark_top = np.full((360, 480, 3), 10, np.uint8)
    dark_top[60:] = _smooth(rng, 300, 480)  # a night sky above, no dark ground
    night = np.full((360, 480, 3), 16, np.uint8)
    night[80:330] = _smooth(rng, 250, 480)  # video-black sky 80 rows, ground 30: not a letterbox
    logo = _letterboxed(_smooth(rng, 270, 480), 45, 45, 0)
    logo[300:350, 420:460] = 255  # a channel logo crossing the bottom bar: ends that bar early
    for img in (
        dark_top,
        night,
        logo,
        np.zeros((360, 480, 3), np.uint8),
        np.full((360, 480, 3), 16, np.uint8),
    ):
        assert crop_letterbox(_jpeg(img, 90)) is None


def test_pillarbox_and_windowbox_lose_all_their_bars():
    # Until 2026-12-07 a pillarbox was left whole and a windowbox lost only its top and bottom bars
    # (tests/test_review_letterbox2.py covers Shorts' thumbnails).
    rng = np.random.default_rng(3)
    pillar = np.zeros((720, 1280, 3), np.uint8)
    pillar[:, 160:1120] = _smooth(rng, 720, 960)  # a 4:3 video in a 16:9 maxresdefault
    got = _cropped(_jpeg(pillar, 90))
    assert got is not None and got.shape == (720, 960, 3)
    window = np.zeros((360, 480, 3), np.uint8)
    window[45:315, 164:316] = _smooth(rng, 270, 152, 20, 60)  # a dark vertical Short, both bar pairs
    got = _cropped(_jpeg(window, 90))
    assert got is not None and got.shape == (270, 152, 3)


@pytest.mark.parametrize("size", [(1, 1), (1, 7), (7, 1), (2, 2), (4, 4), (9, 16), (90, 120)])
def test_tiny_images_are_handled(size):
    height, width = size
    img = np.zeros((height, width, 3), np.uint8)
    bar = round(height * 0.125)
    img[bar : height - bar] = 150
    got = _cropped(_jpeg(img, 95))
    if bar == 0 or width / (height - 2 * bar) < 1.3:
        assert got is None
    else:
        assert got.shape[:2] == (height - 2 * bar, width)
