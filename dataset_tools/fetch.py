"""Polite HTTP fetch of one thumbnail, and the variant ladder (maxres -> sd -> hq -> mq).

``fetch_ladder`` returns the first variant that is a real, complete, decodable image.
429/5xx/timeouts/truncated bodies are retried with backoff on the *same* variant first. A variant
that is missing (404), a placeholder (YouTube's grey image, recognised by content as well as by
its 120x90 size), not a decodable image, truncated, or over the size caps falls to the next rung;
the row fails only when every rung failed, and the trail records each rung's reason. Two outcomes
stop the ladder at once: the host's trouble (timeouts, 429/5xx after the retries, connection
errors: asking for the next variant would only add load; ``build --retry-failed`` tries again
later) and an X-Robots-Tag that disallows the image (the owner's word covers every variant).
"""

from __future__ import annotations

import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from PIL import Image

from dataset_tools import youtube
from dataset_tools.politeness import HostLimiter, PolitenessConfig, backoff_delay, parse_retry_after

# Reasons recorded in ``error_message`` (the histogram keys in stats and `inspect`).
ERR_ALL_MISSING = "no thumbnail: every variant missing (404 or placeholder)"
ERR_ROBOTS = "Use of image disallowed by X-Robots-Tag directive"  # img2dataset's wording
ERR_TOO_BIG = "response larger than max_bytes"
ERR_TOO_MANY_PIXELS = "image larger than max_pixels"
ERR_NOT_IMAGE = "body is not a decodable image"
ERR_TRUNCATED = "truncated body"
ERR_DEADLINE = "deadline exceeded"
# Per-rung failures after which the next variant is tried (the trail's short codes).
_NEXT_RUNG = {
    ERR_NOT_IMAGE: "not_image",
    ERR_TRUNCATED: "truncated",
    ERR_TOO_BIG: "too_big",
    ERR_TOO_MANY_PIXELS: "too_many_pixels",
}

_CHUNK = 64 * 1024


class _Retryable(Exception):
    """A transient failure worth another attempt after a backoff. ``throttled``: the host said
    it is overloaded (429, 503), so every thread should ease off, not only this one."""

    def __init__(self, reason: str, retry_after: float | None = None, throttled: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.throttled = throttled


class _Permanent(Exception):
    """A failure no retry will fix (size caps, X-Robots-Tag, 403...)."""


@dataclass
class Response:
    """One HTTP answer: the status code and the body bytes."""

    status: int
    body: bytes


@dataclass
class LadderResult:
    """Outcome of one video: ``body`` (raw bytes of the winning variant) or ``error``."""

    body: bytes | None
    error: str | None
    variant: str | None = None
    url: str | None = None
    attempts: int = 0
    trail: list[str] = field(default_factory=list)  # "variant:outcome" per variant tried


def _disallowed(headers, cfg: PolitenessConfig) -> bool:
    """img2dataset's X-Robots-Tag rule: a directive for everyone or for our token."""
    for value in headers.get_all("X-Robots-Tag") or []:
        token, _, directives = value.rpartition(":") if ":" in value else ("", "", value)
        token = token.strip().lower()
        names = {d.strip().lower() for d in directives.split(",")}
        if (not token or token == cfg.robots_token.lower()) and names & set(cfg.disallowed_directives):
            return True
    return False


def _content_length(value: str | None) -> int | None:
    """The announced body length, or None when absent or not plain ASCII digits. str.isdigit also
    takes '²' (a latin-1 header byte): int() raised on it and the row failed as an internal fetch
    error, where http.client itself just reads such a body to its end."""
    value = (value or "").strip()
    return int(value) if value.isdigit() and value.isascii() else None


def _read_body(resp, cfg: PolitenessConfig, started: float) -> bytes:
    """Read to the end within the deadline and size cap; detect bodies shorter than announced."""
    declared_len = _content_length(resp.headers.get("Content-Length"))
    if declared_len is not None and declared_len > cfg.max_bytes:
        raise _Permanent(ERR_TOO_BIG)
    chunks, total = [], 0
    while True:
        # read1 returns what has arrived (read(n) would wait for all n bytes); the request's
        # _Watchdog ends a read still waiting at the deadline.
        try:
            chunk = resp.read1(_CHUNK)
        except http.client.IncompleteRead:
            # A chunked body (no Content-Length) cut short: the same truncation as a body shorter
            # than its Content-Length, not a connection error that would stop the ladder.
            raise _Retryable(ERR_TRUNCATED) from None
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        if total > cfg.max_bytes:
            raise _Permanent(ERR_TOO_BIG)
        if time.monotonic() - started > cfg.deadline:
            raise _Retryable(ERR_DEADLINE)
    if declared_len is not None and total < declared_len:
        raise _Retryable(ERR_TRUNCATED)
    return b"".join(chunks)


class _Watchdog:
    """Ends one request at its wall-clock deadline, wherever it is. The socket timeout bounds
    each wait for bytes, not the request: a host that sent a byte every second (status line,
    headers, chunk sizes or body) held a download thread for minutes past ``--deadline``."""

    def __init__(self, seconds: float):
        self._expires = time.monotonic() + seconds
        self._timer: threading.Timer | None = None
        self.fired = False

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down when the deadline passes; a redirect's new connection replaces it."""
        self.cancel()
        self._timer = threading.Timer(max(0.0, self._expires - time.monotonic()), self._expire, (sock,))
        self._timer.daemon = True
        self._timer.start()

    def _expire(self, sock: socket.socket) -> None:
        self.fired = True
        try:
            # socket.socket's own shutdown, also under TLS: the SSLSocket one drops the TLS state
            # the reading thread is using. Either way the blocked read returns at once.
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:  # already closed: the request ended meanwhile
            pass

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


class _WatchedConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket its request's ``_Watchdog`` shuts at the deadline."""

    watchdog: _Watchdog

    def connect(self) -> None:
        super().connect()
        self.watchdog.watch(self.sock)  # the TCP socket: for HTTPS, before the TLS handshake


class _WatchedHTTPSConnection(http.client.HTTPSConnection, _WatchedConnection):
    """HTTPS: ``HTTPSConnection.connect`` calls ``_WatchedConnection.connect``, then wraps."""


def _watched(connection_class: type, watchdog: _Watchdog):
    def make(*args, **kwargs):
        connection = connection_class(*args, **kwargs)
        connection.watchdog = watchdog
        return connection

    return make


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def http_open(self, req):
        return self.do_open(_watched(_WatchedConnection, self._watchdog), req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, watchdog: _Watchdog):
        super().__init__()
        self._watchdog = watchdog

    def https_open(self, req):
        return self.do_open(_watched(_WatchedHTTPSConnection, self._watchdog), req, context=self._context)


class _PoliteRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect as the new request it is: after a rate token, and without reading the
    redirect's own body. urllib read that body whole, past ``--max-bytes`` (a 302 carrying 200 MB
    took 200 MB of memory), and sent each hop at once (a redirect loop: 5 requests under one token).
    Only to http(s): urllib also followed ``ftp://``, whose socket no ``_Watchdog`` watches (a
    dripping FTP greeting held a thread for 94 s under a 2 s ``--deadline``)."""

    def __init__(self, limiter: HostLimiter):
        super().__init__()
        self._limiter = limiter

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise urllib.error.HTTPError(newurl, code, "redirect to a URL that is not http(s)", headers, fp)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            fp.close()  # urllib then reads b"" from it; the connection is not reused anyway
            self._limiter.wait_turn()
        return new


def fetch_once(url: str, cfg: PolitenessConfig, limiter: HostLimiter) -> Response:
    """One GET, over within ``cfg.deadline`` seconds of its turn. Returns 2xx/404 responses;
    raises _Retryable or _Permanent otherwise."""
    request = urllib.request.Request(url, headers={"User-Agent": cfg.user_agent})
    limiter.acquire()
    started = time.monotonic()
    watchdog = _Watchdog(cfg.deadline)
    opener = urllib.request.build_opener(
        _WatchedHTTPHandler(watchdog), _WatchedHTTPSHandler(watchdog), _PoliteRedirectHandler(limiter)
    )
    try:
        response = _get(opener, request, cfg, started)
    except _Retryable:
        if not watchdog.fired:
            raise
    finally:
        watchdog.cancel()
        limiter.release()
    if watchdog.fired:  # the cut shows as a short body, a closed connection or even a whole one
        raise _Retryable(ERR_DEADLINE)
    return response


def _get(opener, request, cfg: PolitenessConfig, started: float) -> Response:
    try:
        with opener.open(request, timeout=cfg.deadline) as resp:
            if _disallowed(resp.headers, cfg):
                raise _Permanent(ERR_ROBOTS)
            return Response(resp.status, _read_body(resp, cfg, started))
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return Response(404, b"")  # the placeholder body is never looked at
        if err.code == 429 or err.code >= 500:
            retry_after = parse_retry_after(err.headers.get("Retry-After") if err.headers else None)
            throttled = err.code in (429, 503)
            raise _Retryable(f"HTTP Error {err.code}", retry_after, throttled) from None
        # One line: a redirect loop's reason spans three, and it is a key of the failure histogram.
        raise _Permanent(f"HTTP Error {err.code}: {' '.join(str(err.reason).split())}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (socket.timeout, TimeoutError)):
            raise _Retryable(ERR_DEADLINE) from None
        raise _Retryable(f"connection error: {err.reason}") from None
    except TimeoutError:
        raise _Retryable(ERR_DEADLINE) from None
    except (http.client.HTTPException, ConnectionError, OSError) as err:
        raise _Retryable(f"connection error: {type(err).__name__}") from None


def fetch_with_retries(url: str, cfg: PolitenessConfig, limiter: HostLimiter, sleep=time.sleep) -> tuple:
    """(Response or None, error or None, attempts). Backs off between transient failures."""
    attempts = 0
    for attempt in range(cfg.retries + 1):
        attempts += 1
        try:
            return fetch_once(url, cfg, limiter), None, attempts
        except _Permanent as err:
            return None, str(err), attempts
        except _Retryable as err:
            last = err.reason
            delay = backoff_delay(attempt, cfg, err.retry_after)
            _share_cool_down(err, delay, cfg, limiter)
            if attempt < cfg.retries:
                sleep(delay)
    return None, f"{last} (after {attempts} attempts)", attempts


def _share_cool_down(err: _Retryable, delay: float, cfg: PolitenessConfig, limiter: HostLimiter) -> None:
    """Hold back every thread of the process, not only the one that was told: after a
    Retry-After for as long as it says, after a bare 429/503 for this attempt's backoff. A
    Retry-After of 0 or a date already past says nothing about how long: a 429/503 carrying one
    holds the threads for the backoff, like a bare one (it held none, so the other threads kept
    hitting a host that had just said it was overloaded, while this one backed off)."""
    if err.retry_after:
        limiter.cool_down(min(err.retry_after, cfg.backoff_max))
    elif err.throttled:
        limiter.cool_down(delay)


def check_image(body: bytes, cfg: PolitenessConfig) -> tuple:
    """((width, height), None) for a complete image within the pixel cap, else (None, reason).

    The size comes from the header (no pixel decoding) so a decompression bomb is refused before
    it is decoded; the full decode at 1/8 scale (JPEG draft mode) still reads every byte, which is
    what catches truncated files without paying for a full-resolution decode.
    """
    try:
        with Image.open(io.BytesIO(body)) as img:
            size = img.size
            if size[0] * size[1] > cfg.max_pixels:
                return None, ERR_TOO_MANY_PIXELS
            img.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
            img.load()
    except Image.DecompressionBombError:
        return None, ERR_TOO_MANY_PIXELS
    except Exception:  # PIL raises many types for garbage; the reason is what matters
        return None, ERR_NOT_IMAGE
    if not _resizer_decodes(body):
        return None, ERR_NOT_IMAGE
    return size, None


def _resizer_decodes(body: bytes) -> bool:
    """Whether OpenCV, which img2dataset's resizer decodes with, reads ``body`` (at 1/8 scale:
    cheap for a JPEG). PIL reads formats OpenCV does not (ICO, PCX, TGA...): such a rung won the
    ladder and its row failed as "Image decoding error" in the resizer, though the next variant
    was a JPEG."""
    return cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) is not None


def is_placeholder(body: bytes) -> bool:
    """True for YouTube's "no thumbnail" image, whatever its size: flat, colourless grey with a
    simple pictogram.

    The placeholder is a light grey field with a darker grey pictogram, so (on a 32x24 thumbnail
    of it) every pixel is grey (channels within a few levels of each other, JPEG noise allowed),
    one grey level (mid to light, not white) covers most of the picture, and few levels are
    used. A real thumbnail, even a black-and-white one, has texture that spreads its levels. A
    title card on flat grey ("Lecture 7" on a grey slide) passes all of that too, so the shapes on
    the field decide: the pictogram is a few solid bars, text is many strokes, and a glyph, even a
    lone one ("7", "#1", "Q&A"), is strokes that fill little of the box around them.
    """
    try:
        with Image.open(io.BytesIO(body)) as img:
            img.draft("RGB", (240, 180))
            rgb = img.convert("RGB")
    except Exception:
        return False
    return _flat_grey(rgb.resize((32, 24))) and _few_solid_shapes(rgb.convert("L"))


def _flat_grey(small: Image.Image) -> bool:
    """Colourless, one mid-to-light grey level over most of ``small``, few levels in all."""
    pixels = list(small.getdata())
    if max(max(p) - min(p) for p in pixels) > 16:
        return False
    levels: dict[int, int] = {}
    for p in pixels:
        levels[sum(p) // 3 // 16] = levels.get(sum(p) // 3 // 16, 0) + 1
    counts = sorted(levels.values(), reverse=True)
    used = sum(1 for c in counts if c > 0.02 * len(pixels))
    return counts[0] >= 0.6 * len(pixels) and used <= 3 and 5 <= max(levels, key=levels.get) <= 14


_SHAPE_GRID = (120, 90)  # the placeholder's own size: any size of it is looked at alike
_SHAPE_LEVELS = 12  # off the field by more than this is drawn on it (q50 JPEG noise stays under)
_MAX_RUNS = 6  # a pictogram of up to three bars (plus JPEG ringing); one word of text is ~10+
# A bar fills its bounding box (0.8-1.0 in the 120x90 view at q60-q85, edges blurred by the
# resize); a glyph's strokes fill 0.3-0.5 of theirs ("7", "A", "#", "K"). A disc fills 0.79.
_MIN_SOLID_FILL = 0.7
_MIN_SHAPE_PIXELS = 4  # smaller specks are JPEG ringing, not drawn shapes


def _few_solid_shapes(grey: Image.Image) -> bool:
    """True when what is drawn on the field crosses any row or column of a 120x90 view at most
    ``_MAX_RUNS`` times and each drawn shape is solid: bars are, the strokes of text are not (until
    2026-12-07 every grey title card was taken for the placeholder, and its row failed as every
    variant missing; a card of one glyph or a short word, "7", "#1", "OK", crosses a line as few
    times as the bars, and still was)."""
    width, height = _SHAPE_GRID
    view = grey.resize(_SHAPE_GRID, Image.Resampling.BOX)
    histogram = view.histogram()
    field = max(range(256), key=lambda level: sum(histogram[max(0, level - 2) : level + 3]))
    drawn = [abs(p - field) > _SHAPE_LEVELS for p in view.tobytes()]
    rows = (drawn[y * width : (y + 1) * width] for y in range(height))
    columns = (drawn[x::width] for x in range(width))
    few = all(_runs(line) <= _MAX_RUNS for lines in (rows, columns) for line in lines)
    return few and _shapes_are_solid(np.array(drawn, np.uint8).reshape(height, width))


def _shapes_are_solid(drawn: np.ndarray) -> bool:
    """Whether every shape (8-connected pixels) of the mask ``drawn`` [H, W] fills at least
    ``_MIN_SOLID_FILL`` of its bounding box."""
    count, _labels, stats, _centroids = cv2.connectedComponentsWithStats(drawn, connectivity=8)
    shapes = stats[1:count]  # row 0 is the field
    area = shapes[:, cv2.CC_STAT_AREA]
    box = shapes[:, cv2.CC_STAT_WIDTH] * shapes[:, cv2.CC_STAT_HEIGHT]
    return not np.any((area >= _MIN_SHAPE_PIXELS) & (area < _MIN_SOLID_FILL * box))


def _runs(line: list) -> int:
    """How many separate stretches of True ``line`` holds."""
    return sum(1 for i, on in enumerate(line) if on and (i == 0 or not line[i - 1]))


def _served_placeholder(variant: str, size: tuple, body: bytes) -> bool:
    """YouTube's placeholder: 120x90 for a variant that is larger, or grey by content at any size."""
    larger_by_nature = variant not in youtube.NATIVE_120X90_VARIANTS
    return (size == youtube.PLACEHOLDER_SIZE and larger_by_nature) or is_placeholder(body)


def _rung_failure(error: str) -> str | None:
    """The trail code when `error` means "try the next variant", else None (stop the ladder)."""
    for reason, code in _NEXT_RUNG.items():
        if error.startswith(reason):
            return code
    return None


def fetch_ladder(
    video_id: str, variants: Sequence[str], template: str, cfg: PolitenessConfig, limiter: HostLimiter
) -> LadderResult:
    """Try each variant in order; the first real image wins. Placeholders never win.

    On failure ``error`` is ERR_ALL_MISSING when every rung was missing or a placeholder, else the
    first other reason (a stable key for the failure histograms); ``trail`` has every rung's code.
    """
    result = LadderResult(body=None, error=None)
    first_reason = None
    for variant in variants:
        url = youtube.thumbnail_url(video_id, variant, template)
        response, error, attempts = fetch_with_retries(url, cfg, limiter)
        result.attempts += attempts
        if error is None and response.status == 404:
            result.trail.append(f"{variant}:404")
            continue
        if error is None:
            size, error = check_image(response.body, cfg)
        if error is not None:
            code = _rung_failure(error)
            result.url = url
            if code is None:  # the host's trouble or its owner's refusal: stop here
                result.trail.append(f"{variant}:error")
                result.error = error
                return result
            result.trail.append(f"{variant}:{code}")
            first_reason = first_reason or error
            continue
        if _served_placeholder(variant, size, response.body):
            # YouTube sometimes serves the grey placeholder with 200: treat it as missing.
            result.trail.append(f"{variant}:placeholder")
            continue
        result.trail.append(f"{variant}:ok")
        result.body, result.variant, result.url = response.body, variant, url
        return result
    result.error = first_reason or ERR_ALL_MISSING
    return result
