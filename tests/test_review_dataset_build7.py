"""A terminal's Ctrl-C (SIGINT to the whole process group) during a real build against the loopback
fake host: the spawn download workers run with SIGINT blocked, so only the build's one line is
printed, and the build ends its workers on the way out.

Runtime: ~15 s on 2 busy cores (one build's start-up, spawn pool of 2 included).
"""

import os
import signal

import pytest
from build_interrupt import STOPPED_BY_CTRL_C, dataset_tools_lines, slow_build, wait_for_requests

SIGINT_BIT = 1 << (signal.SIGINT - 1)


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


@pytest.mark.slow  # its build starts in tests/build_interrupt.py
def test_terminal_ctrl_c_prints_only_the_builds_line_and_ends_the_workers(tmp_path):
    # A terminal's Ctrl-C reaches every process of the foreground group: each spawn worker raised
    # its own KeyboardInterrupt and printed "Process SpawnPoolWorker-N:" and a traceback after the
    # build's "run the same command again" line (in about one run of two).
    with slow_build(tmp_path, shard_size=2, processes=2, threads=1) as (host, proc, out):
        wait_for_requests(host, proc, 2)  # both workers are inside a download
        workers = _download_workers(proc.pid)
        assert len(workers) == 2, workers
        # Deterministic: a worker that can take SIGINT may print a traceback, a race.
        assert all(_blocked_signals(w) & SIGINT_BIT for w in workers), workers
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "SpawnPoolWorker" not in err, err
    assert dataset_tools_lines(err) == [STOPPED_BY_CTRL_C]
    assert not any(os.path.exists(f"/proc/{w}") and _state(w) != "Z" for w in workers)  # ended, not orphaned
    assert not any(name.endswith("_stats.json") for name in os.listdir(out))


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "Z"
