"""launch/local.sh when DeepSpeed's launch.py dies of a signal (kill -9, the OOM killer).

DeepSpeed's runner passes on only positive exit codes of launch.py, so it exits 0 then, and the
ranks launch.py had started train on, orphaned. local.sh now knows launch.py came up (the runner's
--save_pid file) and finds the ranks by a VUTRAIN_LAUNCH_ID in their environment: a launch.py killed
before its trainer started is not a success, and orphaned ranks are stopped (SIGTERM: they
checkpoint) instead of left running. Real runner, launch.py and trainer, one CPU rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launch_kill import endless_tiny_run_args, has_rank, kill_launch_py_once
from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"

# Both tests on one worker: the shards below are written once for the two runs.
pytestmark = pytest.mark.xdist_group("review_launch9")


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory) -> list[str]:
    """endless_tiny_run_args' arguments with its shards written once (the runs only read them); each
    run names its own output_dir, the path kill_launch_py_once finds the run's processes by."""
    args, _ = endless_tiny_run_args(tmp_path_factory.mktemp("launch9_shards"))
    return args


def launch_tiny_run(tiny_run_args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "run"
    args = [f"output_dir={out}" if arg.startswith("output_dir=") else arg for arg in tiny_run_args]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE")}
    env.update(
        NGPUS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        PYTHON=sys.executable, MASTER_PORT=str(free_port()), VUTRAIN_LEFTOVER_WAIT="60",
    )  # fmt: skip
    launch = subprocess.Popen(
        ["bash", str(LOCAL_SH), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return launch, out


def test_launch_py_killed_before_its_trainer_started_is_no_success(tiny_run_args, tmp_path):
    """launch.py killed while its rank still imports torch (no config.yaml yet): the runner exits 0;
    local.sh must stop the orphaned rank and exit 1 with one line (it exited 0, the rank trained on)."""
    launch, out = launch_tiny_run(tiny_run_args, tmp_path)
    config = out / "config.yaml"
    stderr = kill_launch_py_once(
        launch, out, lambda procs: has_rank(procs) and not config.exists(), "local.sh"
    )
    assert launch.returncode == 1, stderr
    assert "launch.py died" in stderr, stderr
    assert "Traceback" not in stderr.split("outlived its launcher")[-1], stderr


def test_ranks_of_a_killed_launch_py_are_stopped_with_a_checkpoint(tiny_run_args, tmp_path):
    """launch.py killed while its rank trains: local.sh sends the orphaned rank SIGTERM, the rank
    writes its preemption checkpoint, and local.sh exits 75 (resume with the same command); no
    process of the run is left (the rank trained on, orphaned, and local.sh exited 1)."""
    launch, out = launch_tiny_run(tiny_run_args, tmp_path)
    metrics = out / "metrics.jsonl"
    stderr = kill_launch_py_once(
        launch, out, lambda procs: metrics.exists() and metrics.stat().st_size > 0, "local.sh"
    )
    assert launch.returncode == 75, stderr
    assert "outlived its launcher" in stderr, stderr
    assert json.loads((out / "preempted.json").read_text())["step"] > 0
    assert list((out / "checkpoints").glob("step_*")), stderr
