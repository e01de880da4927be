"""Review helper 8 of the training benchmarks: what a run stopped by a time limit or finished
leaves behind (temporary shards, a configuration's process still training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(tmp: Path, prefix: str) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(prefix))


def test_compare_removes_its_synthetic_shards(tmp_path, monkeypatch):
    """`--compare open_clip` wrote its synthetic shards and run folder to a `vutrain-compare-*`
    folder in the temporary directory and never removed it: every run left 256 or more images
    behind. The run now removes it, and its report (JSON with both sides' rows) is still written."""
    from vutrain import bench_compare

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    out = tmp_path / "compare.json"
    argv = "--compare open_clip --preset tiny --precision fp32 --batch-sizes 4 --zero-stages 1"
    argv += f" --loss-backends torch --grad-ckpt off --steps 1 --warmup 0 --pool 4 --max-batch 0 --out {out}"
    assert bench_compare.main(argv.split()) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["vutrain z1 torch", "open_clip"]
    assert all("error" not in r for r in rows), rows
    assert leftovers(tmp, "vutrain-compare-") == []


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads child processes from /proc")
def test_train_bench_stopped_by_sigterm_kills_its_configuration_and_cleans_up(tmp_path):
    """SIGTERM (a `timeout` or SLURM time limit) killed `python -m vutrain.bench` at once: the
    running configuration's process trained on, orphaned, and the synthetic shards stayed in the
    temporary directory. Now the sweep ends the configuration's process, removes its folder,
    keeps the finished configurations' rows in --out and exits 143 like the comparison."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "bench.json"
    env = dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vutrain.bench", "--batch-sizes", "2,2", "--steps", "1", "--warmup", "0"]
    cmd += ["--workers", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child = None
    try:
        for line in proc.stdout:  # the first configuration's row: the second one's process starts
            if line.startswith("| tiny"):
                break
        deadline = time.monotonic() + 60
        while child is None and time.monotonic() < deadline:
            child = next(iter(_children(proc.pid)), None)
            time.sleep(0.05)
        assert child is not None, "the second configuration's process never started"
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert not _alive(child), "the configuration's process outlived the sweep"
        assert leftovers(tmp, "vutrain-bench-") == []
        rows = json.loads(out.read_text())
        assert len(rows) == 1 and "error" not in rows[0], rows
        assert "stopped by SIGTERM" in rest
    finally:
        for pid in (proc.pid, child):
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
