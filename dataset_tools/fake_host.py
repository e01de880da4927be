"""A loopback imitation of the thumbnail host (i.ytimg.com), for tests and the benchmark.

Binds 127.0.0.1 on a free port, serves ``/vi/<video_id>/<variant>.jpg`` and stops by itself
(``with FakeThumbnailHost(...)`` or after ``max_lifetime`` seconds). Per-video behaviours:

ok            every variant exists (maxres 1280x720, sd 640x480 and hq 480x360 letterboxed, mq 320x180)
missing       every variant: 404 with the 120x90 grey placeholder JPEG as body (like YouTube)
no_maxres     maxresdefault 404 + placeholder, the rest exist (also ``no_maxres_sd``)
placeholder200  maxresdefault answers 200 with the placeholder, the rest exist
throttle      first request 429 with ``Retry-After: 1``, then ok
throttle_for:<s>  every request 429 with ``Retry-After: <s>`` (a host that stays overloaded)
error500      first request 500, then ok
unavailable503  first request 503 without Retry-After, then ok
slow          sleeps ``slow_seconds`` before answering (beyond a short deadline)
truncated     announces a Content-Length longer than the body it sends
notimage      200 ``image/jpeg`` with an HTML body
truncated_maxres / notimage_maxres / grey_maxres   only maxresdefault is truncated / HTML / a
              full-size grey placeholder with status 200; the other variants exist
chunked_truncated_maxres   maxresdefault is sent chunked (no Content-Length) and cut mid-chunk
huge_pixels   a valid JPEG of 3000x3000 pixels (small file)
huge_bytes    a 2 MB body
noai          a valid image with ``X-Robots-Tag: noai``
copy_of:<id>  the same bytes as video <id> (exact duplicate for dedup tests)
"""

from __future__ import annotations

import hashlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image, ImageDraw

SIZES = {
    "maxresdefault": (1280, 720),
    "sddefault": (640, 480),
    "hqdefault": (480, 360),
    "mqdefault": (320, 180),
    "default": (120, 90),
}
LETTERBOXED = {"sddefault", "hqdefault"}


def _color(seed: str) -> tuple:
    digest = hashlib.sha256(seed.encode()).digest()
    return tuple(64 + b % 160 for b in digest[:3])


def render_thumbnail(video_id: str, variant: str, size: tuple | None = None) -> bytes:
    """A JPEG whose content depends on the video (so perceptual hashes differ between videos)."""
    width, height = size or SIZES[variant]
    img = Image.new("RGB", (width, height), (0, 0, 0))
    top, bottom = 0, height
    if variant in LETTERBOXED and size is None:
        bar = (height - width * 9 // 16) // 2  # a 16:9 frame inside 4:3, black bars above/below
        top, bottom = bar, height - bar
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, top, width - 1, bottom - 1], fill=_color(video_id))
    digest = hashlib.sha256(video_id.encode()).digest()
    for i in range(6):  # a few blocks placed by the id: structure for imagehash
        x = digest[i] * (width - width // 5) // 255
        y = top + digest[i + 6] * (bottom - top - (bottom - top) // 4) // 255
        draw.rectangle([x, y, x + width // 5, y + (bottom - top) // 4], fill=_color(video_id + str(i)))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


def render_placeholder(size: tuple = (120, 90)) -> bytes:
    """YouTube's "no thumbnail" image: a light grey field with a darker grey pictogram."""
    width, height = size
    img = Image.new("RGB", (width, height), (204, 204, 204))
    draw = ImageDraw.Draw(img)
    draw.rectangle([width * 3 // 8, height * 3 // 8, width * 5 // 8, height * 5 // 8], fill=(150, 150, 150))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=85)
    return out.getvalue()


PLACEHOLDER = render_placeholder((120, 90))


class FakeThumbnailHost:
    """Threaded HTTP server on 127.0.0.1; ``url_template`` is ready for ``--url-template``."""

    def __init__(
        self,
        behaviours: dict[str, str] | None = None,
        latency: float = 0.0,
        slow_seconds: float = 2.0,
        max_lifetime: float = 600.0,
    ):
        self.behaviours = dict(behaviours or {})
        self.latency = latency
        self.slow_seconds = slow_seconds
        self.max_lifetime = max_lifetime
        self.requests: list[dict] = []  # {"path", "user_agent", "time", "status"}
        self._hits: dict[str, int] = {}
        self._cache: dict[tuple, bytes] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FakeThumbnailHost:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        """Serve on a free loopback port in a daemon thread; stops by itself after ``max_lifetime``."""
        host = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                host._handle(self)

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        # Stops by itself even if a test forgets to: a server must never outlive its purpose.
        self._timer = threading.Timer(self.max_lifetime, self.stop)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        """Shut the server down (idempotent)."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
            self._timer.cancel()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return self._server.server_address[1]

    @property
    def url_template(self) -> str:
        """A ``--url-template`` pointing at this host (``{video_id}`` and ``{variant}`` placeholders)."""
        return f"http://127.0.0.1:{self.port}/vi/{{video_id}}/{{variant}}.jpg"

    # -- behaviour ---------------------------------------------------------------------------
    def image(self, video_id: str, variant: str, size: tuple | None = None) -> bytes:
        """The JPEG bytes served for one video and variant (rendered once, then cached)."""
        key = (video_id, variant, size)
        with self._lock:
            if key not in self._cache:
                self._cache[key] = render_thumbnail(video_id, variant, size)
            return self._cache[key]

    def _handle(self, req: BaseHTTPRequestHandler) -> None:
        parts = req.path.split("?")[0].strip("/").split("/")
        if len(parts) != 3 or parts[0] != "vi" or not parts[2].endswith(".jpg"):
            return self._send(req, 400, b"bad path", "text/plain")
        video_id, variant = parts[1], parts[2][:-4]
        with self._lock:
            self._hits[video_id] = self._hits.get(video_id, 0) + 1
            first = self._hits[video_id] == 1
            self.requests.append(
                {
                    "path": req.path,
                    "user_agent": req.headers.get("User-Agent"),
                    "time": time.monotonic(),
                    "video_id": video_id,
                    "variant": variant,
                }
            )
        if self.latency:
            time.sleep(self.latency)
        kind = self.behaviours.get(video_id, "ok")
        if variant not in SIZES or kind == "missing":
            return self._send(req, 404, PLACEHOLDER)
        if kind.startswith("no_maxres") and (
            variant == "maxresdefault" or (kind == "no_maxres_sd" and variant == "sddefault")
        ):
            return self._send(req, 404, PLACEHOLDER)
        if kind == "placeholder200" and variant == "maxresdefault":
            return self._send(req, 200, PLACEHOLDER)
        if kind == "chunked_truncated_maxres" and variant == "maxresdefault":
            return self._send_cut_chunk(req, self.image(video_id, variant))
        if kind in ("truncated_maxres", "notimage_maxres", "grey_maxres") and variant == "maxresdefault":
            body = self.image(video_id, variant)
            if kind == "truncated_maxres":
                return self._send(req, 200, body[: len(body) // 2], length=len(body))
            if kind == "notimage_maxres":
                return self._send(req, 200, b"<html><body>not a picture</body></html>")
            return self._send(req, 200, render_placeholder(SIZES[variant]))
        if kind.startswith("throttle_for:"):
            retry_after = kind.split(":", 1)[1]
            return self._send(req, 429, b"slow down", "text/plain", {"Retry-After": retry_after})
        if kind == "throttle" and first:
            return self._send(req, 429, b"slow down", "text/plain", {"Retry-After": "1"})
        if kind == "error500" and first:
            return self._send(req, 500, b"oops", "text/plain")
        if kind == "unavailable503" and first:
            return self._send(req, 503, b"overloaded", "text/plain")
        if kind == "slow":
            time.sleep(self.slow_seconds)
        if kind == "truncated":
            body = self.image(video_id, variant)
            return self._send(req, 200, body[: len(body) // 2], length=len(body))
        if kind == "notimage":
            return self._send(req, 200, b"<html><body>not a picture</body></html>")
        if kind == "huge_pixels":
            return self._send(req, 200, self.image(video_id, variant, (3000, 3000)))
        if kind == "huge_bytes":
            return self._send(req, 200, b"\xff\xd8" + b"\x00" * (2 * 1024 * 1024))
        if kind.startswith("copy_of:"):
            return self._send(req, 200, self.image(kind.split(":", 1)[1], variant))
        headers = {"X-Robots-Tag": "noai"} if kind == "noai" else None
        return self._send(req, 200, self.image(video_id, variant), headers=headers)

    @staticmethod
    def _send_cut_chunk(req, body: bytes) -> None:
        """One chunk announced for the whole body, half of it sent, then the connection closed."""
        try:
            req.send_response(200)
            req.send_header("Content-Type", "image/jpeg")
            req.send_header("Transfer-Encoding", "chunked")
            req.send_header("Connection", "close")
            req.close_connection = True
            req.end_headers()
            req.wfile.write(b"%x\r\n" % len(body) + body[: len(body) // 2])
        except (BrokenPipeError, ConnectionResetError):
            pass

    @staticmethod
    def _send(
        req,
        status: int,
        body: bytes,
        content_type: str = "image/jpeg",
        headers: dict | None = None,
        length: int | None = None,
    ) -> None:
        try:
            req.send_response(status)
            req.send_header("Content-Type", content_type)
            req.send_header("Content-Length", str(len(body) if length is None else length))
            for name, value in (headers or {}).items():
                req.send_header(name, value)
            if length is not None:
                req.send_header("Connection", "close")
                req.close_connection = True
            req.end_headers()
            req.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (deadline): nothing to do
