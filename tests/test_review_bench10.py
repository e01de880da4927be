"""Review 10 of the benchmarks: the comparison's tokenizer trained once per configuration, and the
rows of a `python -m vutrain.bench` sweep stopped by SIGTERM that read as a finished sweep's.

Real processes: `python -m vutrain.bench --compare open_clip` on the tiny preset, and a real sweep
stopped by a real SIGTERM once its first configuration's row is written."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import train_runner as tr

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="needs open_clip_torch")
def test_compare_configurations_reuse_the_first_tokenizer(tmp_path):
    """Each vutrain configuration's Trainer (train.resume=never) trained the preset tokenizer again
    and moved the previous one aside, once per configuration after the first."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4"]
    argv += ["--zero-stages", "0,1", "--loss-backends", "torch", "--grad-ckpt", "off", "--steps", "1"]
    argv += ["--warmup", "0", "--pool", "4", "--max-batch", "0", "--out", str(out)]
    proc = tr.run_module("vutrain.bench", argv)
    assert proc.returncode == 0, tr.describe(proc)
    assert "tokenizer aside" not in proc.stdout + proc.stderr, tr.describe(proc)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["vutrain z0 torch", "open_clip", "vutrain z1 torch"]
    assert all("error" not in r for r in rows), rows


@pytest.mark.slow
def test_sweep_stopped_by_sigterm_marks_its_rows(tmp_path):
    """The rows a sweep wrote before SIGTERM carried no mark: the JSON and the table read as a
    finished sweep's. Now they say partial, stopped by SIGTERM after k of n configurations, and a
    finished sweep's rows say partial false."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "vutrain.bench", "--batch-sizes", "2,2", "--steps", "1", "--warmup", "0"]
    cmd += ["--workers", "0", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # the first configuration's row: it is in --out now
            if line.startswith("| tiny"):
                break
        deadline = time.monotonic() + 30
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        written = json.loads(out.read_text())
        assert [r["partial"] for r in written] == [True]  # a SIGKILL from here on leaves the mark
        proc.send_signal(signal.SIGTERM)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["partial"] is True
    assert rows[0]["stopped_by"] == "SIGTERM after 1 of 2 configurations"
    assert "partial: stopped by SIGTERM after 1 of 2 configurations" in rest, rest
