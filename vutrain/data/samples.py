"""Reading raw samples from tar shards and decoding them, with skip-and-count on bad input.

Raw samples are dicts ``{"__key__", "__url__", "<ext>": bytes, ...}``, grouped from contiguous
tar members by webdataset's rule (key = path up to the first dot of the basename); a member whose
extension the sample already holds (a shard appended to) starts the next sample, of the same key. A
sample keeps one image (the first of IMAGE_EXTS it holds); its other images, and members named like
its own fields (``a.__key__``, ``a.__url__``), are dropped and counted as ``ignored_member``. Decoding
(JPEG, UTF-8, JSON, caption) happens late, after shuffling, so shuffle buffers hold small
undecoded bytes and a resumed stream can replay them without decoding.

Every problem is a :class:`SkipSample` with a short ``reason``; callers count reasons instead of
crashing: ``tar_error``, ``missing_image``, ``undecodable_image``, ``non_utf8_text``,
``bad_json``, ``missing_caption``, ``missing_field``, ``empty_caption`` (no visible text), and
``ignored_member`` (a member, not a sample: the sample trains without it).

Two image decoders: :func:`decode_image` (a PIL image, for the processor-exact float path of
eval) and :func:`decode_image_array` (an RGB uint8 array, optionally DCT-scaled, for the
training workers' fast path: JPEGs through simplejpeg's libjpeg-turbo, the same pixels as PIL
with about half its CPU; other formats, CMYK JPEGs and anything simplejpeg refuses through PIL).
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Collection, Iterator

import numpy as np
from PIL import Image

from .captions import MissingCaptionField, has_visible_text, render_caption
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
    return name[:dot], name[dot + 1 :].lower()


_BLOCK = 512
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz: left to tarfile
_FILE_TYPES = (b"0", b"\x00", b"7")  # regular and contiguous files (tarfile's isfile())


_NO_END_BLOCK = "no end-of-archive block: the tar was cut at a member boundary (or is an empty file)"


class TarError(Exception):
    """A tar header that is not valid, or a member cut short.

    ``name``: the member whose data was cut short, when its header was read (None when the header
    itself is bad): a reader can tell whether the sample before it was complete.
    """

    def __init__(self, message: str, name: str | None = None):
        super().__init__(message)
        self.name = name


def _octal(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\x00", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarError(f"bad number field {field!r}") from None


def _read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    while len(data) < n:  # pipes and sockets return short reads
        more = stream.read(n - len(data))
        if not more:
            raise TarError("unexpected end of data")
        data += more
    return data


def _pax_path(records: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    for line in records.decode("utf-8", "surrogateescape").split("\n"):
        _, _, kv = line.partition(" ")
        key, _, value = kv.partition("=")
        if key == "path":
            return value
    return None


Payloads = bool | Collection[str]
"""Which members' bytes a reader returns: True all, False none, or a set of extensions such as
``{"json"}`` (as :func:`_split_name` gives them, lower case); the others come back as None."""


def _payload_wanted(payloads: Payloads) -> Callable[[str], bool]:
    """``wanted(member_name)`` for a :data:`Payloads` choice."""
    if isinstance(payloads, bool):
        return lambda name: payloads
    # A lone string is one extension: as a collection it would be its letters, and match nothing.
    wanted = frozenset(ext.lower() for ext in ([payloads] if isinstance(payloads, str) else payloads))

    def by_extension(name: str) -> bool:
        parts = _split_name(name)
        return parts is not None and parts[1] in wanted

    return by_extension


def iter_tar_files(stream, payloads: Payloads = True) -> Iterator[tuple[str, bytes | None]]:
    """(name, payload) of each regular file of an uncompressed tar stream, in tar order.

    A small ustar/pax/GNU reader: about 20x cheaper per member than ``tarfile``'s stream mode,
    whose Python header parsing cost as much as the JPEG decode on 341x256 shards. Raises
    :class:`TarError` on a bad header checksum, data cut short, or a stream that ends without an
    end-of-archive block (every tar writer closes an archive with zero blocks; without one, the
    tar was cut at a member boundary, or is an empty file); ends at the end-of-archive block.
    A member whose payload is not wanted (``payloads=False``,
    or an extension outside the ``payloads`` set) yields None and, on a seekable stream (a local
    file), is seeked over: its bytes are never read, and a member cut short is found from the
    file size, at the same member as a full read finds it.
    """
    long_name: str | None = None
    wanted = _payload_wanted(payloads)
    skip = _payload_skipper(stream) if payloads is not True else None
    while True:
        header = stream.read(_BLOCK)
        if len(header) < _BLOCK:
            if not header:
                raise TarError(_NO_END_BLOCK)
            header += _read_exactly(stream, _BLOCK - len(header))
        if header.count(0) == _BLOCK:  # end-of-archive marker
            return
        stored = _octal(header[148:156])
        actual = 256 + sum(header[:148]) + sum(header[156:])
        if stored != actual:
            raise TarError(f"bad header checksum ({stored} != {actual})")
        size, kind = _octal(header[124:136]), header[156:157]
        name = None
        if kind not in (b"L", b"x", b"g"):
            name = long_name
            long_name = None
            if name is None:
                name = header[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                prefix = header[345:500].split(b"\x00", 1)[0]
                if header[257:262] == b"ustar" and prefix:
                    name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        padded = size + (-size) % _BLOCK
        try:
            if skip is not None and kind in _FILE_TYPES and not wanted(name):
                data = skip(padded)
            else:
                data = _read_exactly(stream, size) if size else b""
                if size % _BLOCK:
                    _read_exactly(stream, _BLOCK - size % _BLOCK)
        except TarError as e:
            raise TarError(str(e), name) from None
        if kind in (b"L", b"x"):  # GNU long name / pax header: names the next member
            long_name = (
                data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                if kind == b"L"
                else _pax_path(data)
            )
            continue
        if kind in _FILE_TYPES:
            yield name, data


def _payload_skipper(stream) -> Callable[[int], None]:
    """``skip(n)``: move past ``n`` bytes of ``stream``, TarError("unexpected end of data") when it
    holds fewer (seeks on a seekable stream, reads in bounded pieces otherwise)."""
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        start = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(start)

        def skip(n: int) -> None:
            position = stream.tell()
            if position + n > end:
                stream.seek(end)
                raise TarError("unexpected end of data")
            stream.seek(position + n)

        return skip

    def skip_by_reading(n: int) -> None:
        while n:
            step = min(n, 1 << 20)
            _read_exactly(stream, step)
            n -= step

    return skip_by_reading


class _Prefixed:
    """A read-only stream that first returns ``head``, then the rest of ``stream``."""

    def __init__(self, head: bytes, stream):
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.stream.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.stream.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's stream mode raises on a bad or cut-short header only for the first member; after
    it, such a header ended the archive silently: a damaged .tar.gz lost the rest of its samples
    uncounted and yielded the sample in progress as complete. Raised here, as iter_tar_files does
    for a plain tar; so is no data left at a header (no end-of-archive block: cut at a member
    boundary, also silent before). Only a zero block ends the archive cleanly."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            raise tarfile.SubsequentHeaderError(str(e)) from None  # next() raises ReadError on it
        except tarfile.EmptyHeaderError:
            raise tarfile.SubsequentHeaderError(_NO_END_BLOCK) from None


def _iter_files(stream, payloads: Payloads = True) -> Iterator[tuple[str, bytes | None]]:
    head = stream.read(6)
    seekable = getattr(stream, "seekable", None)
    if seekable is not None and seekable():
        stream.seek(-len(head), os.SEEK_CUR)  # a local file: keep it seekable for skipping
    else:
        stream = _Prefixed(head, stream)
    if not head.startswith(_COMPRESSED_MAGIC):
        yield from iter_tar_files(stream, payloads)
        return
    wanted = _payload_wanted(payloads)
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for member in tar:
            if member.isfile():
                try:
                    payload = tar.extractfile(member).read() if wanted(member.name) else None
                except (tarfile.TarError, EOFError, OSError) as e:
                    # Name the member cut short, as iter_tar_files does: the sample before it is
                    # complete when the member starts the next one, and the header-only read
                    # (payloads=False, which fails one member later) must find the same keys.
                    raise TarError(str(e), member.name) from None
                yield member.name, payload


_WARNED_REPEATS: set[str] = set()  # shards whose repeated members were reported (once each)
_WARNED_IGNORED: set[str] = set()  # shards whose ignored members were reported (once each)

_SAMPLE_FIELDS = frozenset({"__key__", "__url__"})
"""The raw sample's own fields: a member ``a.__key__`` or ``a.__url__`` is ignored (and counted)
rather than stored under them, where it renamed the sample (the full read then gave a key the
header-only read does not: a world-size change dropped the sample) or started a phantom one."""


def _ignore_member(url: str, member: str, why: str, count: Callable[[str], None] | None) -> None:
    """Count one ``ignored_member`` and warn once per shard, naming the member."""
    if count is not None:
        count("ignored_member")
    if url not in _WARNED_IGNORED:
        _WARNED_IGNORED.add(url)
        log.warning("shard %s: member %s is ignored (%s); counted as ignored_member", url, member, why)


def _finished(sample: dict, count: Callable[[str], None] | None) -> dict:
    """``sample`` holding one image member: the first of IMAGE_EXTS, which training, eval and the
    image digest all use; each other image is dropped and counted, not carried along unseen."""
    images = [ext for ext in IMAGE_EXTS if ext in sample]
    for ext in images[1:]:
        del sample[ext]
        why = f"a second image; the sample uses its .{images[0]}"
        _ignore_member(sample["__url__"], f"{sample['__key__']}.{ext}", why, count)
    return sample


def _starts_new_sample(current: dict, key: str, ext: str, url: str) -> bool:
    """Whether member ``key.ext`` begins a sample after ``current``: another key, or an extension
    ``current`` already holds. The latter is a shard appended to (``tar -r``) or two builds
    concatenated; the member used to replace the earlier one, so a whole sample vanished unseen.
    The rule reads names only, so a header-only read (resume positions) groups alike."""
    if current["__key__"] != key:
        return True
    if ext not in current or ext in _SAMPLE_FIELDS:  # a field-named member is ignored, not a repeat
        return False
    if url not in _WARNED_REPEATS:
        _WARNED_REPEATS.add(url)
        log.warning(
            "shard %s repeats member %s.%s within one sample (a tar appended to or concatenated?); "
            "each repeat starts a new sample with the same key, none is dropped",
            url,
            key,
            ext,
        )
    return True


def iter_raw_samples(
    url: str, count: Callable[[str], None] | None = None, payloads: Payloads = True
) -> Iterator[dict]:
    """Yield the raw samples of one tar shard (plain, or gzip/bzip2/xz-compressed), in tar order.

    A truncated or unreadable tar ends the shard and one ``tar_error`` is counted (through
    ``count``); the samples before the damage are kept. A tar without an end-of-archive block (cut
    at a member boundary, or an empty file, compressed or not) is truncated too. The sample
    being read when it came is kept only if it is known to be complete: the damaged member's
    header was read and names another sample (a member cut short that starts the next sample);
    after a bad header, or at a missing end-of-archive block, it is dropped.
    ``payloads=False``: every member's payload is None and, for a local plain tar, only
    the headers are read (the keys of a shard, as the training stream sees them; epoch_remainder).
    ``payloads={"json"}`` (any set of extensions): those members' bytes, None for the others, which
    a local plain tar seeks over (the metadata of a shard without its images; the zero-shot
    classes). The samples, their order and the damage counted are those of a full read.
    """
    current: dict | None = None
    try:
        with _open(url) as stream:
            for name, payload in _iter_files(stream, payloads):
                parts = _split_name(name)
                if parts is None:
                    continue
                key, ext = parts
                if current is not None and _starts_new_sample(current, key, ext, url):
                    yield _finished(current, count)
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                if ext in _SAMPLE_FIELDS:
                    _ignore_member(url, name, "named like the sample's own field", count)
                    continue
                current[ext] = payload
    except (TarError, tarfile.TarError, EOFError, OSError) as e:
        log.warning("shard %s is unreadable or truncated (%s); using the samples before the error", url, e)
        if count is not None:
            count("tar_error")
        damaged = _split_name(e.name) if isinstance(e, TarError) and e.name else None
        if current is not None and damaged is not None and _starts_new_sample(current, *damaged, url):
            yield _finished(current, count)  # complete: the damage starts the next sample
        return
    if current is not None:
        yield _finished(current, count)


def iter_samples_with_end(
    url: str, count: Callable[[str], None] | None = None
) -> Iterator[tuple[dict, list[str]]]:
    """(sample, end) for each raw sample of ``url`` (:func:`iter_raw_samples`): ``end`` is what the
    reader counts at the shard's end (a damaged shard's ``tar_error``) when the sample is the shard's
    last, [] for the others. Read one sample ahead to know it: a training worker whose share of an
    epoch ended on a shard's last sample never asked for the next one, and its damage went uncounted.

    ``count`` gets each sample's own counts (its ignored members) as the sample is handed out, and
    the end's of a shard without samples, which has no sample to carry them.
    """
    pending: list[str] = []
    held: tuple[dict, list[str]] | None = None
    for sample in iter_raw_samples(url, pending.append):
        if held is not None:
            _count_all(count, held[1])
            yield held[0], []
        held = (sample, pending[:])
        pending.clear()  # the list iter_raw_samples counts into: cleared, not replaced
    if held is None:
        _count_all(count, pending)
        return
    _count_all(count, held[1])
    yield held[0], pending


def iter_samples_end_first(url: str, count: Callable[[str], None] | None = None) -> Iterator[dict]:
    """:func:`iter_raw_samples`, but the shard's end (its ``tar_error``) is counted as its last sample
    is handed out rather than when the sample after it is asked for (:func:`iter_samples_with_end`)."""
    for sample, end in iter_samples_with_end(url, count):
        _count_all(count, end)
        yield sample


def _count_all(count: Callable[[str], None] | None, reasons: list[str]) -> None:
    if count is not None:
        for reason in reasons:
            count(reason)


def decode_text(raw: dict, ext: str) -> str | None:
    """UTF-8 text of member ``ext`` or None if absent; SkipSample(non_utf8_text) if undecodable.

    A leading byte-order mark is dropped: Windows tools write one, and ``json.loads`` refuses it in
    a str, so every such sample was skipped as ``bad_json`` (webdataset and open_clip, which parse
    the bytes, read them) and a ``.txt`` caption began with an invisible U+FEFF token.
    """
    payload = raw.get(ext)
    if payload is None:
        return None
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SkipSample("non_utf8_text", f"{raw['__key__']}.{ext}: {e}") from None


def decode_meta(raw: dict) -> dict:
    """The ``.json`` metadata ({} if absent); SkipSample(bad_json) if it is not a JSON object."""
    text = decode_text(raw, "json")
    if text is None:
        return {}
    try:
        meta = json.loads(text)
    except (ValueError, RecursionError) as e:
        # Besides JSONDecodeError (a ValueError): a number of more than 4,300 digits raises a plain
        # ValueError and deep nesting RecursionError, which crashed eval and the tokenizer's read.
        raise SkipSample("bad_json", f"{raw['__key__']}.json: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise SkipSample("bad_json", f"{raw['__key__']}.json is not an object")
    return meta


def image_member(raw: dict) -> str:
    """The extension of the sample's image member; SkipSample(missing_image) if it has none."""
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    if ext is None:
        raise SkipSample("missing_image", f"{raw['__key__']} has none of {IMAGE_EXTS}{_dotted_key_hint(raw)}")
    return ext


_MEMBER_EXTS = frozenset({*IMAGE_EXTS, "txt", "json"})


def _dotted_key_hint(raw: dict) -> str:
    """Why a sample lacks its image or caption when its file names hold a dot before theirs
    (``photo.001.jpg``): the key ends at the first dot, so the sample is ``photo`` with members
    ``001.jpg``, ``001.txt``, ``002.jpg``..., and a whole shard of such samples was skipped as one,
    with a reason that named no cause. "" for any other sample."""
    dotted = sorted(e for e in raw if "." in e and e.rsplit(".", 1)[1] in _MEMBER_EXTS)
    if not dotted:
        return ""
    shown = ", ".join(f"{raw['__key__']}.{e}" for e in dotted[:3]) + (", ..." if len(dotted) > 3 else "")
    return (
        f"; its members {shown} have a dot in their key: a key ends at the first dot of a file name "
        "(webdataset's rule), so name the files KEY.EXT with no dot in KEY"
    )


_SIXTEEN_BIT_GREY_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
"""Pillow's modes of 16-bit greyscale: 16-bit PNGs and TIFFs open as ``I;16`` (``I;16B``)."""
_SIXTEEN_BIT_I_FORMATS = frozenset({"PPM"})
"""Formats whose mode ``I`` (32-bit) images are 16-bit greyscale: a PGM of maxval over 255, which
Pillow scales to 0-65535. Any other ``I`` (a 32-bit or signed 16-bit TIFF, an image made in memory)
declares no 16-bit range: it converts as ``CLIPImageProcessor`` converts it, values clipped to
0-255. Scaled by the high byte, a 32-bit TIFF of 0-255 values (an 8-bit picture saved by numpy or
OpenCV as int32) was all black on both decode paths (up to 252 grey levels off the processor
on a 0-255 gradient)."""


def _is_sixteen_bit_grey(image: Image.Image) -> bool:
    """Whether ``image`` is greyscale that its file (or its mode) declares 16 bits deep."""
    return image.mode in _SIXTEEN_BIT_GREY_MODES or (
        image.mode == "I" and image.format in _SIXTEEN_BIT_I_FORMATS
    )


def _sixteen_bit_grey_as_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale ``image`` as L by each value's high byte (``>> 8``, as Pillow reads a
    16-bit RGB or LA PNG, and as viewers show it); LA when a tRNS value makes one grey transparent.

    Pillow's ``convert`` clips these values at 255 instead (as ``CLIPImageProcessor`` does): any
    grey above 255 of 65535 turned white, so such an image trained as an almost white one."""
    values = np.asarray(image)
    grey = (np.clip(values, 0, 65535) >> 8).astype(np.uint8)
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return Image.fromarray(grey)
    # The transparent value is a 16-bit one: matched before the scaling, as Pillow matches it.
    alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, alpha]))  # [H, W, 2] uint8: LA


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as RGB the way ``CLIPImageProcessor`` converts it (transformers 5's
    ``convert_to_rgb``): transparency (an alpha band, or a palette / tRNS transparent colour) is
    composited onto white. A plain ``convert("RGB")`` drops the alpha and keeps the colour under
    it, often black: training would see other pixels than the exported model's processor.

    One difference from the processor: 16-bit greyscale (:func:`_is_sixteen_bit_grey`) is scaled to
    8 bits (:func:`_sixteen_bit_grey_as_8_bits`), not clipped to almost white. Other 32-bit integer
    images (mode I) and float images (mode F) convert as Pillow converts them, on its 0-255 scale."""
    if _is_sixteen_bit_grey(image):
        image = _sixteen_bit_grey_as_8_bits(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def decode_image(raw: dict) -> Image.Image:
    """The sample's image as RGB, fully decoded (so truncated files fail here, not later)."""
    ext = image_member(raw)
    try:
        with Image.open(io.BytesIO(raw[ext])) as img:
            img.load()
            return to_rgb(img)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise SkipSample("undecodable_image", f"{raw['__key__']}.{ext}: {e}") from None


def decode_caption(raw: dict, meta: dict, template: str) -> str:
    """Render the caption; SkipSample when the needed text is missing or empty."""
    txt = decode_text(raw, "txt")
    try:
        caption = render_caption(template, meta, txt)
    except MissingCaptionField as e:
        reason = "missing_caption" if e.field in ("txt", "caption", "title") else "missing_field"
        raise SkipSample(reason, f"{raw['__key__']}: {e}{_dotted_key_hint(raw)}") from None
    if not has_visible_text(caption):
        raise SkipSample("empty_caption", raw["__key__"])
    return caption


def decode_sample(raw: dict, template: str) -> tuple[Image.Image, str, dict]:
    """(RGB image, caption, metadata) of a raw sample, or SkipSample."""
    meta = decode_meta(raw)
    caption = decode_caption(raw, meta, template)
    return decode_image(raw), caption, meta


def decode_sample_bytes(raw: dict, template: str) -> tuple[bytes, str, dict]:
    """(encoded image bytes, caption, metadata): :func:`decode_sample` minus the image decode.

    The checks run in the same order, so a bad sample is counted under the same reason.
    """
    meta = decode_meta(raw)
    caption = decode_caption(raw, meta, template)
    return raw[image_member(raw)], caption, meta


@functools.cache
def _simplejpeg():
    """simplejpeg (a core requirement) imported on first use; None where it cannot load."""
    try:
        import simplejpeg
    except ImportError:  # a platform without its wheel: PIL decodes the same pixels, only slower
        return None
    return simplejpeg


_JPEG_SOI, _JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
# Start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header without decoding it; None if not a JPEG."""
    if not data.startswith(_JPEG_SOI):
        return None
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            height, width = (
                int.from_bytes(data[i + 5 : i + 7], "big"),
                int.from_bytes(data[i + 7 : i + 9], "big"),
            )
            return (width, height) if width and height else None
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length field
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def draft_scale(size: tuple[int, int], target: tuple[int, int]) -> int:
    """PIL ``Image.draft``'s JPEG scale for ``size`` -> at least ``target``: 8, 4, 2 or 1.

    libjpeg decodes at 1/scale straight from the DCT coefficients, only when the image is at
    least twice the target in both dimensions, so the result never drops below ``target``.
    """
    scale = min(size[0] // max(1, target[0]), size[1] // max(1, target[1]))
    return next((s for s in (8, 4, 2) if scale >= s), 1)  # 1: smaller than the target


# libjpeg-turbo converts these to RGB differently from PIL (Adobe's inverted CMYK): PIL decides.
_PIL_COLORSPACES = frozenset({"CMYK", "YCCK"})
# Chroma subsamplings whose DCT-scaled decode stays within the fast path's tolerance of a full
# decode + resize. A scaled 4:2:2 (4:4:0, 4:1:1) decode upsamples its chroma another way: p99
# 11-19 and single pixels 48 grey levels off the processor at 64 px; such JPEGs decode in full.
_DCT_SCALED_SUBSAMPLINGS = frozenset({"420", "444", "Gray"})


def decode_image_array(data: bytes, draft_to: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 array [H, W, 3] of an encoded image; SkipSample(undecodable_image) on failure.

    ``draft_to``: (w, h) the caller will resize to; a JPEG at least twice that size is decoded
    DCT-scaled by :func:`draft_scale` (as ``Image.draft("RGB", draft_to)`` does), unless its
    chroma subsampling is not 4:2:0, 4:4:4 or grey (then in full: see above). EXIF
    orientation is ignored, as by PIL and ``CLIPImageProcessor``. A JPEG without its end marker
    (truncated) always takes the PIL path, which raises instead of returning grey rows.
    """
    sj = _simplejpeg()
    if sj is not None and data.startswith(_JPEG_SOI) and data.endswith(_JPEG_EOI):
        try:
            height, width, colorspace, subsampling = sj.decode_jpeg_header(data)
            # PIL refuses decompression bombs (more than 2 x Image.MAX_IMAGE_PIXELS); left to
            # simplejpeg, such a JPEG could take gigabytes in a worker (a 4:2:2 one decodes in full).
            bomb = Image.MAX_IMAGE_PIXELS and width * height > 2 * Image.MAX_IMAGE_PIXELS
            if colorspace not in _PIL_COLORSPACES and not bomb:
                scaled = draft_to and subsampling in _DCT_SCALED_SUBSAMPLINGS
                scale = draft_scale((width, height), draft_to) if scaled else 1
                return sj.decode_jpeg(
                    data,
                    colorspace="RGB",
                    # exactly 1/scale, as Image.draft: the smallest output that is >= (w, h) / scale
                    min_width=-(-width // scale),
                    min_height=-(-height // scale),
                    min_factor=scale,
                )
        except ValueError:  # corrupt data (strict mode): PIL gets the last word, and raises
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft_to and img.format == "JPEG":
                img.draft("RGB", draft_to)
            img.load()
            return np.array(to_rgb(img))  # a writable copy: torch.from_numpy needs one
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError...)
        raise SkipSample("undecodable_image", str(e)) from None


MEMBER_REASONS = frozenset({"ignored_member"})
"""Skip reasons that count members, not samples: the sample they belonged to trains without them."""


def lost_and_ignored(skipped: dict[str, int]) -> tuple[int, int]:
    """(samples lost, members ignored) of skip counts by reason (``TrainStream.skipped()``): what
    ``train/skipped_samples`` and ``train/ignored_members`` report. Summed together, every second
    image of a sample that trains counted as a lost sample."""
    ignored = sum(count for reason, count in skipped.items() if reason in MEMBER_REASONS)
    return sum(skipped.values()) - ignored, ignored


class SkipCounter(Counter):
    """Counts skipped samples by reason; logs the first occurrences of each reason.

    ``muted`` suppresses counting while a resumed stream replays samples it already counted.
    """

    muted = False

    def __call__(self, reason: str, detail: str = "") -> None:
        """Count one skipped sample under ``reason`` and log the first three per reason; muted: neither.

        An ignored member is counted, not logged: its sample trains, and the reader's per-shard
        warning names the member (a "skipping sample" line said the sample was lost).
        """
        if self.muted:
            return
        self[reason] += 1
        if self[reason] <= 3 and reason not in MEMBER_REASONS:
            log.warning("skipping sample (%s) %s", reason, detail)
