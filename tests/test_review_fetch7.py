"""Review of the fetch, seventh pass: a redirect is a new request to the host, not a way around
its caps. Its body is not read (urllib read it whole, past --max-bytes), each hop waits for a
rate token (a redirect loop sent 5 requests under one), a loop fails the row on one line, and
only http(s) is followed (an ftp:// hop escaped the --deadline watchdog).

Runtime: ~2 s (loopback servers on 127.0.0.1).
"""

import socket
import threading
import time

from loopback_images import QuietHandler, serving

from dataset_tools import fetch
from dataset_tools.fake_host import render_thumbnail
from dataset_tools.politeness import HostLimiter, PolitenessConfig

VARIANTS = ["maxresdefault", "sddefault"]
REDIRECT_BODY = 64 * 1024 * 1024
MAX_BYTES = 1024 * 1024


class _RedirectingHost(QuietHandler):
    """``/vi/big/...`` redirects to ``/vi/okokokokoko/...`` with a 64 MB body; ``/vi/loop/...``
    redirects to itself; everything else is a thumbnail. Notes each request and the bytes of
    redirect body it got out."""

    protocol_version = "HTTP/1.1"
    hits: list = []
    redirect_bytes_sent = [0]
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            self.hits.append(time.monotonic())
        video_id, variant = self.path.split("/")[2], self.path.split("/")[3][:-4]
        if video_id in ("big", "loop"):
            self.send_response(302)
            self.send_header(
                "Location", self.path if video_id == "loop" else self.path.replace("big", "okokokokoko")
            )
            self.send_header("Content-Length", str(REDIRECT_BODY if video_id == "big" else 0))
            self.end_headers()
            if video_id == "big":
                self._send_redirect_body()
            return
        body = render_thumbnail(video_id, variant)
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_redirect_body(self):
        chunk = b"x" * (256 * 1024)
        try:
            for _ in range(REDIRECT_BODY // len(chunk)):
                self.wfile.write(chunk)
                with self.lock:
                    self.redirect_bytes_sent[0] += len(chunk)
        except OSError:  # the client closed the connection without reading on
            pass


def _ladder(video_id, template, deadline=10.0, **politeness):
    cfg = PolitenessConfig(retries=0, deadline=deadline, **politeness)
    return fetch.fetch_ladder(video_id, VARIANTS, template, cfg, HostLimiter(2, cfg.requests_per_second))


def test_a_redirect_body_is_not_read_past_max_bytes():
    # Before: the 64 MB behind the 302 were read into memory although --max-bytes was 1 MB.
    with serving(_RedirectingHost) as template:
        result = _ladder("big", template, max_bytes=MAX_BYTES, requests_per_second=0)
    assert result.error is None and result.trail == ["maxresdefault:ok"]
    # What the host got out is what the socket buffers took before the client closed them.
    assert _RedirectingHost.redirect_bytes_sent[0] < REDIRECT_BODY // 4


def test_each_redirect_hop_waits_for_a_rate_token_and_a_loop_fails_on_one_line():
    _RedirectingHost.hits.clear()
    with serving(_RedirectingHost) as template:
        result = _ladder("loop", template, requests_per_second=10)
    hits = sorted(_RedirectingHost.hits)
    assert len(hits) >= 5  # urllib's loop detection: the same URL five times
    # Before: all hops in a few milliseconds; at 10 requests/s they are 0.1 s apart at least.
    assert hits[-1] - hits[0] >= 0.1 * (len(hits) - 1) * 0.9
    # The row is one counted failure, its histogram key one line (it spanned three).
    assert result.body is None and result.trail == ["maxresdefault:error"]
    assert result.error.startswith("HTTP Error 302") and "\n" not in result.error


def test_a_redirect_to_ftp_is_not_followed():
    # Before: urllib connected to the ftp:// URL, on a socket no watchdog watches (a dripping FTP
    # greeting held the thread for 94 s under a 2 s deadline).
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    ftp_url = f"ftp://127.0.0.1:{listener.getsockname()[1]}/x.jpg"

    class ToFtp(QuietHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", ftp_url)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with listener, serving(ToFtp) as template:
        result = _ladder("abcdefghijk", template, deadline=2.0, requests_per_second=0)
        try:
            listener.accept()[0].close()
            reached_ftp = True
        except TimeoutError:
            reached_ftp = False
    assert not reached_ftp
    assert result.body is None and result.trail == ["maxresdefault:error"]
    assert result.error == "HTTP Error 302: redirect to a URL that is not http(s)"
