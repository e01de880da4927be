"""Launching on the loopback SLURM cluster (nodes n1 and n2, NodeAddr 127.0.0.1, names that no DNS
knows): a direct `srun python ...` without MASTER_ADDR meets at the first node's NodeAddr, and the
sbatch scripts with VUTRAIN_ROOT set run the trainer in the submit directory, where the user's
relative paths point.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from worker_ports import free_port

from vutrain.distributed import resolve_dist_env

from slurm_cluster import REPO, running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except OSError:
        return False
    return True


# Each task of the step meets the others through resolve_dist_env's address, as train.py does.
MEET_PROBE = """
import datetime, os, sys, torch, torch.distributed as dist
from vutrain.distributed import resolve_dist_env
i = resolve_dist_env()
dist.init_process_group("gloo", rank=i.rank, world_size=i.world_size, timeout=datetime.timedelta(seconds=20),
                        init_method=f"tcp://{i.master_addr}:{i.master_port}")
t = torch.tensor([i.rank + 1]); dist.all_reduce(t)
print("MET", i.rank, i.master_addr, int(t), flush=True)
dist.barrier()
os._exit(0)
"""


def test_direct_srun_without_master_addr_meets_at_the_first_nodes_node_addr(cluster, tmp_path):
    """`srun -N2 -n2 python ...` with MASTER_ADDR unset: the ranks met at "n1", a NodeName that does
    not resolve here, and retried the rendezvous until its timeout (30 minutes in train.py), while
    srun.sbatch on the same nodes met at n1's NodeAddr. Now both take the NodeAddr."""
    assert not resolves("n1"), "this test needs a node name without a DNS entry"
    script = tmp_path / "meet.sh"
    script.write_text(f'#!/bin/bash\nsrun -N2 -n2 {sys.executable} -c "$PROBE"\n')
    log = tmp_path / "meet.log"
    job = cluster.sbatch(
        "-N2", "-n2", "-o", str(log), str(script),
        PROBE=MEET_PROBE, MASTER_ADDR="", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    info = cluster.wait_job(job, timeout=120)
    text = log.read_text(errors="replace") if log.exists() else "<no log>"
    met = sorted(line.split()[1:] for line in text.splitlines() if line.startswith("MET "))
    assert met == [["0", "127.0.0.1", "3"], ["1", "127.0.0.1", "3"]], text[-3000:]
    assert info["JobState"] == "COMPLETED", text[-3000:]


def test_a_node_addr_that_does_not_resolve_is_one_line(cluster, monkeypatch, capsys):
    """Neither the first node's name nor its NodeAddr resolves: one line that says to export
    MASTER_ADDR, at once (the rendezvous retried for 30 minutes, printing gai errors), also from
    train.py, which prints it without a traceback."""
    cluster.run("scontrol", "update", "NodeName=n2", "NodeAddr=no-such-node.invalid")
    try:
        monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
        monkeypatch.setenv("PATH", os.environ["PATH"] + ":/usr/sbin")
        env = {
            "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "n2", "SLURM_STEP_TASKS_PER_NODE": "2", "VUTRAIN_DEVICE": "cpu",
        }  # fmt: skip
        with pytest.raises(RuntimeError) as err:
            resolve_dist_env(env)
        message = str(err.value)
        assert "n2" in message and "no-such-node.invalid" in message, message
        assert "export MASTER_ADDR=" in message and "\n" not in message, message
        proc = subprocess.run(
            [sys.executable, "vutrain/train.py", "--config", "tiny"],
            env={**cluster.env(**env), "MASTER_ADDR": ""},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr[-3000:]
    finally:
        cluster.run("scontrol", "update", "NodeName=n2", "NodeAddr=127.0.0.1")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(out), "--num-samples", "32",
         "--shard-size", "16"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    return out


def submit_from(cluster, submit_dir: Path, script: str, sbatch_args: list[str], args: list[str]) -> tuple:
    """sbatch a launch script by its absolute path from `submit_dir`, VUTRAIN_ROOT naming the
    checkout, as launch/cluster.env.example sets it; returns (job state, log text)."""
    log = submit_dir / f"{script}.log"
    env = cluster.env(
        VUTRAIN_ROOT=str(REPO), PYTHON=sys.executable, MASTER_PORT=str(free_port()),
        VUTRAIN_LAUNCH_DIR=str(submit_dir / "launch" / "%j"), OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false", NO_ALBUMENTATIONS_UPDATE="1",
    )  # fmt: skip
    cmd = [
        "sbatch",
        "--parsable",
        "-o",
        str(log),
        *sbatch_args,
        str(REPO / "launch" / "slurm" / script),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, cwd=submit_dir, capture_output=True, text=True, check=True)
    info = cluster.wait_job(int(proc.stdout.strip().split(";")[0]), timeout=180)
    return info["JobState"], log.read_text(errors="replace") if log.exists() else "<no log>"


def run_args(shards: Path) -> list[str]:
    return [
        "--config", "my_run.yaml", "output_dir=runs/x",
        f"data.train_shards={shards}/train/{{00000..00001}}.tar",
        "data.val_shards=", "eval.every=0", "train.max_steps=1", "train.micro_batch_size=4",
        "train.checkpoint_every=0", "data.num_workers=0", "train.progress_bar=false",
    ]  # fmt: skip


def test_srun_sbatch_with_vutrain_root_runs_in_the_submit_directory(cluster, shards, tmp_path):
    """Submitted from an experiment directory with VUTRAIN_ROOT set: `--config my_run.yaml` was
    "config file not found" (looked up in the checkout), and a relative output_dir wrote to the
    checkout's runs/x, which every experiment directory using that name shared (and resumed from).
    Now both mean the submit directory, as sbatch's own -o does and local.sh already did."""
    shutil.copy(REPO / "vutrain" / "configs" / "tiny.yaml", tmp_path / "my_run.yaml")
    state, text = submit_from(cluster, tmp_path, "srun.sbatch", ["-N1", "-n1"], run_args(shards))
    assert state == "COMPLETED", text[-4000:]
    assert json.loads((tmp_path / "runs" / "x" / "done.json").read_text())["step"] == 1
    assert f"in {tmp_path}" in text, text[-4000:]


def test_deepspeed_sbatch_with_vutrain_root_runs_in_the_submit_directory(cluster, shards, tmp_path):
    """The same through deepspeed.sbatch and ds_node.sh, on both nodes: the trainer finds the
    submit directory's my_run.yaml and stops on the bad override (which ends the job in seconds)."""
    shutil.copy(REPO / "vutrain" / "configs" / "tiny.yaml", tmp_path / "my_run.yaml")
    args = [*run_args(shards), "train.no_such_key=1"]
    state, text = submit_from(cluster, tmp_path, "deepspeed.sbatch", ["-N2"], args)
    assert state == "FAILED", text[-4000:]
    assert "config file not found" not in text, text[-4000:]
    assert text.count("train.no_such_key") >= 2, text[-4000:]  # rank 0 and node n2's first rank
