"""Smoke test of the benchmark harness: ``python -m kernels.bench --quick`` on CPU
(Triton interpreter) writes its JSON and PNG. Expected runtime: ~10 s."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the real sweep instead")
def test_bench_quick_writes_json_and_png(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "kernels.bench", "--quick", "--reps", "1", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "bench_kernels.json").read_text())
    assert (tmp_path / "bench_kernels.png").stat().st_size > 0
    ours = [row for row in result["rows"] if row["provider"] == "ours"]
    assert ours and all("error" not in row and row["ms"] > 0 for row in ours), ours
    assert {row["mode"] for row in ours} == {"fwd", "fwd+bwd"}
    assert result["backend"] == "triton-interpreter"
    assert result["targets"] == ["unmeasured: no GPU in this run"]  # never estimated
    assert "| provider |" in r.stdout
