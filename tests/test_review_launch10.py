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
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from test_review_launch9 import has_rank, processes_with
from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"
CONFIG = str(ROOT / "vutrain" / "configs" / "tiny.yaml")


def start_ds_node(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(shards), "--num-samples", "32",
         "--shard-size", "8"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\n")
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("")
    out = tmp_path / "run"
    args = [
        "--config", CONFIG, f"output_dir={out}", f"data.train_shards={shards}/train/{{00000..00003}}.tar",
        "data.val_shards=", "eval.every=0", "train.max_steps=100000", "train.checkpoint_every=0",
        "train.micro_batch_size=4", "data.num_workers=0", "train.log_every=1",
    ]  # fmt: skip
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


def kill_launch_py_once(node: subprocess.Popen, out: Path, ready: Callable[[dict[int, str]], bool]) -> str:
    """SIGKILL the run's launch.py as soon as `ready(its processes)`; ds_node.sh's stderr once it
    exits. Whatever of the run still runs then is killed (and the test fails on it)."""
    stderr = ""
    try:
        deadline = time.monotonic() + 120
        while not ready(procs := processes_with(str(out))):
            assert node.poll() is None, node.communicate()
            assert time.monotonic() < deadline, f"not ready within 120 s: {procs}"
            time.sleep(0.05)
        launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        assert len(launch_py) == 1, procs
        os.kill(launch_py[0], signal.SIGKILL)
        _, stderr = node.communicate(timeout=120)
    finally:
        if node.poll() is None:
            node.kill()
        left = processes_with(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived ds_node.sh: {left}\n{stderr}"
    return stderr


def test_ds_node_launch_py_killed_before_its_trainer_started_is_no_success(tmp_path):
    """launch.py killed while its rank still imports torch: ds_node.sh stops the orphaned rank and
    exits 1 with one line (it exited 0, so the job was COMPLETED, and the rank trained on)."""
    node, out = start_ds_node(tmp_path)
    config = out / "config.yaml"
    stderr = kill_launch_py_once(node, out, lambda procs: has_rank(procs) and not config.exists())
    assert node.returncode == 1, stderr
    assert "launch.py died" in stderr, stderr


def test_ds_node_stops_the_ranks_of_a_killed_launch_py_with_a_checkpoint(tmp_path):
    """launch.py killed while its rank trains: ds_node.sh sends the orphaned rank SIGTERM, it writes
    its preemption checkpoint, and ds_node.sh exits 75 (deepspeed.sbatch requeues; it exited 0 with
    the rank still training)."""
    node, out = start_ds_node(tmp_path)
    metrics = out / "metrics.jsonl"
    stderr = kill_launch_py_once(node, out, lambda procs: metrics.exists() and metrics.stat().st_size > 0)
    assert node.returncode == 75, stderr
    assert "outlived its launcher" in stderr, stderr
    assert json.loads((out / "preempted.json").read_text())["step"] > 0
    assert list((out / "checkpoints").glob("step_*")), stderr
