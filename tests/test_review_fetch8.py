"""Review of the fetch, eighth pass: a grey card holding one glyph or a short word ("7", "#1", "OK",
"Q&A"), drawn with Pillow and saved as a JPEG, is a thumbnail, not YouTube's placeholder; the
placeholder and its three-bar pictogram still are, at every size.

Runtime: ~3 s on 2 busy cores.
"""

import io

from loopback_images import JpegHandler, fetch_row, serving
from PIL import Image, ImageDraw, ImageFont
from test_review_fetch6 import _three_bars

from dataset_tools import fetch
from dataset_tools.fake_host import SIZES, render_placeholder

TEXTS = ("7", "?", "A", "#1", "OK", "Hi", "Q&A")
INKS = ((128, 255), (200, 0), (180, 90), (204, 150))  # (field, ink) greys: light, dark, mid ink


def _glyph_card(size, field, ink, text) -> bytes:
    """``text`` in a large font (half the height), centred on flat grey, as a JPEG."""
    img = Image.new("RGB", size, (field,) * 3)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size[1] // 2)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    origin = ((size[0] - (right - left)) / 2 - left, (size[1] - (bottom - top)) / 2 - top)
    draw.text(origin, text, fill=(ink,) * 3, font=font)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def test_a_grey_card_of_one_glyph_or_a_short_word_is_a_thumbnail():
    # A glyph crosses a row or column as few times as the placeholder's bars: each card below was
    # taken for the placeholder, and its row failed as "every variant missing".
    for size in ((1280, 720), (480, 360), (320, 180)):
        for field, ink in INKS:
            for text in TEXTS:
                assert not fetch.is_placeholder(_glyph_card(size, field, ink, text)), (size, field, ink, text)


def test_the_placeholder_and_its_bars_still_are_the_placeholder():
    for size in ((1280, 720), (640, 480), (480, 360), (320, 180), (120, 90)):
        assert fetch.is_placeholder(render_placeholder(size)), size
        assert fetch.is_placeholder(_three_bars(size)), size


class _GlyphCards(JpegHandler):
    """Serves a grey '#1' card at each variant's size, with 200."""

    def body(self, path):
        variant = path.rsplit("/", 1)[-1].removesuffix(".jpg")
        return _glyph_card(SIZES[variant], 200, 0, "#1")


def test_the_ladder_keeps_a_grey_glyph_card_as_the_thumbnail():
    with serving(_GlyphCards) as template:
        result = fetch_row("glyphcard01", ["maxresdefault", "sddefault", "hqdefault"], template)
    assert result.error is None and result.variant == "maxresdefault", result.trail
