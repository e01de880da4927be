"""`launch/gpu_bench.sh`, the one script a GPU session gets to run, dry-run on CPU at tiny sizes.

GPU time comes in one short lease: a command line of the script that no longer matches its
benchmark (a renamed option, an unknown `--search` label) would waste it. This runs every step's
real command (the default options, with the CPU sizes appended: later options win) and checks
that each step exits 0 and writes what the GPU session reads back.
"""

import json
import os
import subprocess

import pytest

import train_runner as tr

pytestmark = pytest.mark.slow


def test_gpu_bench_dry_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    env = dict(
        tr.env(),
        GPU_SETUP=os.devnull,  # the GPU host's wheel installer has nothing to do here
        OUT=str(out),
        PYTHON=tr.sys.executable,
        COMPARE_EXTRA="--preset tiny --precision fp32 --batch-sizes 4 --steps 1 --warmup 1 --pool 8 "
        "--max-batch 8 --zero-stages 2",
        KERNELS_ARGS="--quick",
        DATA_EXTRA="--batch-size 16 --batches 2 --decode-images 16 --decode-seconds 0.2 --rounds 1",
    )
    proc = subprocess.run(
        ["bash", os.path.join(tr.REPO, "launch", "gpu_bench.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tr.REPO,
    )
    assert proc.returncode == 0, tr.describe(proc)
    steps = [line.split() for line in (out / "summary.txt").read_text().splitlines()]
    assert [(s[0], s[1]) for s in steps] == [
        ("setup", "0"),
        ("tests", "0"),
        ("compare", "0"),
        ("kernels", "0"),
        ("data", "0"),
    ], tr.describe(proc)
    assert "skipped" in (out / "tests.log").read_text()  # the GPU tests ran, and skipped on CPU
    compare = json.loads((out / "compare_open_clip.json").read_text())
    searched = [e["variant"] for e in compare["largest"]]
    assert searched == ["open_clip", "vutrain z2 torch", "vutrain z2 triton ckpt"]  # the script's --search
    assert (out / "compare_open_clip.png").is_file()
    assert any(name.endswith(".json") for name in os.listdir(out / "kernels"))
    for workers in (1, 8):
        summary = json.loads((out / f"data_w{workers}.log").read_text().strip().splitlines()[-1])
        assert summary["workers"] == workers and summary["samples_per_s_per_worker"] > 0
