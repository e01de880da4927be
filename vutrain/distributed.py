"""Rank resolution for every launcher, in one place.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / PORT;
`srun` exports only SLURM_* variables; mpirun exports OMPI_COMM_WORLD_*; a plain `python` run
exports nothing. `resolve_dist_env()` reads whichever is present and returns one validated
`DistInfo`, which is passed explicitly from then on (never stored in a mutable args object).
"""
from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """Which environment the ranks came from: env (torchrun/deepspeed), slurm, mpi or single."""
    device: str
    """cuda:N or cpu."""
    backend: str
    """nccl on GPUs, gloo otherwise."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int(name: str, env) -> int | None:
    value = env.get(name)
    return int(value) if value not in (None, "") else None


def _slurm_first_host(env) -> str | None:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:  # scontrol expands "node[01-04]" exactly as SLURM does
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        return out[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0].split("[")[0]


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_dist_env(env=None, local_rank_arg: int | None = None) -> DistInfo:
    """Resolve rank, world size and rendezvous address from the launcher's environment."""
    env = os.environ if env is None else env
    if _int("WORLD_SIZE", env) is not None and _int("RANK", env) is not None:
        launcher = "env"
        rank, world = _int("RANK", env), _int("WORLD_SIZE", env)
        local_rank = _int("LOCAL_RANK", env)
        local_rank = local_rank if local_rank is not None else (local_rank_arg or 0)
        local_world = _int("LOCAL_WORLD_SIZE", env) or world
    elif _int("SLURM_PROCID", env) is not None and _int("SLURM_NTASKS", env) is not None:
        launcher = "slurm"
        rank, world = _int("SLURM_PROCID", env), _int("SLURM_NTASKS", env)
        local_rank = _int("SLURM_LOCALID", env) or 0
        # SLURM_TASKS_PER_NODE looks like "4(x2)" or "3,2": the first count is this layout's local size.
        first = env.get("SLURM_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
        local_world = int(first) if first.isdigit() else world
    elif _int("OMPI_COMM_WORLD_RANK", env) is not None:
        launcher = "mpi"
        rank, world = _int("OMPI_COMM_WORLD_RANK", env), _int("OMPI_COMM_WORLD_SIZE", env)
        local_rank = _int("OMPI_COMM_WORLD_LOCAL_RANK", env) or 0
        local_world = _int("OMPI_COMM_WORLD_LOCAL_SIZE", env) or world
    else:
        launcher, rank, world, local_rank, local_world = "single", 0, 1, 0, 1
    if not 0 <= rank < world:
        raise RuntimeError(f"rank {rank} is outside world size {world} ({launcher} launcher): "
                           "check --ntasks / --nproc_per_node against the job's task count")
    addr = env.get("MASTER_ADDR") or (_slurm_first_host(env) if launcher == "slurm" else None) or "127.0.0.1"
    port = _int("MASTER_PORT", env)
    if port is None:
        job = _int("SLURM_JOB_ID", env)
        # A port derived from the job id lets two jobs share a node without colliding.
        if job is not None:
            port = 20000 + job % 20000
        elif launcher == "single":  # nobody else joins: any free port avoids clashing with other runs
            port = free_port()
        else:
            port = 29500
    n_gpus = torch.cuda.device_count()
    use_cuda = n_gpus > 0 and local_rank < n_gpus
    device = f"cuda:{local_rank}" if use_cuda else "cpu"
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
                    master_addr=addr, master_port=port, launcher=launcher, device=device,
                    backend="nccl" if use_cuda else "gloo")


def init_distributed(info: DistInfo, timeout_minutes: int = 30) -> None:
    """Start the process group (always, even for one process: DeepSpeed expects one)."""
    for key, value in {"RANK": info.rank, "WORLD_SIZE": info.world_size, "LOCAL_RANK": info.local_rank,
                       "MASTER_ADDR": info.master_addr, "MASTER_PORT": info.master_port}.items():
        os.environ[key] = str(value)  # DeepSpeed's own init reads these
    if info.device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=info.backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    import deepspeed
    deepspeed.init_distributed(dist_backend=info.backend)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group; through DeepSpeed when it was started, so that DeepSpeed also drops
    the groups it cached (else a second Trainer in the same process fails on a stale group)."""
    if dist.is_initialized():
        import deepspeed.comm as ds_comm
        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
