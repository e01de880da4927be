"""Review of dataset_tools (7): the build's own reports (`_build/rejected_input.jsonl`,
`_build/summary.json`) are replaced whole, never rewritten in place, and a Retry-After that is not
ASCII delta-seconds is no usable Retry-After (real builds, real subprocesses, real loopback sockets).

Runtime: ~15 s on 2 busy cores (two in-process builds whose download pool starts with no work).
"""

import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from recording_limiter import RecordingLimiter

from dataset_tools import fetch
from dataset_tools.cli import main
from dataset_tools.politeness import PolitenessConfig, parse_retry_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Never contacted: every input row is rejected, so the plan is empty.
URL_TEMPLATE = "http://127.0.0.1:9/vi/{video_id}/{variant}.jpg"


def _rejected_only_input(path, rows):
    """A CSV whose every row has an invalid video id (long titles make rejected_input.jsonl big)."""
    path.write_text("video_id,title\n" + "".join(f"bad!{i},{'t' * 150} {i}\n" for i in range(rows)))


def _build_args(inp, out):
    return ["build", "--input", str(inp), "--output", str(out), "--processes", "1"]


def _build(inp, out):
    return main([*_build_args(inp, out), "--url-template", URL_TEMPLATE])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """An output whose build rejected 2000 rows (~350 KB of rejected_input.jsonl)."""
    root = tmp_path_factory.mktemp("built")
    inp, out = root / "in.csv", root / "out"
    _rejected_only_input(inp, 2000)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    assert _build(inp, out) == 0
    return inp, out


_FULL_DISK_BUILD = """
import resource, signal, sys
from dataset_tools.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then an OSError (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
sys.exit(main(sys.argv[1:]))
"""


def test_a_rejected_list_the_disk_cuts_short_leaves_the_earlier_one_whole_and_says_so_in_one_line(
    built, tmp_path
):
    # rejected_input.jsonl was written in place: a build killed or out of disk mid-write left a
    # truncated file (its last line half a JSON record) and an OSError traceback.
    inp, out = built
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    rejected = copy / "_build" / "rejected_input.jsonl"
    before = rejected.read_bytes()
    assert len(before) > 200_000 and before.count(b"\n") == 2000
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
    args = [*_build_args(inp, copy), "--url-template", URL_TEMPLATE]
    proc = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_BUILD, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "rejected_input.jsonl: could not write" in proc.stderr.strip().splitlines()[-1]
    assert rejected.read_bytes() == before
    assert not [name for name in os.listdir(copy / "_build") if name.endswith(".tmp")]


def test_a_summary_opened_before_a_rebuild_reads_the_earlier_summary_whole(built, tmp_path):
    # summary.json was truncated and rewritten in place, so a reader (a monitoring script, the
    # user's `cat`) could see it empty or half-written while the build wrote it; replaced whole,
    # an open file stays the earlier summary and a new open gets the new one.
    inp, out = built
    held = open(out / "_build" / "summary.json")
    try:
        more = tmp_path / "more.csv"
        _rejected_only_input(more, 2001)
        assert _build(more, out) == 0
        earlier = json.loads(held.read())
    finally:
        held.close()
    assert earlier["invalid_ids"] == 2000
    assert json.loads((out / "_build" / "summary.json").read_text())["invalid_ids"] == 2001
    assert (out / "_build" / "rejected_input.jsonl").read_bytes().count(b"\n") == 2001


class _ThrottlingWithSuperscript(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(429)
        self.send_header("Retry-After", "\u00b2")  # latin-1 byte 0xB2: str.isdigit() is True
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_retry_after_of_non_ascii_digits_is_backed_off_like_a_bare_429():
    # '²'.isdigit() is True, so float('²') raised ValueError out of the fetch: the row failed as
    # "internal fetch error" after one attempt, with no retries and no cool-down for the others.
    assert parse_retry_after("\u00b2") is None
    assert parse_retry_after("\u0663") is None  # Arabic-Indic 3: float() read it as 3.0
    assert parse_retry_after(" 7 ") == 7.0
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ThrottlingWithSuperscript)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = PolitenessConfig(retries=2, backoff_base=0.2, deadline=5.0, requests_per_second=0)
        limiter, waits = RecordingLimiter(), []
        url = f"http://127.0.0.1:{server.server_address[1]}/vi/x/maxresdefault.jpg"
        response, error, attempts = fetch.fetch_with_retries(url, cfg, limiter, sleep=waits.append)
    finally:
        server.shutdown()
        server.server_close()
    assert response is None and error == "HTTP Error 429 (after 3 attempts)" and attempts == 3
    assert len(waits) == 2 and len(limiter.cool_downs) == 3
