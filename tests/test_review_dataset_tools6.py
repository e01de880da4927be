"""Review of the download politeness: a Retry-After that names no wait, and --deadline against a
host that drips its answer a byte at a time (real loopback sockets, the real fetch path)."""

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from recording_limiter import RecordingLimiter

from dataset_tools import fetch
from dataset_tools.politeness import HostLimiter, PolitenessConfig


class _Throttling(BaseHTTPRequestHandler):
    retry_after = "0"

    def do_GET(self):
        self.send_response(429)
        self.send_header("Retry-After", self.retry_after)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("retry_after", ["0", "Wed, 21 Oct 2015 07:28:00 GMT"])
def test_a_429_whose_retry_after_names_no_wait_still_holds_the_other_threads(retry_after):
    # Retry-After: 0 (or a date already past) parsed as a 0 s wait, and the cool-down shared with
    # the other threads was that 0 s: they kept hitting a host that had just said "too many
    # requests", where a bare 429 or a positive Retry-After holds them back.
    handler = type("Handler", (_Throttling,), {"retry_after": retry_after})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = PolitenessConfig(retries=1, backoff_base=0.4, deadline=5.0, requests_per_second=0)
        limiter, waits = RecordingLimiter(), []
        url = f"http://127.0.0.1:{server.server_address[1]}/vi/x/maxresdefault.jpg"
        response, error, attempts = fetch.fetch_with_retries(url, cfg, limiter, sleep=waits.append)
        held_from = time.monotonic()
        limiter.acquire()  # another thread's request, right after the 429s
        held = time.monotonic() - held_from
        limiter.release()
    finally:
        server.shutdown()
        server.server_close()
    assert response is None and error == "HTTP Error 429 (after 2 attempts)" and attempts == 2
    assert len(waits) == 1 and waits[0] >= cfg.backoff_base / 2
    # Every thread is held for the backoff this thread waits, as after a bare 429, each time.
    assert limiter.cool_downs[0] == waits[0] and len(limiter.cool_downs) == 2
    assert min(limiter.cool_downs) >= cfg.backoff_base / 2
    assert held >= 0.1  # the last 429's hold (at least 0.4 s) was still on


def _drip_server(fast: bytes, dripped: bytes, tail: bytes, gap: float) -> tuple[str, dict]:
    """A loopback host that answers one request with ``fast`` at once, ``dripped`` one byte every
    ``gap`` s, then ``tail`` at once. ``state["dripped"]`` turns True once every dripped byte is
    sent, before the tail: never, if the client hangs up first."""
    listener = socket.create_server(("127.0.0.1", 0))
    state = {"dripped": False}

    def serve():
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)
            try:
                conn.sendall(fast)
                for byte in dripped:
                    conn.sendall(bytes([byte]))
                    time.sleep(gap)
                state["dripped"] = True
                conn.sendall(tail)
            except OSError:  # the client hung up
                return

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}/vi/x/maxresdefault.jpg", state


STATUS = b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\n"


@pytest.mark.parametrize(
    "fast,dripped,tail",
    [
        # the status line and headers
        (b"", STATUS + b"Content-Length: 4\r\nX-Pad: " + b"a" * 20 + b"\r\n\r\n", b"xxxx"),
        # a chunked body's chunk-size line (a chunk extension pads it)
        (
            STATUS + b"Transfer-Encoding: chunked\r\n\r\n",
            b"4;pad=" + b"a" * 60 + b"\r\n",
            b"xxxx\r\n0\r\n\r\n",
        ),
    ],
    ids=["headers", "chunk-size-line"],
)
def test_a_host_dripping_its_answer_is_cut_at_the_deadline(fast, dripped, tail):
    # The socket timeout bounds each wait for a byte, not the request, and the body loop's own
    # check only ran between body chunks: a host dripping its headers (or a chunk-size line) a
    # byte every 0.05 s held the thread until it had sent them all (here about 4 s for a 0.5 s
    # --deadline; as long as the host liked with longer lines).
    url, state = _drip_server(fast, dripped, tail, gap=0.05)
    cfg = PolitenessConfig(retries=0, deadline=0.5, requests_per_second=0)
    with pytest.raises(fetch._Retryable, match=fetch.ERR_DEADLINE):
        fetch.fetch_once(url, cfg, HostLimiter(1, 0))
    assert not state["dripped"]  # the request ended while the host was still dripping


def test_an_answer_within_the_deadline_is_whole():
    # The deadline's watch is cancelled with the request: a prompt answer keeps every byte.
    body = b"x" * 100_000
    url, _ = _drip_server(STATUS + b"Content-Length: 100000\r\n\r\n", b"", body, gap=0.0)
    response = fetch.fetch_once(url, PolitenessConfig(deadline=2.0), HostLimiter(1, 0))
    assert response.status == 200 and response.body == body
