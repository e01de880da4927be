"""The benchmark CLIs refuse names the Trainer's config does not accept before anything is written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    os.makedirs(env["TMPDIR"], exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "vutrain.bench", *args, "--out", str(tmp_path / "out" / "b.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--precision", "fp17"], "--precision"),
        (["--loss-backend", "trition"], "--loss-backend"),
        (["--precision", "fp16"], "train.precision=fp16 needs a CUDA GPU"),
    ],
)
def test_train_bench_refuses_a_setting_the_config_refuses_before_writing(tmp_path, flags, named):
    """Exit 2 with one usage line naming the setting, no traceback, no shards in the temporary
    folder and no --out file: each configuration's process failed on it after the shards were
    written, and the sweep exited 1 with a row of that error per configuration."""
    if "fp16" in flags:
        import torch

        if torch.cuda.is_available():
            pytest.skip("fp16 runs on a GPU")
    proc = _bench(tmp_path, *flags, "--steps", "1", "--warmup", "0", "--batch-sizes", "4")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not [n for n in os.listdir(tmp_path / "tmp") if n.startswith("vutrain-")]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--preset", "vit-x"], "--preset vit-x: choose one of tiny"),
        (["--compile-mode", "fast"], "--compile-mode fast: choose one of"),
        (["--max-batch", "64", "--search", "vutrain-nope"], "--search names unknown configurations"),
    ],
)
def test_compare_refuses_unknown_names_before_writing(tmp_path, flags, named):
    """Exit 2 with one line naming the flag, before open_clip's import and the shards: an unknown
    --preset was a KeyError traceback after them, an unknown compile mode a failed row each (an
    unknown --loss-backends entry stays a failed row beside the others: test_bench_compare.py)."""
    argv = ["--compare", "open_clip", "--zero-stages", "2", "--grad-ckpt", "off", "--steps", "1"]
    proc = _bench(tmp_path, *argv, "--max-batch", "0", *flags)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert named in proc.stderr and "Traceback" not in proc.stderr
    assert not [n for n in os.listdir(tmp_path / "tmp") if n.startswith("vutrain-")]
    assert not (tmp_path / "out").exists()
