"""Review of `python -m vutrain.bench --compare open_clip`: a SIGTERM during the largest-batch
searches (launch/gpu_bench.sh's time limit)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import train_runner as tr


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip_torch is not installed")
def test_sigterm_mid_search_keeps_the_search_and_the_ones_it_never_reached(tmp_path):
    """The search the signal cut and those after it were dropped from `largest`: the report showed
    no trace of them, and on a GPU the largest-batch target was judged on the finished searches
    alone (a FAIL where the checkpointed search, last, would have passed)."""
    out = tmp_path / "compare.json"
    argv = ["--compare", "open_clip", "--preset", "tiny", "--precision", "fp32", "--batch-sizes", "4"]
    argv += ["--zero-stages", "2", "--loss-backends", "torch", "--grad-ckpt", "both", "--steps", "1"]
    argv += ["--warmup", "1", "--pool", "16", "--max-batch", "4096"]
    argv += ["--search", "vutrain z2 torch,vutrain z2 torch ckpt", "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vutrain.bench", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=tr.env(),
        cwd=tr.REPO,
    )
    try:
        for line in proc.stdout:  # the first probe of the first search done: the signal cuts the next
            if "vutrain z2 torch: batch 8 fits" in line:
                break
        proc.terminate()
        rest = proc.stdout.read()
        assert proc.wait(timeout=300) == 128 + 15, rest[-3000:]
    finally:
        proc.kill()
    largest = json.loads(out.read_text())["largest"]
    assert [e["variant"] for e in largest] == ["vutrain z2 torch", "vutrain z2 torch ckpt"], largest
    cut, never = largest
    assert cut["stopped"] and cut["stopped_by"] == "SIGTERM" and not cut["capped"]
    assert cut["probes"][0] == [8, True] and cut["largest_batch"] >= 8
    assert cut["largest_batch"] == max(b for b, ok in cut["probes"] if ok)
    assert never["skipped"] == "stopped by SIGTERM" and "largest_batch" not in never
    assert "(search stopped at SIGTERM)" in rest and "skipped: stopped by SIGTERM" in rest
