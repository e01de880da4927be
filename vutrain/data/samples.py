"""Reading raw samples from tar shards and decoding them, with skip-and-count on bad input.

Raw samples are dicts ``{"__key__", "__url__", "<ext>": bytes, ...}``, grouped from contiguous
tar members by webdataset's rule (key = path up to the first dot of the basename). Decoding
(JPEG, UTF-8, JSON, caption) happens late, after shuffling, so shuffle buffers hold small
undecoded bytes and a resumed stream can replay them without decoding.

Every problem is a :class:`SkipSample` with a short ``reason``; callers count reasons instead of
crashing: ``tar_error``, ``missing_image``, ``undecodable_image``, ``non_utf8_text``,
``bad_json``, ``missing_caption``, ``missing_field``, ``empty_caption``.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from collections import Counter
from typing import Callable, Iterator

from PIL import Image

from .captions import MissingCaptionField, render_caption
from .shards import is_remote

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Image members accepted, in order of preference (DataComp mixes jpg and webp)."""


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is the counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open(url: str):
    if is_remote(url):
        import webdataset  # lazy: gopen handles pipe: and URL schemes

        return webdataset.gopen(url, "rb")
    return open(url, "rb")


def _split_name(name: str) -> tuple[str, str] | None:
    """``dir/000123.jpg`` -> (``dir/000123``, ``jpg``); None for names without an extension."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return name[:dot], name[dot + 1:].lower()


def iter_raw_samples(url: str, count: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield the raw samples of one tar shard, in tar order.

    A truncated or unreadable tar ends the shard: the incomplete last sample is dropped and one
    ``tar_error`` is counted (through ``count``), the samples before it are kept.
    """
    current: dict | None = None
    try:
        with _open(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = _split_name(member.name)
                if parts is None:
                    continue
                key, ext = parts
                payload = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                current[ext] = payload
    except (tarfile.TarError, EOFError, OSError) as e:
        log.warning("shard %s is unreadable or truncated (%s); using the samples before the error", url, e)
        if count is not None:
            count("tar_error")
        return
    if current is not None:
        yield current


def decode_text(raw: dict, ext: str) -> str | None:
    """UTF-8 text of member ``ext`` or None if absent; SkipSample(non_utf8_text) if undecodable."""
    payload = raw.get(ext)
    if payload is None:
        return None
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SkipSample("non_utf8_text", f"{raw['__key__']}.{ext}: {e}") from None


def decode_meta(raw: dict) -> dict:
    """The ``.json`` metadata ({} if absent); SkipSample(bad_json) if it is not a JSON object."""
    text = decode_text(raw, "json")
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise SkipSample("bad_json", f"{raw['__key__']}.json: {e}") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"{raw['__key__']}.json is not an object")
    return meta


def decode_image(raw: dict) -> Image.Image:
    """The sample's image as RGB, fully decoded (so truncated files fail here, not later)."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image", f"{raw['__key__']} has none of {IMAGE_EXTS}")
    try:
        with Image.open(io.BytesIO(raw[ext])) as img:
            img.load()
            return img.convert("RGB")
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise SkipSample("undecodable_image", f"{raw['__key__']}.{ext}: {e}") from None


def decode_caption(raw: dict, meta: dict, template: str) -> str:
    """Render the caption; SkipSample when the needed text is missing or empty."""
    txt = decode_text(raw, "txt")
    try:
        caption = render_caption(template, meta, txt)
    except MissingCaptionField as e:
        reason = "missing_caption" if e.field in ("txt", "caption", "title") else "missing_field"
        raise SkipSample(reason, f"{raw['__key__']}: {e}") from None
    if not caption.strip():
        raise SkipSample("empty_caption", raw["__key__"])
    return caption


def decode_sample(raw: dict, template: str) -> tuple[Image.Image, str, dict]:
    """(RGB image, caption, metadata) of a raw sample, or SkipSample."""
    meta = decode_meta(raw)
    caption = decode_caption(raw, meta, template)
    return decode_image(raw), caption, meta


class SkipCounter(Counter):
    """Counts skipped samples by reason; logs the first occurrences of each reason.

    ``muted`` suppresses counting while a resumed stream replays samples it already counted.
    """

    muted = False

    def __call__(self, reason: str, detail: str = "") -> None:
        if self.muted:
            return
        self[reason] += 1
        if self[reason] <= 3:
            log.warning("skipping sample (%s) %s", reason, detail)
