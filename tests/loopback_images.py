"""A loopback HTTP server on 127.0.0.1 serving thumbnails, and one row's fetch ladder against it
as a build runs it (no retries, a 5 s deadline, no rate limit): for the fetch tests whose answers
the fake host (`dataset_tools/fake_host.py`) does not give."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from dataset_tools import fetch
from dataset_tools.politeness import HostLimiter, PolitenessConfig


class QuietHandler(BaseHTTPRequestHandler):
    """A handler that logs nothing to the test's stderr."""

    def log_message(self, *args):
        pass


class JpegHandler(QuietHandler):
    """Answers every GET with 200 and the JPEG `body(path)`, with its Content-Length."""

    def body(self, path: str) -> bytes:
        raise NotImplementedError

    def do_GET(self):
        body = self.body(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextmanager
def serving(handler):
    """Yields the URL template of a server with `handler` on a free 127.0.0.1 port; shuts it down."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/vi/{{video_id}}/{{variant}}.jpg"
    finally:
        server.shutdown()
        server.server_close()


def fetch_row(video_id: str, variants: list[str], template: str):
    """`fetch.fetch_ladder` for one row: no retries, a 5 s deadline, no rate limit."""
    cfg = PolitenessConfig(retries=0, deadline=5.0, requests_per_second=0)
    return fetch.fetch_ladder(video_id, variants, template, cfg, HostLimiter(2, 0))
