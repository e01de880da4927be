"""launch/slurm/ds_node.sh (one node's DeepSpeed launcher under deepspeed.sbatch) when DeepSpeed's
launch.py dies of a signal (kill -9, the OOM killer).

The runner passes on only positive exit codes of launch.py, so it exits 0 then, and the ranks
launch.py had started train on, orphaned (re-parented, out of reach of a step teardown that follows
the process tree, e.g. proctrack/linuxproc). ds_node.sh used to exec the runner, so the job step
exited 0 (a job COMPLETED with nothing trained) and left the ranks running. Now it stops them
(SIGTERM: they checkpoint) and judges the 0. Run as srun starts it on node n1 of a one-node
hostfile, with the SLURM variables set by hand; real runner, launch.py and trainer, one CPU rank.
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
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"

# Both tests on one worker: the shards below are written once for the two runs.
pytestmark = pytest.mark.xdist_group("review_launch10")


@pytest.fixture(scope="module")
def tiny_run_args(tmp_path_factory) -> list[str]:
    """endless_tiny_run_args' arguments with its shards written once (the runs only read them); each
    run names its own output_dir, the path kill_launch_py_once finds the run's processes by."""
    args, _ = endless_tiny_run_args(tmp_path_factory.mktemp("launch10_shards"))
    return args


def start_ds_node(tiny_run_args: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    out = tmp_path / "run"
    args = [f"output_dir={out}" if arg.startswith("output_dir=") else arg for arg in tiny_run_args]
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\n")
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k != "WORLD_SIZE"}
    env.update(
        SLURMD_NODENAME="n1", SLURM_JOB_ID="7", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false", PYTHON=sys.executable, MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()), VUTRAIN_LEFTOVER_WAIT="60", PYTHONPATH=str(ROOT),
    )  # fmt: skip
    node = subprocess.Popen(
        ["bash", str(DS_NODE), str(hostfile), str(env_file), *args], env=env, cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return node, out


def test_ds_node_launch_py_killed_before_its_trainer_started_is_no_success(tiny_run_args, tmp_path):
    """launch.py killed while its rank still imports torch: ds_node.sh stops the orphaned rank and
    exits 1 with one line (it exited 0, so the job was COMPLETED, and the rank trained on)."""
    node, out = start_ds_node(tiny_run_args, tmp_path)
    config = out / "config.yaml"
    stderr = kill_launch_py_once(
        node, out, lambda procs: has_rank(procs) and not config.exists(), "ds_node.sh"
    )
    assert node.returncode == 1, stderr
    assert "launch.py died" in stderr, stderr


def test_ds_node_stops_the_ranks_of_a_killed_launch_py_with_a_checkpoint(tiny_run_args, tmp_path):
    """launch.py killed while its rank trains: ds_node.sh sends the orphaned rank SIGTERM, it writes
    its preemption checkpoint, and ds_node.sh exits 75 (deepspeed.sbatch requeues; it exited 0 with
    the rank still training)."""
    node, out = start_ds_node(tiny_run_args, tmp_path)
    metrics = out / "metrics.jsonl"
    stderr = kill_launch_py_once(
        node, out, lambda procs: metrics.exists() and metrics.stat().st_size > 0, "ds_node.sh"
    )
    assert node.returncode == 75, stderr
    assert "outlived its launcher" in stderr, stderr
    assert json.loads((out / "preempted.json").read_text())["step"] > 0
    assert list((out / "checkpoints").glob("step_*")), stderr
