"""A DeepSpeed hostfile that gives a node more slots than the GPUs it has.

deepspeed.sbatch given HOSTFILE with slots=4 on nodes of 2 GPUs started every node's launcher, and
each ds_node.sh then refused it as "SLURM gave GPUs CUDA_VISIBLE_DEVICES=0,1 but the deepspeed
launcher would use 0,1,2,3. Request whole nodes (sbatch --exclusive)": the job had whole nodes, and
the slot count was the thing to change. Now deepspeed.sbatch refuses it before srun, and ds_node.sh
names the slots and the GPUs. Fewer slots than GPUs is still taken.

ds_node.sh runs directly (it needs no SLURM daemon); deepspeed.sbatch runs on the loopback cluster
(tests/slurm_cluster.py) with test_review_launch6's stand-in launcher, which records its arguments.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from test_review_launch6 import DEEPSPEED, log_text, stand_in_python, submit
from worker_ports import free_port

from slurm_cluster import REPO, running_cluster

DS_NODE = REPO / "launch" / "slurm" / "ds_node.sh"
CONFIG = "vutrain/configs/tiny.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def run_ds_node(tmp_path: Path, slots: int, visible: str) -> subprocess.CompletedProcess:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(f"n1 slots={slots}\n")
    env_file = tmp_path / "env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        SLURMD_NODENAME="n1",
        CUDA_VISIBLE_DEVICES=visible,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHON=str(stand_in_python(tmp_path)),
        ARGV_FILE=str(tmp_path / "argv"),
    )
    args = [str(hostfile), str(env_file), "--config", CONFIG, f"output_dir={tmp_path / 'run'}"]
    return subprocess.run(
        ["bash", str(DS_NODE), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_ds_node_names_slots_beyond_the_nodes_gpus(tmp_path):
    proc = run_ds_node(tmp_path, 4, "0,1")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "gives it slots=4 but SLURM gave it 2 GPUs (CUDA_VISIBLE_DEVICES=0,1)" in proc.stderr, proc.stderr
    assert "set slots=2" in proc.stderr and "whole nodes" not in proc.stderr, proc.stderr
    assert not (tmp_path / "argv").exists()


def test_ds_node_still_takes_fewer_slots_than_gpus_and_refuses_a_shared_node(tmp_path):
    proc = run_ds_node(tmp_path, 2, "0,1")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "argv").exists()
    # GPUs 2,3 of a node shared with another job: still the shared-node refusal.
    (tmp_path / "argv").unlink()
    proc = run_ds_node(tmp_path, 2, "2,3")
    assert proc.returncode == 2 and "Request whole nodes" in proc.stderr, proc.stderr
    assert not (tmp_path / "argv").exists()


@pytest.mark.slurm
def test_deepspeed_sbatch_refuses_a_hostfile_with_more_slots_than_gpus(cluster, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=4\n")
    job, log = submit(
        cluster, tmp_path, DEEPSPEED, ["--config", CONFIG, f"output_dir={tmp_path / 'run'}"],
        HOSTFILE=str(hostfile), CUDA_VISIBLE_DEVICES="0,1",
    )  # fmt: skip
    info = cluster.wait_job(job, timeout=120)
    text = log_text(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert text.strip().splitlines() == [
        f"[vutrain-launch] ERROR: HOSTFILE={hostfile} gives each node slots=4 but 2 GPUs are visible on the "
        'first node: set slots=2 (launch/make_hostfile.sh -s 2 "$SLURM_JOB_NODELIST"), or submit with '
        "--gpus-per-node=4."
    ], text
    assert not (tmp_path / "argv").exists()
