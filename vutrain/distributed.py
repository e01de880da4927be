"""Rank resolution for every launcher, in one place.

The deepspeed launcher and torchrun export RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / PORT
(the node-local count as LOCAL_SIZE and LOCAL_WORLD_SIZE respectively); `srun` exports only SLURM_*
variables (per node: SLURM_STEP_TASKS_PER_NODE at SLURM_NODEID); Open MPI's mpirun exports
OMPI_COMM_WORLD_*, MPICH's and Intel MPI's PMI_RANK / PMI_SIZE / MPI_LOCAL* (inside a SLURM job its
ranks also carry the SLURM_* of the srun step that started mpirun's per-node daemons, one task per
node: the MPI variables win there); a plain `python` run
exports nothing, and neither does the sbatch script itself for our purpose: it has SLURM_PROCID=0
and the job's SLURM_NTASKS but no SLURM_STEP_ID, and is one process. `resolve_dist_env()` reads
whichever is present and returns one validated `DistInfo`, which is passed explicitly from then
on (never stored in a mutable args object).

Device and process-group backend: each rank uses `cuda:<local rank>` when the node has that GPU,
else the CPU. On CUDA the group is device-mapped, `cpu:gloo,cuda:nccl`: tensor collectives run on
the GPU through NCCL, while object collectives and barriers keep a CPU path. Two environment
variables override the choice (e.g. to run two ranks on one GPU, which NCCL refuses):

    VUTRAIN_DEVICE=cuda:0             every rank of this node on GPU 0 (`cpu` on a GPU machine
                                      also needs DS_ACCELERATOR=cpu for DeepSpeed)
    VUTRAIN_DIST_BACKEND=cuda:gloo    any torch.distributed backend string, device-mapped or not
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import logging
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vutrain.launcher_ranks import in_srun_step, mpirun_inside_srun_step


@dataclass(frozen=True)
class DistInfo:
    """This process's place among the ranks, the rendezvous address, device and backend."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """Which environment the ranks came from: env (torchrun/deepspeed), slurm, mpi or single."""
    device: str
    """cuda:N or cpu: the device of the engine and of every tensor handed to a collective."""
    backend: str
    """torch.distributed backend: cpu:gloo,cuda:nccl on GPUs, gloo otherwise (or VUTRAIN_DIST_BACKEND)."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs and writes shared files."""
        return self.rank == 0


DEVICE_ENV = "VUTRAIN_DEVICE"
BACKEND_ENV = "VUTRAIN_DIST_BACKEND"
CUDA_BACKEND = "cpu:gloo,cuda:nccl"


def _int(name: str, env) -> int | None:
    """The integer in variable `name`, None when unset or empty. Anything else is a RuntimeError
    naming the variable (train.py prints it in one line): `int()`'s ValueError ended the run in a
    traceback that named neither the variable nor the fix (MASTER_PORT=29500:1, RANK=${RANK})."""
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"{name}={value!r} is not an integer: export a number or unset {name}") from None


def first_hostname(nodelist: str) -> str:
    """The first host of a SLURM hostlist without scontrol: "node[01-04,07],gpu3" -> "node01".

    Commas inside brackets separate ranges, not hosts; each bracket contributes its first value
    (zero padding kept, as SLURM names the hosts)."""
    depth, end = 0, len(nodelist)
    for i, char in enumerate(nodelist):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = i
            break
    host = nodelist[:end].strip()
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0], host)


def _slurm_first_host(env) -> str | None:
    # An srun step may run on a subset of the job's nodes: its own list comes first.
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    try:  # scontrol expands "node[01-04]" exactly as SLURM does
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.split()
        return out[0] if out else first_hostname(nodelist)
    except (OSError, subprocess.SubprocessError):
        return first_hostname(nodelist)


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    return True


# The resolver's answers that no retry changes; EAI_AGAIN (a DNS server slow to answer) is left to
# the rendezvous, which retries.
_NO_SUCH_HOST = {
    getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, name)
}


def _unknown_host(host: str) -> bool:
    """True when `host` is certainly no host name this node can reach: the resolver says it does
    not exist, or it is not a valid name at all."""
    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        return exc.errno in _NO_SUCH_HOST
    except UnicodeError:
        return True
    return False


def check_rendezvous_host(info: DistInfo, env=None) -> None:
    """Refuse a rendezvous host this rank cannot resolve, before the process group tries it.

    torch's store retries such a name until the group's timeout (30 minutes), on every rank, and
    then says only "timed out". The check sits here, where the address is used, and not in
    `resolve_dist_env`: a SLURM step's first node is still named there when scontrol is missing.
    A RendezvousError, which names its own fix: as a RuntimeError, train.py's line put a
    "RuntimeError:" prefix before it and a second "check MASTER_ADDR / MASTER_PORT" after it."""
    if not _unknown_host(info.master_addr):
        return
    env = os.environ if env is None else env
    if info.launcher == "slurm" and not env.get("MASTER_ADDR", "").strip():
        raise RendezvousError(
            f"the first node of this SLURM step, {info.master_addr}, is not a host name this node can "
            f"resolve and scontrol gave no NodeAddr for it: export MASTER_ADDR=<an address of "
            f"{info.master_addr}> before srun, or start the job with launch/slurm/srun.sbatch"
        )
    raise RendezvousError(
        f"MASTER_ADDR={info.master_addr} is not a host name this node can resolve: export MASTER_ADDR "
        "as an IP address or resolvable host name of the node that runs rank 0"
    )


def _slurm_node_addr(node: str) -> str | None:
    """The NodeAddr slurm.conf gives `node` (`scontrol show node`, one request to slurmctld); None
    where scontrol is missing (a container) or cannot answer."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "-o", node],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else None


def slurm_master_addr(env) -> str | None:
    """Where the ranks of an srun step without MASTER_ADDR meet: its first node, by hostname when
    that resolves, else by the NodeAddr slurm.conf gives it, as the sbatch scripts do. A NodeName
    need not be a DNS name (NodeName=n1 NodeAddr=10.0.0.1): the name alone made every rank retry
    the rendezvous until the 30-minute timeout, while `srun.sbatch` on the same nodes met at the
    NodeAddr. slurmctld is asked only when the name does not resolve, so a thousand ranks do not
    each query it on a cluster where the names work."""
    host = _slurm_first_host(env)
    if host is None or _resolves(host):
        return host
    addr = _slurm_node_addr(host)
    # Nothing better is known: `check_rendezvous_host` stops the run at init_distributed, where the
    # name is used (an expansion that raised here failed callers that only want the first node).
    if addr is None:
        if _int("SLURM_PROCID", env) == 0:
            logging.getLogger("vutrain").warning(
                "the first node of this SLURM step, %s, is not a resolvable host name and scontrol "
                "cannot say its NodeAddr: if the ranks do not meet, export MASTER_ADDR=<its address>",
                host,
            )
        return host
    if _resolves(addr):
        return addr
    raise RuntimeError(
        f"the first node of this SLURM step, {host}, is not a resolvable host name and neither is its "
        f"NodeAddr {addr}: export MASTER_ADDR=<an address of {host}> before srun, or start the job "
        "with launch/slurm/srun.sbatch"
    )


def tasks_on_node(tasks_per_node: str, node_id: int) -> int | None:
    """The task count of node `node_id` in SLURM's compressed form: "4(x2),3" is 4, 4, 3."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            return None
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts[node_id] if 0 <= node_id < len(counts) else None


# Where free_port looks: below Linux's default ephemeral range (32768-60999), where the kernel
# never hands a port to an outgoing connection or a bind to port 0.
LISTEN_PORTS = range(20000, 32768)


def ephemeral_ports() -> range:
    """The ports the kernel assigns on its own (connect, bind to 0): /proc's ip_local_port_range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default; other systems have no such file
    return range(low, high + 1)


def free_port(candidates: range = LISTEN_PORTS) -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, for a rendezvous to bind later.

    Not one the OS picks (bind to port 0): that comes from the ephemeral range, and between this
    check and the rendezvous's bind any process on the host may be handed the same port for an
    outgoing connection (gloo opens many), which fails the run with EADDRINUSE. Ports in
    `candidates` outside that range are taken only by a process that asks for them by number.
    """
    ephemeral = ephemeral_ports()
    ports = [p for p in candidates if p not in ephemeral]
    # SystemRandom: a run seeds the global generator, and two seeded processes would pick alike
    start = random.SystemRandom().randrange(len(ports)) if ports else 0
    for port in ports[start:] + ports[:start]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # every candidate is taken or ephemeral: let the OS pick
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_dist_env(env=None, local_rank_arg: int | None = None) -> DistInfo:
    """Resolve rank, world size and rendezvous address from the launcher's environment.

    A rank whose own numbers or device are wrong (RANK beyond WORLD_SIZE in a hand-written launch,
    LOCAL_RANK beyond its node, a node with fewer GPUs) raises at once, and, for this process's own
    environment (`env` None), also tells the ranks at the rendezvous from a background thread:
    they waited there for the group's whole timeout (30 minutes) for a rank that had already gone."""
    own_environment = env is None
    env = os.environ if env is None else env
    launcher, rank, world, local_rank, local_world = _launcher_ranks(env, local_rank_arg)
    addr, port = _rendezvous_address(env, launcher)
    try:
        _check_ranks(launcher, rank, world, local_rank, local_world)
        device, backend = resolve_device(local_rank, env, local_world)
    except RuntimeError as exc:
        if own_environment:
            _tell_peers_of_bad_ranks(launcher, rank, world, addr, port, str(exc))
        raise
    return DistInfo(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        launcher=launcher,
        device=device,
        backend=backend,
    )


def _launcher_ranks(env, local_rank_arg: int | None) -> tuple[str, int, int, int, int]:
    """(launcher, rank, world size, local rank, local world size) as the launcher exported them,
    not yet checked against each other."""
    if _int("WORLD_SIZE", env) is not None and _int("RANK", env) is not None:
        local_rank = _int("LOCAL_RANK", env)
        local_rank = local_rank if local_rank is not None else (local_rank_arg or 0)
        world = _int("WORLD_SIZE", env)
        # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE.
        local_world = _int("LOCAL_WORLD_SIZE", env) or _int("LOCAL_SIZE", env) or world
        return "env", _int("RANK", env), world, local_rank, local_world
    if (
        _int("SLURM_PROCID", env) is not None
        and _int("SLURM_NTASKS", env) is not None
        and in_srun_step(env)
        and not mpirun_inside_srun_step(env)
    ):
        world = _int("SLURM_NTASKS", env)
        # "4(x2),3": this node's own count (nodes of one step may hold different numbers of tasks).
        per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
        local_world = tasks_on_node(per_node, _int("SLURM_NODEID", env) or 0) or world
        return "slurm", _int("SLURM_PROCID", env), world, _int("SLURM_LOCALID", env) or 0, local_world
    if _int("OMPI_COMM_WORLD_RANK", env) is not None or _int("PMI_RANK", env) is not None:
        return ("mpi", *_mpi_ranks(env))
    if _int("SLURM_NTASKS", env) not in (None, 1) and not in_srun_step(env):
        logging.getLogger("vutrain").warning(
            "SLURM job of %s tasks but this process was not started by srun: training in this one "
            "process; start the script with `srun python ...` for one rank per task",
            env.get("SLURM_NTASKS"),
        )
    return "single", 0, 1, 0, 1


def _mpi_ranks(env) -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) of an mpirun rank."""
    if _int("OMPI_COMM_WORLD_RANK", env) is not None:  # Open MPI
        rank, world = _int("OMPI_COMM_WORLD_RANK", env), _int("OMPI_COMM_WORLD_SIZE", env)
        local_rank = _int("OMPI_COMM_WORLD_LOCAL_RANK", env) or 0
        local_world = _int("OMPI_COMM_WORLD_LOCAL_SIZE", env) or world
    else:  # MPICH, Intel MPI (Hydra)
        rank, world = _int("PMI_RANK", env), _int("PMI_SIZE", env)
        local_rank = _int("MPI_LOCALRANKID", env) or 0
        local_world = _int("MPI_LOCALNRANKS", env) or world
    if world is None:
        raise RuntimeError(
            "mpirun gave this process a rank but no world size (OMPI_COMM_WORLD_SIZE / PMI_SIZE)"
        )
    if local_world < world and not env.get("MASTER_ADDR"):
        raise RuntimeError(
            f"mpirun runs {world} ranks on several nodes but MASTER_ADDR is not set: export it as the "
            "first node's hostname (mpirun -x MASTER_ADDR=<host> with Open MPI, -genv with MPICH)"
        )
    return rank, world, local_rank, local_world


def _check_ranks(launcher: str, rank: int, world: int, local_rank: int, local_world: int) -> None:
    if launcher == "env" and world < 1:
        raise RuntimeError(
            f"WORLD_SIZE={world} is no number of ranks: export the job's rank count (1 or more)"
        )
    if not 0 <= rank < world:
        if launcher == "env":  # a hand-written launch: name the variables as the user set them
            raise RuntimeError(
                f"RANK={rank} is outside WORLD_SIZE={world} (ranks 0 to {world - 1}): give each rank "
                "its own RANK from 0 to WORLD_SIZE-1, and every rank the same WORLD_SIZE (the number "
                "of ranks of the whole job)"
            )
        raise RuntimeError(
            f"rank {rank} is outside world size {world} ({launcher} launcher): "
            "check --ntasks / --nproc_per_node against the job's task count"
        )
    if not 0 <= local_rank < local_world:
        raise RuntimeError(
            f"local rank {local_rank} is outside this node's {local_world} ranks ({launcher} launcher): "
            "check LOCAL_RANK / --local_rank against the ranks started per node"
        )


def _rendezvous_address(env, launcher: str) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT, or where this launcher's ranks meet without them."""
    # Stripped: " 10.0.0.1" from a hand-edited script is no host name, and every rank then waited
    # out the rendezvous timeout on it.
    addr = env.get("MASTER_ADDR", "").strip()
    addr = addr or (slurm_master_addr(env) if launcher == "slurm" else None) or "127.0.0.1"
    port = _int("MASTER_PORT", env)
    if port is not None and not 0 < port < 65536:
        # 0 let rank 0 listen on a port of the kernel's choosing, which no other rank could know.
        raise RuntimeError(f"MASTER_PORT={port} is not a TCP port: export a number from 1 to 65535")
    if port is None:
        job = _int("SLURM_JOB_ID", env)
        if launcher == "single":  # nobody else joins: any free port avoids clashing with other runs
            port = free_port()
        elif job is not None:
            # Derived from the job id, so two jobs sharing a node do not collide, and from the step
            # id, so two srun steps of one job running side by side do not either (step 0 gets
            # launch/common.sh's default_master_port).
            step = (_int("SLURM_STEP_ID", env) or 0) if launcher == "slurm" else 0
            # Within LISTEN_PORTS: `% 20000` reached 39999, and above 32767 (Linux's ephemeral
            # range, about a third of job ids) an outgoing connection on the node can hold the
            # port when rank 0 binds it (EADDRINUSE at the rendezvous).
            port = LISTEN_PORTS.start + (job + 1000 * step) % len(LISTEN_PORTS)
        else:
            port = 29500
    return addr, port


def _tell_peers_of_bad_ranks(
    launcher: str, rank: int, world: int, addr: str, port: int, message: str
) -> None:
    """A rank whose own numbers or device are wrong: tell the ranks at the rendezvous, from a thread
    the process waits for at exit, so the caller prints its line at once.

    A rank beyond a WORLD_SIZE of 1 belongs to a larger job all the same (its rank 0 waits for it):
    it tells as one rank of 2, which has rank 0 keep its own world size for how many ranks to wait
    for (a larger one kept rank 0 up for VUTRAIN_EARLY_FAILURE_WAIT_S, waiting for ranks that do not
    exist). A WORLD_SIZE below 1 or a negative rank is no job's place, most likely every rank's, so
    nobody is told; nor is a WORLD_SIZE of 1 with RANK 0: no other rank waits."""
    peers_world = max(world, 2)
    if world < 1 or rank < 0 or (world == 1 and rank == 0):
        return
    info = DistInfo(rank, 0, peers_world, 1, addr, port, launcher, device="cpu", backend="gloo")
    told = f"{message} (on {socket.gethostname()})"
    _tell_peers_in_background(info, told)


def _tell_peers_in_background(info: DistInfo, message: str) -> None:
    """`tell_peers_of_early_failure` from a thread that is no daemon: the process waits for it at
    exit (until the peers have the message, or VUTRAIN_EARLY_FAILURE_WAIT_S)."""
    threading.Thread(
        target=tell_peers_of_early_failure, args=(info, message), name="rendezvous-failure-verdict"
    ).start()


def resolve_device(local_rank: int, env=None, local_world_size: int = 1) -> tuple[str, str]:
    """(device, process-group backend) of this rank, after the VUTRAIN_* overrides."""
    env = os.environ if env is None else env
    device = env.get(DEVICE_ENV, "").strip()
    shared_gpu = False
    if device:
        try:
            parsed = torch.device(device)
        except RuntimeError:
            raise RuntimeError(f"{DEVICE_ENV}={device!r} is not a device; use e.g. cuda:0 or cpu") from None
        if parsed.type == "cuda" and parsed.index is None:
            device = f"cuda:{local_rank}"
        shared_gpu = parsed.type == "cuda" and parsed.index is not None and local_world_size > 1
    else:
        device = _default_device(local_rank, torch.cuda.device_count())
    backend = env.get(BACKEND_ENV, "").strip() or (CUDA_BACKEND if device.startswith("cuda") else "gloo")
    if device.startswith("cuda") and backend.startswith("cpu:") and "cuda:" not in backend:
        raise RuntimeError(
            f"{BACKEND_ENV}={backend!r} has no CUDA backend but the device is {device}: "
            "use e.g. cuda:gloo or cpu:gloo,cuda:nccl"
        )
    if device == "cpu" and _backend_for(backend, "cpu") is None:
        raise RuntimeError(
            f"{BACKEND_ENV}={backend!r} has no CPU backend but the device is cpu (no GPU is visible to "
            f"this rank): use gloo, or unset {BACKEND_ENV}"
        )
    if shared_gpu and "nccl" in backend:
        raise RuntimeError(
            f"{DEVICE_ENV}={env[DEVICE_ENV].strip()} puts all {local_world_size} ranks of this node on one "
            f"GPU, which NCCL refuses: set {BACKEND_ENV}=cuda:gloo, or {DEVICE_ENV}=cuda for a GPU per rank"
        )
    return device, backend


def _default_device(local_rank: int, gpus: int) -> str:
    """The GPU of this node-local rank; cuda:0 when the launcher shows each rank only its own
    (SLURM --gpus-per-task, CUDA_VISIBLE_DEVICES per rank); the CPU on a machine without GPUs."""
    if gpus == 0:
        return "cpu"
    if local_rank < gpus:
        return f"cuda:{local_rank}"
    if gpus == 1:
        return "cuda:0"
    raise RuntimeError(
        f"local rank {local_rank} but this process sees only {gpus} GPUs: start at most {gpus} ranks "
        f"per node, show each rank its own GPU, or set {DEVICE_ENV}=cpu"
    )


def deepspeed_env(info: DistInfo) -> dict[str, str]:
    """The launcher variables DeepSpeed reads, for this rank.

    DeepSpeed takes LOCAL_RANK for the GPU index (ZeRO-3's parameter partitioning places and
    `set_device`s by it), so on CUDA it is the index of the rank's device: with VUTRAIN_DEVICE two
    ranks may share cuda:0, where local rank 1 would name a GPU that is not there. Our own code
    keeps `info.local_rank`, the rank within the node.
    """
    device = torch.device(info.device)
    local_rank = device.index if device.type == "cuda" and device.index is not None else info.local_rank
    return {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(local_rank),
        "MASTER_ADDR": info.master_addr,
        "MASTER_PORT": str(info.master_port),
    }


GROUP_TIMEOUT_ENV = "VUTRAIN_DIST_TIMEOUT_MIN"
GROUP_TIMEOUT_MIN = 30.0


def group_timeout_minutes(env=None) -> float:
    """The process group's timeout in minutes: VUTRAIN_DIST_TIMEOUT_MIN, else 30.

    It bounds the rendezvous wait and every collective, so a rank that legitimately works alone for
    longer (a first eval reading a large val set from a slow file system) needs it raised, and a
    user debugging a start-up that never meets wants it lowered; it was fixed at 30 minutes."""
    env = os.environ if env is None else env
    value = env.get(GROUP_TIMEOUT_ENV, "").strip()
    if not value:
        return GROUP_TIMEOUT_MIN
    try:
        minutes = float(value)
    except ValueError:
        minutes = float("nan")
    if not 0 < minutes < float("inf"):
        raise RendezvousError(
            f"{GROUP_TIMEOUT_ENV}={value!r} is not a positive number of minutes: export e.g. "
            f"{GROUP_TIMEOUT_ENV}=60, or unset it for {GROUP_TIMEOUT_MIN:.0f}"
        )
    return minutes


def init_distributed(info: DistInfo, timeout_minutes: float | None = None) -> None:
    """Start the process group (always, even for one process: DeepSpeed expects one). Without
    `timeout_minutes`, the group's timeout is `group_timeout_minutes()`."""
    if not dist.is_initialized():
        try:
            check_rendezvous_host(info)
        except RuntimeError as exc:
            _serve_unreachable_host_verdict(info, str(exc))
            raise
    os.environ.update(deepspeed_env(info))
    if info.device.startswith("cuda"):
        # Before the group exists: NCCL and object collectives use the current device.
        torch.cuda.set_device(torch.device(info.device))
    store, start = None, 0
    if not dist.is_initialized():
        minutes = group_timeout_minutes() if timeout_minutes is None else timeout_minutes
        timeout = datetime.timedelta(minutes=minutes)
        with _said_once_if_still_waiting(info, timeout.total_seconds()) as notice:
            store = rendezvous_store(info, timeout)
            notice.reached_store = True
            if store is not None:
                start = agree_on_world_size(store, info, timeout.total_seconds())
    with _peers_told_of_failure(store, info):
        if not dist.is_initialized():
            dist.init_process_group(
                backend=info.backend,
                rank=info.rank,
                world_size=info.world_size,
                timeout=timeout,
                # Each start's own keys: torch names the default group's the same every time ("0"),
                # and rank 0's server, which outlives a start, still held the last start's (a peer
                # of the next one read rank 0's old gloo address, and its first barrier timed out).
                store=None if store is None else dist.PrefixStore(f"vutrain/start/{start}", store),
            )
        import deepspeed

        load_shm_op()
        deepspeed.init_distributed(dist_backend=info.backend)
        release_shm_buffer()
    refuse_shared_gpus(info)  # every rank finds the same pair: no one rank's cause to pass on


# Keys of a failure between the rendezvous and the end of init_distributed (see
# _peers_told_of_failure): the first failing rank's line, how many ranks have it, how many have left.
_START_FAILED_KEY = "vutrain/group_start/failed"
_START_DONE_KEY = "vutrain/group_start/done"
_START_LEFT_KEY = "vutrain/group_start/left"
_START_KEYS = (_START_FAILED_KEY, _START_DONE_KEY, _START_LEFT_KEY)


@contextlib.contextmanager
def _peers_told_of_failure(store, info: DistInfo):
    """Around the group's start after the rendezvous (init_process_group, DeepSpeed's shared-memory
    op and its start): a rank that fails there posts its one-line cause in the rendezvous store, and
    every other rank stops within a poll with that cause and the failing rank's number.

    Without it the others learnt nothing: a peer of a rank that failed (a `VUTRAIN_DIST_BACKEND` only
    one node sets, DeepSpeed's op failing to build on one node) waited in torch's connection to it
    until the group's timeout (30 minutes) and then said "wait timeout", or, when rank 0 failed, said
    only that the store's connection closed; inside DeepSpeed's shared-memory start it waited forever.
    Those waits are in C++ and hold the store's client, so each rank watches from a thread on its own
    connection and ends its process (as startup_errors.watch does) after printing the line. Every
    rank, the failing one included, waits (at most LINGER_S) until all have the line before it exits:
    rank 0's exit takes the store down, and another rank's exit may make its launcher end rank 0.
    Nothing is watched without our rendezvous store (one process, torchrun's agent store, a group
    that existed already)."""
    if store is None:
        yield
        return
    stop = threading.Event()
    watcher = threading.Thread(
        target=_watch_group_start, args=(store.clone(), info, stop), name="group-start-watch", daemon=True
    )
    watcher.start()
    try:
        yield
    except Exception as exc:
        stop.set()
        watcher.join()
        from vutrain.startup_errors import is_peer_failure, one_line

        try:
            if is_peer_failure(exc):  # no cause of this rank's: the failed rank may have posted its own
                store.wait([_START_FAILED_KEY], datetime.timedelta(seconds=_PEER_CAUSE_WAIT_S))
                cause = RendezvousError(store.get(_START_FAILED_KEY).decode())
            else:
                cause = None
                host = socket.gethostname()
                store.compare_set(
                    _START_FAILED_KEY,
                    "",
                    f"rank {info.rank} failed while starting it (on {host}): {one_line(exc)}",
                )
            _leave_together(store, info)
        except (dist.DistError, RuntimeError):  # the store is gone, or no cause came
            cause = None
        if cause is not None:
            raise cause from exc
        raise
    finally:
        stop.set()


def _watch_group_start(store, info: DistInfo, stop: threading.Event) -> None:
    """A thread of `_peers_told_of_failure`: once another rank posts its failure, print it as this
    rank's line and end the process (its main thread may be blocked in C++ with the failed rank)."""
    while not stop.is_set():
        try:
            failed = store.check([_START_FAILED_KEY])
            cause = store.get(_START_FAILED_KEY).decode() if failed else ""
        except (dist.DistError, RuntimeError):
            return  # the store is gone: the main thread's own error says what happened
        if cause and not stop.is_set():
            from vutrain.startup_errors import EXIT_CODE, rendezvous_message

            stopped = RendezvousError(cause)
            prefix = f"rank {info.rank}: "
            print(f"error: {prefix}{rendezvous_message(info, stopped)}", file=sys.stderr, flush=True)
            with contextlib.suppress(dist.DistError, RuntimeError):
                _leave_together(store, info)
            os._exit(EXIT_CODE)
        stop.wait(_WATCH_POLL_S)


_WATCH_POLL_S = 0.2
_PEER_CAUSE_WAIT_S = 2.0


def _leave_together(store, info: DistInfo) -> None:
    """Once this rank has its line: wait (at most LINGER_S) until every rank has, then leave, rank 0
    last (at most LINGER_S more), for its exit takes the store down and the others' last reads with
    it (torch logs each failed read with a C++ stack trace)."""
    store.add(_START_DONE_KEY, 1)
    _wait_for_count(store, _START_DONE_KEY, info.world_size, LINGER_S)
    if info.rank == 0:
        _wait_for_count(store, _START_LEFT_KEY, info.world_size - 1, LINGER_S)
    else:
        store.add(_START_LEFT_KEY, 1)  # this rank's last use of rank 0's store


def _wait_for_count(store, key: str, count: int, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while store.add(key, 0) < count and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def _serve_unreachable_host_verdict(info: DistInfo, message: str) -> None:
    """Rank 0, whose node cannot resolve MASTER_ADDR: serve `message` to the peers whose nodes can.

    They reached the port, found nothing listening and retried until the group's timeout (30
    minutes), then said only that; rank 0's cause never reached them. Rank 0's store listens on
    every address of its host, so it needs no name: its own client connects at 127.0.0.1. From a
    thread the process waits for at exit (until each peer has read the verdict, or
    VUTRAIN_EARLY_FAILURE_WAIT_S), so the caller prints rank 0's line at once."""
    if info.rank != 0 or info.world_size == 1:
        return
    here = dataclasses.replace(info, master_addr="127.0.0.1")
    _tell_peers_in_background(here, f"{message} (on rank 0's host, {socket.gethostname()})")


class RendezvousError(RuntimeError):
    """The ranks met but cannot form one group, or cannot meet at all (an unresolvable MASTER_ADDR,
    a bad group timeout); the message names the variable to fix."""


@dataclass
class _WaitingNotice:
    """What a rank other than 0 says once when the rendezvous keeps it waiting: rank 0 names the
    missing ranks at intervals, while the ranks that had arrived said nothing until rank 0's verdict
    (a user tailing rank 3's log saw nothing for the group's whole timeout, 30 minutes)."""

    info: DistInfo
    timeout_s: float
    reached_store: bool = False
    """Set once this rank holds a client of rank 0's store: it then waits for the other ranks."""

    def say(self) -> None:
        info, log = self.info, logging.getLogger("vutrain")
        where = f"{info.master_addr}:{info.master_port}"
        if not self.reached_store:
            log.warning(
                "rank %d has not reached rank 0's rendezvous store at %s in %.0f s (nothing answers "
                "there yet); it keeps trying until %.0f s (%s): check that rank 0 started and that "
                "MASTER_ADDR / MASTER_PORT name its host and port",
                info.rank,
                where,
                WAITING_FIRST_S,
                self.timeout_s,
                GROUP_TIMEOUT_ENV,
            )
            return
        log.warning(
            "rank %d reached the rendezvous at %s and has waited %.0f s for the other ranks of the %d "
            "of %s; rank 0's log names the missing ones; it gives up after %.0f s (%s)",
            info.rank,
            where,
            WAITING_FIRST_S,
            info.world_size,
            world_size_variable(info.launcher),
            self.timeout_s,
            GROUP_TIMEOUT_ENV,
        )


@contextlib.contextmanager
def _said_once_if_still_waiting(info: DistInfo, timeout_s: float):
    """A rank other than 0 still in the block after WAITING_FIRST_S says once what it waits for.

    From a timer thread that asks the store nothing: a poll per rank would load rank 0's store in
    proportion to the world size. Rank 0 reports for itself (`_wait_for_peers`)."""
    notice = _WaitingNotice(info, timeout_s)
    if info.rank == 0 or info.world_size == 1:
        yield notice
        return
    timer = threading.Timer(WAITING_FIRST_S, notice.say)
    timer.daemon = True  # a rank stopped by an error must not wait for it
    timer.start()
    try:
        yield notice
    finally:
        timer.cancel()


# Keys of the check below, in the rendezvous store beside the group's own ("default_pg/..."), which
# torch prefixes. JOINED counts the ranks that agree with rank 0; FAILED holds the first
# disagreeing rank's message; VERDICT is rank 0's answer to all: "ok" or why the group cannot start.
_WORLD_KEY = "vutrain/rendezvous/world_size"
_JOINED_KEY = "vutrain/rendezvous/joined"
_FAILED_KEY = "vutrain/rendezvous/failed"
_VERDICT_KEY = "vutrain/rendezvous/verdict"
_SEEN_KEY = "vutrain/rendezvous/seen"
_FAILED_WORLD_KEY = "vutrain/rendezvous/failed_world_size"
_ARRIVED_KEY = "vutrain/rendezvous/arrived/{rank}"  # set by each rank that agreed: rank 0 names the rest
_STARTS_KEY = "vutrain/rendezvous/starts"  # how many starts rank 0's store has seen; never cleared
_POLL_S = 0.05
_STARTED_POLL_S = 0.5  # a rank at a store without a start, waiting for one to begin
WAITING_FIRST_S = 30.0
WAITING_EVERY_S = 300.0
"""When rank 0, still waiting for ranks at the rendezvous, first says how many arrived and which
are missing, and then how often it says it again (until the group's timeout ends the wait)."""
LINGER_S = 10.0
"""How long rank 0 keeps the store up after a failed check, for ranks still starting to read why
(its exit takes the store down, and they then retried the connection until their timeout)."""


_hosted_ports: set[int] = set()  # rendezvous ports whose store this process served a check on
# (MASTER_ADDR, MASTER_PORT) of the rendezvous this process took part in as a rank other than 0.
_joined_rendezvous: set[tuple[str, int]] = set()
EARLY_FAILURE_WAIT_ENV = "VUTRAIN_EARLY_FAILURE_WAIT_S"
EARLY_FAILURE_WAIT_S = 30.0
"""How long a rank that failed before the rendezvous tries to tell the others (0: not at all). Tens
of seconds, not a few: rank 0 reaches the rendezvous only after its own config, shard-list and
model checks, which on a network file system can take that long after a peer failed at once."""
_EARLY_FAILURE = "failed before the rendezvous"


def world_size_variable(launcher: str) -> str:
    """The variable a launcher sets the world size in, for messages that say what to fix."""
    return {
        "slurm": "SLURM_NTASKS (srun --ntasks)",
        "mpi": "the MPI world size (mpirun -np)",
    }.get(launcher, "WORLD_SIZE (torchrun/deepspeed: --nnodes x --nproc_per_node, the same on every node)")


def rendezvous_store(info: DistInfo, timeout: datetime.timedelta):
    """The TCPStore torch's env:// rendezvous would make, but with rank 0 not blocking until
    WORLD_SIZE ranks have connected, so the ranks can compare their world sizes first. None (torch
    makes its own) for one process, and under torchrun's agent store, whose world size torchrun's
    own rendezvous already agreed on."""
    if info.world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return None
    if info.rank != 0:
        return _join_store(info, timeout.total_seconds())
    return dist.TCPStore(
        host_name=info.master_addr,
        port=info.master_port,
        world_size=info.world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=False,
        multi_tenant=True,  # as torch's own: a process that trains twice reuses the server
        use_libuv=os.environ.get("USE_LIBUV", "1") == "1",
    )


STORE_ANSWER_S = 60.0
"""How long a rank waits for the program listening at the rendezvous to answer as a store. Rank 0's
store answers within milliseconds (its server runs on its own thread); anything else that holds the
port (rank 0 then stopped with EADDRINUSE) accepts the connection and never answers, and torch's
client waited for that answer forever, whatever its timeout. Also how long a store that answers but
began no rendezvous of this run (another run's) is given to begin one (`_rank_0_world_size`)."""


def _join_store(info: DistInfo, timeout_s: float, answer_s: float | None = None):
    """A client of rank 0's rendezvous store: waits up to `timeout_s` for rank 0 to listen, then at
    most `answer_s` (STORE_ANSWER_S) for it to answer; RendezvousError when either does not come."""
    answer_s = STORE_ANSWER_S if answer_s is None else answer_s
    deadline = time.monotonic() + timeout_s
    # Probed with a plain socket first: torch's client logs every failed connection attempt with a
    # C++ stack trace while rank 0 is still starting.
    if not _listening(info.master_addr, info.master_port, deadline):
        raise RendezvousError(
            f"rank {info.rank} (world size {info.world_size}) found nothing listening at "
            f"{info.master_addr}:{info.master_port} within {timeout_s:.0f} s: check that rank 0 started "
            "and that MASTER_ADDR / MASTER_PORT name its host and port"
        )
    made: dict = {}

    def connect() -> None:
        try:
            made["store"] = dist.TCPStore(
                host_name=info.master_addr,
                port=info.master_port,
                world_size=info.world_size,
                is_master=False,
                timeout=datetime.timedelta(seconds=max(1.0, deadline - time.monotonic())),
                wait_for_workers=False,
                use_libuv=os.environ.get("USE_LIBUV", "1") == "1",
            )
        except BaseException as exc:  # handed to the caller's thread
            made["error"] = exc

    # A daemon thread: a client stuck on a program that never answers must not keep the process up.
    thread = threading.Thread(target=connect, name="rendezvous-connect", daemon=True)
    thread.start()
    thread.join(answer_s)
    if "error" in made:
        raise made["error"]
    if "store" not in made:
        raise RendezvousError(
            f"something at {info.master_addr}:{info.master_port} accepts connections but did not answer "
            f"as rank 0's rendezvous store within {answer_s:.0f} s: another program holds port "
            f"{info.master_port} on rank 0's host (rank 0 then stops with EADDRINUSE); set MASTER_PORT to "
            "a free port, the same on every rank"
        )
    return made["store"]


def agree_on_world_size(store, info: DistInfo, timeout_s: float) -> int:
    """Stop every rank in one line when the ranks were started with different world sizes, or when
    not all of them arrive within `timeout_s`; else return the number of this start on rank 0's
    store (1, 2, ... in a process that starts a group more than once), the same on every rank.

    Without it, ranks told different WORLD_SIZEs (a hand-written launch, --nproc_per_node that
    differs between nodes) each waited out the group's 30-minute timeout and then said only
    "DistStoreError: wait timeout", naming neither the world size nor the variable. Rank 0
    publishes its world size; every other rank compares its own with it and joins, or posts why
    not; rank 0 waits for WORLD_SIZE - 1 joins and tells every rank the verdict."""
    if info.rank == 0:
        _forget_last_start(store, info.master_port, info.world_size)
        start = store.add(_STARTS_KEY, 1)  # before the world size: a peer that reads it reads this
        store.set(_WORLD_KEY, str(info.world_size))
        with _start_closed_after(store):
            verdict = _wait_for_peers(store, info, timeout_s)
            store.set(_VERDICT_KEY, verdict)
            if verdict != "ok":
                # A rank that failed early beat the others here by its whole start-up, and a rank
                # that comes after the store is gone waits out the group's timeout.
                early = f" {_EARLY_FAILURE}: " in verdict
                linger_s = max(LINGER_S, early_failure_wait_s()) if early else LINGER_S
                _linger_until_seen(store, _largest_world_heard(store, info.world_size) - 1, linger_s)
                raise RendezvousError(verdict)
        return start
    theirs = _rank_0_world_size(store, info, timeout_s)
    start = store.add(_STARTS_KEY, 0)
    if theirs != info.world_size:
        message = (
            f"rank {info.rank} was started with world size {info.world_size} but rank 0 with {theirs}: "
            f"give every rank the same {world_size_variable(info.launcher)}"
        )
        store.compare_set(_FAILED_KEY, "", message)
        store.compare_set(_FAILED_WORLD_KEY, "", str(info.world_size))
        store.add(_SEEN_KEY, 1)
        _joined_rendezvous.add((info.master_addr, info.master_port))
        raise RendezvousError(message)
    store.set(_ARRIVED_KEY.format(rank=info.rank), "1")  # before the count: see _missing
    store.add(_JOINED_KEY, 1)
    # Rank 0 answers within its own timeout, which started before this rank could connect.
    verdict = _wait_and_get(store, _VERDICT_KEY, info, timeout_s + 10.0)
    _joined_rendezvous.add((info.master_addr, info.master_port))
    if verdict != "ok":
        store.add(_SEEN_KEY, 1)
        raise RendezvousError(f"rank 0 stopped the start-up: {verdict}")
    return start


@contextlib.contextmanager
def _start_closed_after(store):
    """Rank 0: remove the world size once this start's check is over, pass or fail.

    The store outlives the start (torch keeps rank 0's server up for the rest of the process), and
    its world size and "ok" verdict stayed: a rank of the next start in the same process (a sweep,
    a notebook, the tests) that came before rank 0 read them, took the old start for its own and
    went on alone into the group, while rank 0 waited out its timeout for it; a rank of another run
    whose rank 0 found the port taken by this one did the same, and hung. The world size is read by
    every rank before it counts itself in, so once the verdict is out nobody needs it; the verdict
    stays until the next start, the mark of a start that is over (`_rank_0_world_size`)."""
    try:
        yield
    finally:
        with contextlib.suppress(dist.DistError, RuntimeError):  # the store may be gone
            store.delete_key(_WORLD_KEY)


def _rank_0_world_size(store, info: DistInfo, timeout_s: float) -> int:
    """A rank other than 0: the world size rank 0 published for the start under way.

    Rank 0 publishes it as soon as its store listens. A store that has none is therefore not this
    run's rank 0's: another run's (its start over: a verdict and no world size) or another program's
    store, holding MASTER_PORT on rank 0's host, where this run's rank 0 stopped with EADDRINUSE.
    Such a store is given STORE_ANSWER_S to begin a start, and then this rank stops with a line that
    names the port; it waited for the group's timeout (30 minutes), or read the other run's verdict
    and hung in its group. A process that took part in a start there waits as long as the group's
    timeout lets it: its own rank 0 comes back for the next start after its own work."""
    where = (info.master_addr, info.master_port)
    if where not in _joined_rendezvous:
        wait_s = min(timeout_s, STORE_ANSWER_S)
        deadline = time.monotonic() + wait_s
        # Polled, not store.wait: a wait that times out logs two C++ warnings, and the first check
        # finds the world size at once in every start but the ones above.
        with contextlib.suppress(dist.DistError):  # the store went away: _wait_and_get says so
            while not store.check([_WORLD_KEY]):
                if time.monotonic() > deadline:
                    raise RendezvousError(_no_start_message(store, info, wait_s))
                time.sleep(_STARTED_POLL_S)
    return int(_wait_and_get(store, _WORLD_KEY, info, timeout_s))


def _no_start_message(store, info: DistInfo, wait_s: float) -> str:
    """Why a store published no world size: rank 0's verdict when this rank came after rank 0 gave
    up, else that the port is held by another run."""
    port = info.master_port
    verdict = None
    with contextlib.suppress(dist.DistError, RuntimeError):
        verdict = store.get(_VERDICT_KEY).decode() if store.check([_VERDICT_KEY]) else None
    if verdict is not None and verdict != "ok":
        return f"rank 0 stopped the start-up: {verdict}"
    over = " (its ranks had started their group already)" if verdict == "ok" else ""
    return (
        f"rank {info.rank} reached a store at {info.master_addr}:{port} that began no rendezvous of "
        f"this run within {wait_s:.0f} s{over}: another run holds port {port} on that host (this "
        "run's rank 0 then stopped with EADDRINUSE): set MASTER_PORT to a free port, the same on "
        "every rank"
    )


def _wait_for_peers(store, info: DistInfo, timeout_s: float) -> str:
    """Rank 0: "ok" once every other rank agreed, else the message that stops them all.

    While it waits it says, after WAITING_FIRST_S and then every WAITING_EVERY_S, how many ranks
    arrived and which are missing: a rank that never comes (a node that cannot resolve MASTER_ADDR,
    a job step that never started, a hostfile typo) left every rank silent for the whole group
    timeout (30 minutes), and the final line did not say which rank it was."""
    start = time.monotonic()
    deadline = start + timeout_s
    next_report = start + WAITING_FIRST_S
    arrived: set[int] = set()
    while True:
        if store.check([_FAILED_KEY]):
            return store.get(_FAILED_KEY).decode()
        joined = store.add(_JOINED_KEY, 0)
        if joined >= info.world_size - 1:
            return "ok"
        now = time.monotonic()
        if now > deadline:
            missing = _missing(store, info, joined, arrived)
            return (
                f"only {joined + 1} of the {info.world_size} ranks of {world_size_variable(info.launcher)} "
                f"reached the rendezvous at {info.master_addr}:{info.master_port} within {timeout_s:.0f} s"
                f"{f' ({missing} missing)' if missing else ''}: "
                "check that every rank started, each with the same world size"
            )
        if now >= next_report:
            _say_still_waiting(info, joined, _missing(store, info, joined, arrived), now - start, timeout_s)
            next_report = now + WAITING_EVERY_S
        time.sleep(_POLL_S)


def _say_still_waiting(info: DistInfo, joined: int, missing: str, waited_s: float, timeout_s: float) -> None:
    logging.getLogger("vutrain").warning(
        "rank 0 waiting at the rendezvous %s:%s: %d of the %d ranks of %s arrived in %.0f s%s; it gives up "
        "after %.0f s (%s): check that every rank's process started (its job step, the hostfile or node "
        "list) and that its node resolves MASTER_ADDR=%s and reaches port %s",
        info.master_addr,
        info.master_port,
        joined + 1,
        info.world_size,
        world_size_variable(info.launcher),
        waited_s,
        f" ({missing} missing)" if missing else "",
        timeout_s,
        GROUP_TIMEOUT_ENV,
        info.master_addr,
        info.master_port,
    )


def _missing(store, info: DistInfo, joined: int, arrived: set[int]) -> str:
    """The ranks that have not agreed yet, e.g. "ranks 2, 5-7", from each arrived rank's key; ""
    when the keys do not account for `joined` (a rank of a vutrain that posts none). `arrived`
    keeps the ranks found, so a later call asks only for the rest. Each rank sets its key before
    it counts itself in, and `joined` was read first: never fewer keys than joined ranks."""
    for rank in range(1, info.world_size):
        if rank not in arrived and store.check([_ARRIVED_KEY.format(rank=rank)]):
            arrived.add(rank)
    absent = [rank for rank in range(1, info.world_size) if rank not in arrived]
    if not absent or len(arrived) < joined:
        return ""
    return _rank_ranges(absent)


def _rank_ranges(ranks: list[int], most: int = 8) -> str:
    """Sorted ranks as "rank 3" or "ranks 2, 5-7", at most `most` runs of them, then the count."""
    runs: list[list[int]] = []
    for rank in ranks:
        if runs and runs[-1][1] == rank - 1:
            runs[-1][1] = rank
        else:
            runs.append([rank, rank])
    text = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    if len(runs) > most:
        text += f", ... ({len(ranks)} in all)"
    return f"rank {text}" if len(ranks) == 1 else f"ranks {text}"


def _largest_world_heard(store, own: int) -> int:
    """Rank 0's world size, or a disagreeing rank's when larger: ranks of that larger world may
    still be on their way to read the verdict."""
    if not store.check([_FAILED_WORLD_KEY]):
        return own
    return max(own, int(store.get(_FAILED_WORLD_KEY).decode()))


def _forget_last_start(store, port: int, world_size: int) -> None:
    """Clear the keys of an earlier start whose server this process reuses (multi-tenant).

    Only then: on a fresh server a rank that failed before the rendezvous may already have posted
    why (`tell_peers_of_early_failure`), and clearing that left the others waiting out the timeout."""
    if port in _hosted_ports:
        for key in (_JOINED_KEY, _FAILED_KEY, _FAILED_WORLD_KEY, _VERDICT_KEY, _SEEN_KEY, *_START_KEYS):
            store.delete_key(key)
        for rank in range(1, world_size):
            store.delete_key(_ARRIVED_KEY.format(rank=rank))
    _hosted_ports.add(port)


def _linger_until_seen(store, peers: int, linger_s: float | None = None) -> None:
    deadline = time.monotonic() + (LINGER_S if linger_s is None else linger_s)
    while store.add(_SEEN_KEY, 0) < peers and time.monotonic() < deadline:
        time.sleep(_POLL_S)


def early_failure_wait_s(env=None) -> float:
    """VUTRAIN_EARLY_FAILURE_WAIT_S in seconds, or the default when unset or not a number."""
    env = os.environ if env is None else env
    value = env.get(EARLY_FAILURE_WAIT_ENV, "").strip()
    if not value:
        return EARLY_FAILURE_WAIT_S
    try:
        return max(0.0, float(value))
    except ValueError:
        logging.getLogger("vutrain").warning(
            "%s=%r is not a number of seconds: using %.0f",
            EARLY_FAILURE_WAIT_ENV,
            value,
            EARLY_FAILURE_WAIT_S,
        )
        return EARLY_FAILURE_WAIT_S


def tell_peers_of_early_failure(info: DistInfo, message: str, wait_s: float | None = None) -> bool:
    """Best effort, for a rank that stops before the process group (a config file or shards missing
    on its node): make the ranks at the rendezvous stop within seconds with `message` and this
    rank's number, instead of waiting out the group's 30-minute timeout to say only that some ranks
    never arrived.

    Rank 0 serves the rendezvous store for up to `wait_s` (VUTRAIN_EARLY_FAILURE_WAIT_S) with
    `message` as its verdict; another rank posts it under the failure key rank 0 watches in
    `agree_on_world_size`. True when rank 0 has said it: rank 0 itself, or a rank that found rank 0
    failed on its own (it printed its line before serving), so the caller need not wait for it.
    Nothing is told for one process, under torchrun (its agent ends every worker), or when no store
    answers in time."""
    if info.world_size == 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return False
    wait_s = early_failure_wait_s() if wait_s is None else wait_s
    if wait_s <= 0:
        return False
    told = f"rank {info.rank} {_EARLY_FAILURE}: {message}"
    try:
        if info.rank == 0:
            _serve_early_verdict(info, told, wait_s)
            return True
        return _post_early_failure(info, told, wait_s)
    except (dist.DistError, OSError, RuntimeError, ValueError):  # e.g. the port taken: exit as before
        return False


def _serve_early_verdict(info: DistInfo, verdict: str, wait_s: float) -> None:
    store = rendezvous_store(info, datetime.timedelta(seconds=wait_s))
    _forget_last_start(store, info.master_port, info.world_size)
    store.set(_WORLD_KEY, str(info.world_size))
    with _start_closed_after(store):
        store.set(_VERDICT_KEY, verdict)
        _linger_until_seen(store, info.world_size - 1, wait_s)


def _post_early_failure(info: DistInfo, told: str, wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    # _join_store probes with a plain socket first: torch's client logs every failed connection
    # attempt with a C++ stack trace, which buried the rank's one-line error when rank 0 never came.
    # Its bounded wait for an answer matters here too: a port held by another program kept this
    # rank, whose own error was already printed, from ever exiting.
    store = _join_store(info, wait_s, answer_s=min(STORE_ANSWER_S, wait_s))
    store.compare_set(_FAILED_KEY, "", told)
    store.compare_set(_FAILED_WORLD_KEY, "", str(info.world_size))
    try:
        # Rank 0 answers within a poll once at the check: waiting for it keeps this rank's exit
        # (which a launcher may answer by ending every rank) from taking rank 0 down first.
        store.wait([_VERDICT_KEY], datetime.timedelta(seconds=max(0.1, deadline - time.monotonic())))
        verdict = store.get(_VERDICT_KEY).decode()
    except dist.DistError:
        return False
    finally:
        store.add(_SEEN_KEY, 1)
    return verdict.startswith(f"rank 0 {_EARLY_FAILURE}:")


def _listening(host: str, port: int, deadline: float) -> bool:
    """True once something accepts TCP connections at host:port, False at the deadline."""
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return True
        except OSError:
            if time.monotonic() > deadline:
                return False
        time.sleep(0.2)


def _wait_and_get(store, key: str, info: DistInfo, timeout_s: float) -> str:
    """A non-zero rank: `key`'s value once rank 0 sets it; a timeout is a RendezvousError that
    names the world size this rank was started with."""
    try:
        store.wait([key], datetime.timedelta(seconds=timeout_s))
        return store.get(key).decode()
    except dist.DistError as exc:
        raise RendezvousError(
            f"rank {info.rank} (world size {info.world_size}) heard nothing from rank 0 at "
            f"{info.master_addr}:{info.master_port} within {timeout_s:.0f} s ({type(exc).__name__}): "
            f"check that rank 0 started, with the same {world_size_variable(info.launcher)}"
        ) from None


def _shm_op_builder():
    """DeepSpeed's builder of its CPU all-reduce op, None where DeepSpeed's accelerator uses none
    (the same test `deepspeed.comm.torch.build_shm_op` makes)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    return builder


def load_shm_op() -> None:
    """Load DeepSpeed's CPU all-reduce op before `deepspeed.init_distributed` does, clearing a
    stale build lock first.

    DeepSpeed JIT-loads the op on every CPU start through torch's FileBaton: an O_EXCL file `lock`
    in the extension's build folder, removed by the process that made it. A process killed while
    holding it (a pre-empted job, a Ctrl-C, a rank killed at start) left the file, and every later
    start on the host waited for it forever in `FileBaton.wait`. DeepSpeed caches the loaded op per
    process, so its own load inside `init_distributed` finds it and takes no baton."""
    builder = _shm_op_builder()
    if builder is None:
        return
    from torch.utils.cpp_extension import _get_build_directory

    folder = _get_build_directory(builder.name, verbose=False)
    # flock, unlike the baton, is released by the kernel when its holder dies. Every vutrain start
    # on this host takes it around the baton, so a baton seen while holding it belongs to another
    # kind of process or to a dead one. Not held into init_distributed: DeepSpeed's start there
    # waits for the peers' shared memory, and a peer blocked here would never make it.
    try:
        flock_file = open(os.path.join(folder, "vutrain_init.flock"), "a")
    except OSError:  # a read-only folder of prebuilt ops: no build, no baton to clear
        return
    with flock_file:
        fcntl.flock(flock_file, fcntl.LOCK_EX)
        try:
            remove_stale_baton(os.path.join(folder, "lock"))
            builder.load(verbose=False)
        finally:
            fcntl.flock(flock_file, fcntl.LOCK_UN)


def remove_stale_baton(lock_path: str) -> bool:
    """Remove torch's build baton at `lock_path` when no live process holds it; True if removed.

    A FileBaton keeps its file open from creation until it removes it, so a lock that no process
    has open is a dead process's. Only this user's processes can be inspected (/proc/PID/fd), so a
    lock of another user is left alone, and so is any lock where /proc cannot say (not Linux).
    Looked at twice, 0.2 s apart: a live holder closes its file just before removing it, and in
    that instant it would look dead."""
    for attempt in range(2):
        try:
            stat = os.stat(lock_path)
        except FileNotFoundError:
            return False
        if stat.st_uid != os.getuid() or _file_open_anywhere(lock_path) is not False:
            return False
        if attempt == 0:
            time.sleep(0.2)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock_path).st_ino != stat.st_ino:  # a new baton since: someone is building
                    return False
    with contextlib.suppress(FileNotFoundError):
        os.remove(lock_path)
        logging.getLogger("vutrain").warning(
            "removed %s, a build lock left by a process that died while building DeepSpeed's CPU "
            "all-reduce op (every start on this host waited for it)",
            lock_path,
        )
        return True
    return False


def _file_open_anywhere(path: str) -> bool | None:
    """Whether any process of this user has `path` open; None where /proc cannot say."""
    if not os.path.isdir("/proc/self/fd"):
        return None
    target = os.path.realpath(path)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # another user's process, or one that just ended
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") == target:
                    return True
    return False


class SharedGPUError(RuntimeError):
    """Two ranks of an NCCL group on one GPU. Every rank finds the same pair, so one may report it."""


def gpu_uuid(device: str) -> str | None:
    """The GPU's UUID (a MIG instance has its own), None where torch does not report one."""
    uuid = getattr(torch.cuda.get_device_properties(torch.device(device)), "uuid", None)
    return str(uuid) if uuid else None


def refuse_shared_gpus(info: DistInfo, uuid_of=gpu_uuid) -> None:
    """Stop at start-up when two ranks would run NCCL on one GPU.

    A rank that sees one GPU takes cuda:0 whatever its local rank, which is right when the launcher
    shows each rank its own GPU (SLURM --gpus-per-task) and wrong when every rank sees the same one
    (torchrun --nproc_per_node 2 on a one-GPU machine). Nothing in one process tells the two apart,
    and NCCL's own answer comes at the first collective, as "Duplicate GPU detected". So the ranks
    compare their GPUs' UUIDs over the group's CPU backend, before any NCCL communicator exists.
    """
    if info.world_size == 1 or not info.device.startswith("cuda"):
        return
    if _backend_for(info.backend, "cuda") != "nccl" or _backend_for(info.backend, "cpu") is None:
        return  # gloo allows ranks to share a GPU; a plain nccl group has no CPU path to ask over
    owners: list = [None] * info.world_size
    dist.all_gather_object(owners, (socket.gethostname(), info.device, uuid_of(info.device)))
    message = shared_gpu_message(owners)
    if message:
        raise SharedGPUError(message)


def shared_gpu_message(owners: list[tuple[str, str, str | None]]) -> str | None:
    """What to say when two ranks hold one GPU; `owners[rank]` = (host, device, GPU UUID or None)."""
    first: dict[str, int] = {}
    for rank, (host, device, uuid) in enumerate(owners):
        if uuid is None:
            continue
        if uuid in first:
            other = first[uuid]
            sharing = sum(1 for owner in owners if owner[2] == uuid)
            return (
                f"ranks {other} and {rank} on {host} both run on one GPU ({owners[other][1]} and "
                f"{device}, UUID {uuid}; {sharing} ranks in all), and NCCL allows one rank per GPU: "
                f"start no more ranks per node than it has GPUs (e.g. torchrun --nproc_per_node), or "
                f"keep them on one GPU with {BACKEND_ENV}=cuda:gloo"
            )
        first[uuid] = rank
    return None


# DeepSpeed's CPU all-reduce (csrc/cpu/comm/shm.cpp) names each rank's 69 MB segment
# <prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank> and never unlinks it.
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int, env=None) -> str:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for `rank` of the group at
    MASTER_ADDR:MASTER_PORT in `env` (default: this process's environment)."""
    env = os.environ if env is None else env
    addr, port = env.get("MASTER_ADDR", ""), env.get("MASTER_PORT", "")
    name = f"{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"
    return os.path.join("/dev/shm", name)


def release_shm_buffer() -> None:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    Each leaked segment holds 69 MB of RAM until reboot (a day of CPU test runs filled 21 GB of a
    24 GB machine, which then thrashed). The mappings outlive the name, so unlinking right after
    start-up frees the memory when the ranks exit, crashed or not. The barrier matters: a peer
    still in DeepSpeed's start-up waits for our name to appear and would spin forever."""
    # The backend object lives in deepspeed.comm.comm; the package re-exports `cdb` as it was at
    # import time (None).
    import deepspeed.comm.comm as ds_comm_impl

    if getattr(ds_comm_impl.cdb, "shm_comm_op", None) is None:  # not DeepSpeed's CPU backend
        return
    barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(dist.get_rank()))


def collective_backend(device_type: str) -> str | None:
    """The backend that runs the default group's collectives on `device_type` tensors ("gloo",
    "nccl", ...), or None where none does (CPU tensors under plain nccl or `cuda:gloo`).

    Device-mapped groups ("cpu:gloo,cuda:nccl") say it per device; plain nccl serves CUDA only,
    and gloo or mpi serve both (gloo stages CUDA tensors through host memory in its collectives).
    """
    return _backend_for(str(dist.get_backend()), device_type)


def _backend_for(backend: str, device_type: str) -> str | None:
    """The backend of `backend` (a torch.distributed backend string) that serves `device_type`."""
    backend = backend.lower().strip()
    if ":" in backend:
        pairs = (part.strip().split(":", 1) for part in backend.split(","))
        return dict(pairs).get(device_type)
    if backend == "nccl":
        return backend if device_type == "cuda" else None
    return backend


def barrier() -> None:
    """Wait for every rank. A group with a CPU backend uses it; a CUDA-only group (nccl, cuda:gloo)
    is told this rank's device, rather than guessing one from the rank (and warning)."""
    if not dist.is_initialized():
        return
    if collective_backend("cpu") is not None or not torch.cuda.is_available():
        dist.barrier()
    else:
        dist.barrier(device_ids=[torch.cuda.current_device()])


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce across ranks (a no-op without a group). `tensor` must already be on the
    rank's device: with NCCL a CPU tensor fails ("No backend type associated with device type cpu")."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def cleanup() -> None:
    """Destroy the process group; through DeepSpeed when it was started, so that DeepSpeed also drops
    the groups it cached (else a second Trainer in the same process fails on a stale group)."""
    if dist.is_initialized():
        import deepspeed.comm as ds_comm

        if ds_comm.is_initialized():
            ds_comm.destroy_process_group()
        else:
            dist.destroy_process_group()
