"""A terminal's Ctrl-C (SIGINT to the whole process group) during a real build against the loopback
fake host: the spawn download workers run with SIGINT blocked, so only the build's one line is
printed, and the build ends its workers on the way out.

Runtime: ~15 s on 2 busy cores (one build's start-up, spawn pool of 2 included).
"""

import os
import signal
import subprocess
import sys
import time

from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")
SIGINT_BIT = 1 << (signal.SIGINT - 1)


def _build_command(inp, out, url_template):
    return [
        sys.executable, "-m", "dataset_tools", "build", "--input", str(inp), "--output", str(out),
        "--url-template", url_template, "--variants", "mqdefault", "--shard-size", "2",
        "--processes", "2", "--threads", "1", "--requests-per-second", "0", "--deadline", "30",
    ]  # fmt: skip


def _download_workers(pid: int) -> list[int]:
    """The spawn pool workers among ``pid``'s children (not the resource tracker)."""
    children = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            children += [int(c) for c in f.read().split()]
    workers = []
    for child in children:
        try:
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    workers.append(child)
        except FileNotFoundError:
            pass
    return workers


def _blocked_signals(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        line = next(line for line in f if line.startswith("SigBlk:"))
    return int(line.split()[1], 16)


def _wait_for_two_requests(host, proc, seconds=90):
    deadline = time.monotonic() + seconds
    while len(host.requests) < 2:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the build never reached the host"
        time.sleep(0.05)


def test_terminal_ctrl_c_prints_only_the_builds_line_and_ends_the_workers(tmp_path):
    # A terminal's Ctrl-C reaches every process of the foreground group: each spawn worker raised
    # its own KeyboardInterrupt and printed "Process SpawnPoolWorker-N:" and a traceback after the
    # build's "run the same command again" line (in about one run of two).
    ids = [f"vid{i:08d}" for i in range(4)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    inp.write_text("video_id,title\n" + "".join(f"{vid},title {vid}\n" for vid in ids))
    with FakeThumbnailHost({vid: "slow" for vid in ids}, slow_seconds=20, max_lifetime=120) as host:
        proc = subprocess.Popen(
            _build_command(inp, out, host.url_template),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group, as a shell gives a foreground job
        )
        try:
            _wait_for_two_requests(host, proc)  # both workers are inside a download
            workers = _download_workers(proc.pid)
            assert len(workers) == 2, workers
            # Deterministic: a worker that can take SIGINT may print a traceback, a race.
            assert all(_blocked_signals(w) & SIGINT_BIT for w in workers), workers
            os.killpg(proc.pid, signal.SIGINT)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "SpawnPoolWorker" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("[dataset_tools]")]
    assert ours == [
        "[dataset_tools] build stopped by SIGINT (Ctrl-C); run the same command again to resume "
        "(complete shards are kept)"
    ]
    assert not any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers)  # ended, not orphaned
    assert not any(name.endswith("_stats.json") for name in os.listdir(out))


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"
