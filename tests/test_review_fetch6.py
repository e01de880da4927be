"""Review of the fetch, sixth pass: a host's cool-down outlives the process told of it; a grey
title card is a thumbnail, not YouTube's placeholder.

Runtime: ~35 s on 2 busy cores (two real builds against the loopback fake host, one of them
waiting out the host's Retry-After).
"""

import io
import json
import os
import time

import pyarrow.parquet as pq
from loopback_images import JpegHandler, fetch_row, serving
from PIL import Image, ImageDraw, ImageFont
from small_builds import build_args

from dataset_tools import fetch
from dataset_tools.cli import main
from dataset_tools.fake_host import SIZES, FakeThumbnailHost, render_placeholder
from dataset_tools.politeness import HostLimiter, SharedCoolDown

RETRY_AFTER = 15  # longer than a build takes to start (~10 s on 2 busy cores)


def _timed_acquire(limiter: HostLimiter) -> float:
    started = time.monotonic()
    limiter.acquire()
    limiter.release()
    return time.monotonic() - started


def test_a_cool_down_reaches_a_limiter_started_later_on_the_same_file(tmp_path):
    # The second limiter stands for another worker process, a worker the pool started afresh, or
    # a restarted build: before, each held only its own memory and sent its first request at once.
    path = str(tmp_path / "host_cooldown.json")
    told = HostLimiter(4, 0, SharedCoolDown(path, max_seconds=60))
    told.cool_down(1.5)
    later = HostLimiter(4, 0, SharedCoolDown(path, max_seconds=60))
    assert _timed_acquire(later) >= 1.3


def test_a_stale_corrupt_or_absurd_cool_down_file_never_stops_or_stalls_a_build(tmp_path):
    path = tmp_path / "host_cooldown.json"
    for text in ("{not json", "[]", '{"until": "soon"}', '{"until": NaN}', json.dumps({"until": 5.0}), ""):
        path.write_text(text)
        assert _timed_acquire(HostLimiter(1, 0, SharedCoolDown(str(path), max_seconds=60))) < 0.5, text
    # A clock set back (or an edited file) cannot make the wait longer than --backoff-max.
    path.write_text(json.dumps({"until": time.time() + 3600}))
    absurd = SharedCoolDown(str(path), max_seconds=0.2)
    assert absurd.remaining() <= 0.2
    time.sleep(0.3)
    assert absurd.remaining() == 0.0
    # A state folder that cannot be written keeps the in-process cool-down and raises nothing.
    limiter = HostLimiter(1, 0, SharedCoolDown(str(tmp_path / "missing" / "cd.json"), max_seconds=60))
    limiter.cool_down(0.5)
    assert _timed_acquire(limiter) >= 0.3


def _build(host, inp, out, *extra):
    return main(build_args(host.url_template, inp, out, "--retries", "0", "--backoff-max", "30", *extra))


def test_a_restarted_build_waits_out_the_retry_after_the_host_gave_the_last_one(tmp_path, capsys):
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    inp.write_text("video_id,title\nbusyhost001,a\n")
    with FakeThumbnailHost({"busyhost001": f"throttle_for:{RETRY_AFTER}"}) as host:
        _build(host, inp, out)
        told_at = host.requests[-1]["time"]
        rows = pq.read_table(out / "00000.parquet").to_pylist()
        assert rows[0]["status"] == "failed_to_download" and "429" in rows[0]["error_message"]
        assert os.path.exists(out / "_build" / "host_cooldown.json")
        # The host recovers; the user restarts at once (here: to re-attempt the failed row).
        host.behaviours["busyhost001"] = "ok"
        capsys.readouterr()
        _build(host, inp, out, "--retry-failed")
        asked_again_at = host.requests[-1]["time"]
    assert len(host.requests) == 2
    assert asked_again_at - told_at >= RETRY_AFTER - 1.0, asked_again_at - told_at
    assert "asked us to slow down" in capsys.readouterr().err
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert rows[0]["status"] == "success"


def _grey_card(size, field, ink, text) -> bytes:
    """A lecture's title slide: text on flat grey, as a JPEG."""
    img = Image.new("RGB", size, (field,) * 3)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size[1] // 8)
    width = draw.textlength(text, font=font)
    draw.text(((size[0] - width) / 2, size[1] * 7 / 16), text, fill=(ink,) * 3, font=font)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def _three_bars(size) -> bytes:
    """The placeholder's pictogram as three darker grey bars on the light grey field."""
    width, height = size
    img = Image.new("RGB", size, (204,) * 3)
    draw = ImageDraw.Draw(img)
    for i in range(3):
        top = height * 3 // 8 + i * height // 12
        draw.rectangle([width * 3 // 8, top, width * 5 // 8, top + height // 24], fill=(150,) * 3)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=60)
    return out.getvalue()


def test_grey_title_cards_are_thumbnails_and_the_placeholder_still_is_not():
    # Every grey card below was taken for YouTube's placeholder at every size: its row failed
    # as "every variant missing" and the picture never reached a shard.
    for size in ((1280, 720), (480, 360), (320, 180), (120, 90)):
        for field, ink in ((128, 255), (200, 0), (180, 90), (204, 150)):
            for text in ("Lecture 7", "Lecture 7: Dynamic Programming"):
                card = _grey_card(size, field, ink, text)
                assert not fetch.is_placeholder(card), (size, field, ink, text)
        assert fetch.is_placeholder(render_placeholder(size)), size
        assert fetch.is_placeholder(_three_bars(size)), size


class _GreyCards(JpegHandler):
    """Serves a grey 'Lecture 7' slide at each variant's size, with 200."""

    def body(self, path):
        variant = path.rsplit("/", 1)[-1].removesuffix(".jpg")
        return _grey_card(SIZES[variant], 128, 255, "Lecture 7")


def test_the_ladder_keeps_a_grey_title_card_as_the_thumbnail():
    with serving(_GreyCards) as template:
        variants = ["maxresdefault", "sddefault", "hqdefault", "mqdefault"]
        result = fetch_row("lecture0007", variants, template)
    assert result.error is None and result.variant == "maxresdefault", result.trail
