"""`--crop-letterbox` on the thumbnails of narrower videos, as real Pillow-encoded JPEGs (quality
75 and 95, 4:2:0): a vertical Short in a 16:9 maxresdefault (a pillarbox) and in a 4:3 hqdefault
(bars on all four sides) and a square video lose every bar, down to exactly the content's
columns; a picture floating on black, bars of unequal width and a strip too narrow for a video
are left whole; through img2dataset's own resizer a Short's thumbnail comes out without black.

Runtime: ~3 s.
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from img2dataset.resizer import Resizer
from PIL import Image
from test_review_letterbox1 import _DARK, _cropped, _jpeg, _smooth

from dataset_tools.letterbox import LetterboxResizer, crop_letterbox


def _framed(content: np.ndarray, size: tuple[int, int], top: int, left: int, bar: int) -> np.ndarray:
    """``content`` placed at (top, left) on a ``size`` (H, W) field of the grey ``bar``."""
    img = np.full((*size, 3), bar, np.uint8)
    img[top : top + content.shape[0], left : left + content.shape[1]] = content
    return img


def _reference_box(src: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the unencoded image's content: rows and columns whose mean is
    not dark (the README's rule, before JPEG noise)."""
    rows = np.flatnonzero(src.mean(axis=(1, 2)) >= _DARK)
    columns = np.flatnonzero(src.mean(axis=(0, 2)) >= _DARK)
    return int(rows[0]), int(rows[-1]) + 1, int(columns[0]), int(columns[-1]) + 1


SHORTS = {
    # name: (thumbnail size, content size, content's top-left corner)
    "short_maxres": ((720, 1280), (720, 405), (0, 437)),  # 9:16 in maxresdefault: pillarbox
    "short_mq": ((180, 320), (180, 101), (0, 109)),  # 9:16 in mqdefault
    "short_hq": ((360, 480), (270, 152), (45, 164)),  # 9:16 in a 16:9 frame in 4:3: both bar pairs
    "short_sd": ((480, 640), (360, 202), (60, 219)),
    "square_hq": ((360, 480), (360, 360), (0, 60)),  # a 1:1 video in hqdefault
}


@pytest.mark.parametrize("quality", [75, 95])
@pytest.mark.parametrize("bar", [0, 16])
@pytest.mark.parametrize("name", sorted(SHORTS))
def test_narrower_videos_lose_every_bar_exactly(name, bar, quality):
    # The pillarbox bars were left: a Short's maxresdefault kept 68% black (44% after a square
    # centre crop), and its hqdefault lost only its top and bottom bars.
    size, content_size, (top, left) = SHORTS[name]
    content = _smooth(np.random.default_rng(sum(size)), *content_size)
    src = _framed(content, size, top, left, bar)
    expected = _reference_box(src)
    assert expected == (top, top + content_size[0], left, left + content_size[1])
    got = _cropped(_jpeg(src, quality))
    assert got is not None and got.shape == (*content_size, 3), (name, None if got is None else got.shape)
    assert got[:, 0].mean() > _DARK and got[:, -1].mean() > _DARK  # first and last columns are content


def test_dark_surroundings_that_are_no_pillarbox_are_left_whole():
    rng = np.random.default_rng(5)
    floating = _framed(_smooth(rng, 400, 400), (720, 1280), 160, 440, 0)  # a square logo on black
    unequal = _framed(_smooth(rng, 720, 500), (720, 1280), 0, 100, 0)  # bars of 100 and 680 columns
    strip = _framed(_smooth(rng, 720, 300), (720, 1280), 0, 490, 0)  # 0.42: narrower than a Short
    short_bars = _framed(_smooth(rng, 720, 1240), (720, 1280), 0, 20, 0)  # bars of 1.6% each
    for img in (floating, unequal, strip, short_bars):
        assert crop_letterbox(_jpeg(img, 90)) is None


def test_a_shorts_thumbnail_through_img2dataset_resizer_has_no_black():
    content = _smooth(np.random.default_rng(7), 720, 405, 60, 220)
    src = _framed(content, (720, 1280), 0, 437, 0)
    resizer = LetterboxResizer(Resizer(image_size=64, resize_mode="center_crop", resize_only_if_bigger=False))
    encoded, width, height, original_width, original_height, err = resizer(io.BytesIO(_jpeg(src, 90)))
    assert err is None and (original_width, original_height) == (405, 720) and (width, height) == (64, 64)
    out = np.asarray(Image.open(io.BytesIO(encoded)).convert("L"), np.float32)
    assert out[:, :4].mean() > _DARK and out[:, -4:].mean() > _DARK  # uncropped: 10 black columns each side
    uncropped = Resizer(image_size=64, resize_mode="center_crop", resize_only_if_bigger=False)
    encoded = uncropped(io.BytesIO(_jpeg(src, 90)))[0]
    plain = cv2.imdecode(np.frombuffer(encoded, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert plain[:, :4].mean() < _DARK  # the black the crop removes
