"""A real `python -m dataset_tools build` in a subprocess of its own session, held up by the loopback
fake host (`dataset_tools/fake_host.py`) so that a test can signal it mid-download: the Ctrl-C tests
of the build. The host answers every row after 20 s; the subprocess's process group is killed on
the way out if the test left it running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

from small_builds import build_args, write_ids_csv

from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
# The one line a build stopped by SIGINT prints.
STOPPED_BY_CTRL_C = (
    "[dataset_tools] build stopped by SIGINT (Ctrl-C); run the same command again to resume "
    "(complete shards are kept)"
)


@contextmanager
def slow_build(tmp_path, rows=4, **build_kwargs):
    """Yields (host, proc, out): a build of `rows` rows (its arguments `small_builds.build_args`
    with `build_kwargs`, a 30 s deadline) started against a host that answers each after 20 s,
    its output folder `out`; stdout and stderr are pipes."""
    ids = [f"vid{i:08d}" for i in range(rows)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost({vid: "slow" for vid in ids}, slow_seconds=20, max_lifetime=120) as host:
        args = build_args(host.url_template, inp, out, "--deadline", "30", **build_kwargs)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataset_tools", *args],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        try:
            yield host, proc, out
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_for_requests(host, proc, count, seconds=90) -> None:
    """Until the host has had `count` requests: the build is inside that many downloads."""
    deadline = time.monotonic() + seconds
    while len(host.requests) < count:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never reached the host"
        time.sleep(0.05)


def dataset_tools_lines(err: str) -> list[str]:
    """The lines the build itself printed (not a library's)."""
    return [line for line in err.splitlines() if line.startswith("[dataset_tools]")]
