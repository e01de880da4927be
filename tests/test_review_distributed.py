"""The rendezvous address, port and local rank as the trainer reads them, checked before the
process group starts: each case below waited out the 30-minute rendezvous timeout, or failed deep
inside torch, before its fix."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vutrain.distributed import DistInfo, init_distributed, resolve_dist_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"VUTRAIN_DEVICE": "cpu"}
# RFC 6761: names under .invalid never resolve, on any resolver.
NODES = "n1.invalid,n2.invalid"


def _srun_rank(rank: int) -> dict[str, str]:
    """The variables a direct `srun -N2 -n2 python ...` gives one task (no MASTER_ADDR)."""
    return {
        **CPU,
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(rank),
        "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
        "SLURM_JOB_NODELIST": NODES,
        "SLURM_STEP_NODELIST": NODES,
    }


def test_direct_srun_to_an_unresolvable_first_node_stops_at_once_in_one_line(synthetic_shards, tmp_path):
    """Without scontrol (a container) the first node's name was used with a warning, and every
    rank retried it until the 30-minute timeout; the expansion itself still names the node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD"))}
    env.update(_srun_rank(1), PATH="/nonexistent", PYTHONPATH=REPO)
    argv = [
        sys.executable,
        os.path.join(REPO, "vutrain", "train.py"),
        "--config",
        "tiny",
        f"output_dir={tmp_path / 'run'}",
        f"data.train_shards={synthetic_shards['train_shards']}",
        f"data.val_shards={synthetic_shards['val_shards']}",
    ]
    try:
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the rank kept retrying the unresolvable rendezvous host")
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("[transformers]")]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert "n1.invalid" in lines[0] and "export MASTER_ADDR" in lines[0], lines


def test_unresolvable_master_addr_is_refused_before_the_process_group(monkeypatch):
    """The check belongs to the rendezvous: resolve_dist_env still names the step's first node."""
    monkeypatch.setenv("PATH", "/nonexistent")
    # Rank 0 of 2 would serve its cause to the peers for 30 s from a thread (none come here).
    monkeypatch.setenv("VUTRAIN_EARLY_FAILURE_WAIT_S", "0")
    info = resolve_dist_env(_srun_rank(0))
    assert info.master_addr == "n1.invalid"
    with pytest.raises(RuntimeError, match=r"n1\.invalid.*export MASTER_ADDR"):
        init_distributed(info, timeout_minutes=1)
    given = DistInfo(0, 0, 1, 1, "head.invalid", 29500, "env", "cpu", "gloo")
    with pytest.raises(RuntimeError, match=r"MASTER_ADDR=head\.invalid is not a host name"):
        init_distributed(given, timeout_minutes=1)


def test_master_addr_with_stray_whitespace_is_the_address():
    """ " 127.0.0.1" from a hand-edited script was passed on as is and never resolved."""
    env = {**CPU, "RANK": "0", "WORLD_SIZE": " 1", "MASTER_ADDR": " 127.0.0.1 ", "MASTER_PORT": "29555"}
    assert resolve_dist_env(env).master_addr == "127.0.0.1"
    blank = dict(env, MASTER_ADDR="  ")
    assert resolve_dist_env(blank).master_addr == "127.0.0.1"


@pytest.mark.parametrize("port", ["0", "65536", "-1"])
def test_master_port_outside_the_tcp_range_is_one_line(port):
    """0 had rank 0 listen on a port of the kernel's choosing that no other rank could know; 65536
    failed inside torch's store."""
    env = {**CPU, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    with pytest.raises(RuntimeError, match=f"MASTER_PORT={port} is not a TCP port"):
        resolve_dist_env(env)


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_RANK": "-1", "LOCAL_WORLD_SIZE": "2"},
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "2"},
        {
            "SLURM_PROCID": "1",
            "SLURM_NTASKS": "2",
            "SLURM_STEP_ID": "0",
            "SLURM_LOCALID": "1",
            "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
            "SLURM_NODEID": "1",
            "MASTER_ADDR": "127.0.0.1",
        },
    ],
    ids=["negative", "beyond-node-torchrun", "beyond-node-srun"],
)
def test_local_rank_outside_the_node_is_one_line(env):
    """A negative local rank became the device cuda:-1; one beyond the node's count picked another
    rank's GPU or a device that does not exist."""
    with pytest.raises(RuntimeError, match="outside this node's 2 ranks|outside this node's 1 ranks"):
        resolve_dist_env({**CPU, **env})
