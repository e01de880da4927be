"""The deterministic plan of a training stream: which worker reads which shards, in which order.

Everything here is a pure function of (seed, epoch, rank, worker), never of wall-clock or
process state, so a resumed stream can recompute exactly where the interrupted one was.

Batch ownership: a rank's batches are numbered ``g = 0, 1, 2, ...`` across epochs; epoch
``g // steps_per_epoch``. With ``W`` loader workers, batch ``g`` is built by logical worker
``g % W``, matching the strict round-robin in which ``torch.utils.data.DataLoader`` reads an
iterable data set's workers (so every worker knows, without talking to the others, how many
batches it owes in each epoch).
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def first_batch_of_worker(g0: int, worker: int, num_workers: int) -> int:
    """Smallest batch index ``g >= g0`` built by ``worker`` (``g % num_workers == worker``)."""
    return g0 + (worker - g0) % num_workers


def worker_shards(
    shards: list[str],
    epoch: int,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    seed: int,
    shard_shuffle: bool,
) -> list[str]:
    """The shards that ``worker`` of ``rank`` reads in ``epoch`` (non-resampled mode).

    All ranks shuffle the full list with the same (seed, epoch) RNG, then take every
    ``world_size``-th shard starting at ``rank`` and, of those, every ``num_workers``-th starting
    at ``worker`` (open_clip's detshuffle -> split_by_node -> split_by_worker).
    """
    order = list(shards)
    if shard_shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order[rank::world_size][worker::num_workers]


def fallback_shards(
    shards: list[str], epoch: int, rank: int, world_size: int, seed: int, shard_shuffle: bool
) -> list[list[str]]:
    """What a worker reads, in turn, when its own split of ``epoch`` holds no readable sample
    (empty shards, e.g. img2dataset's when every download failed, or shards damaged at the start):
    its rank's shards, then every shard. Deterministic, so a resume replays it."""
    return [
        worker_shards(shards, epoch, rank, world_size, 0, 1, seed, shard_shuffle),
        worker_shards(shards, epoch, 0, 1, 0, 1, seed, shard_shuffle),
    ]


def shuffle_buffer(samples: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Reservoir-style shuffle (like ``webdataset.shuffle``), drained at the end of the input.

    Its output order is a function of the input order and ``rng`` only, so replaying the input
    replays the output, which is how a resumed stream fast-forwards without decoding.
    """
    if size <= 1:
        yield from samples
        return
    buf: list[T] = []
    for item in samples:
        buf.append(item)
        if len(buf) >= size:
            yield _pop_random(buf, rng)
    while buf:
        yield _pop_random(buf, rng)


def _pop_random(buf: list[T], rng: random.Random) -> T:
    i = rng.randrange(len(buf))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


MAX_AUTO_WORKERS = 16
"""Ceiling of the automatic worker count (each worker holds a shuffle buffer and a Python heap)."""


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a SLURM task's own share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def cpu_quota_cores(
    proc_cgroup: str = "/proc/self/cgroup", cgroup_root: str = "/sys/fs/cgroup"
) -> int | None:
    """Whole CPUs of time the CPU limits of this process's cgroup and its ancestors allow, the
    smallest of them; None without such a limit. cgroup v2 (``cpu.max``) and cgroup v1 (the
    ``cpu`` controller's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``: Docker on a cgroup v1
    host, older Kubernetes nodes).

    A container's CPU limit (Kubernetes, ``docker --cpus``) is a time quota, not an affinity
    mask: the mask still shows every core of the machine while the quota allows a few of them.
    """
    try:
        with open(proc_cgroup) as f:
            entries = [line.rstrip("\n").split(":", 2) for line in f]
    except OSError:
        return None
    limits: list[int | None] = []
    for entry in entries:
        if len(entry) != 3:
            continue
        hierarchy, controllers, path = entry
        if hierarchy == "0" and controllers == "":  # the v2 unified hierarchy
            limits += _limits_along(cgroup_root, path, _cpu_max)
        elif "cpu" in controllers.split(","):  # a v1 hierarchy holding the cpu controller
            mount = _v1_mount(cgroup_root, controllers)
            limits += _limits_along(mount, path, _cfs_quota) if mount else []
    limits = [n for n in limits if n is not None]
    return min(limits) if limits else None


def _v1_mount(cgroup_root: str, controllers: str) -> str | None:
    """Where the v1 hierarchy of ``controllers`` ("cpu,cpuacct") is mounted: its own folder, or the
    ``cpu`` folder (systemd mounts "cpu,cpuacct" and links "cpu" to it; others mount "cpu" alone)."""
    for name in (controllers, "cpu"):
        if os.path.isdir(os.path.join(cgroup_root, name)):
            return os.path.join(cgroup_root, name)
    return None


def _limits_along(mount: str, path: str, read_limit) -> list[int | None]:
    """``read_limit(folder)`` of the cgroup ``path`` under ``mount`` and of each ancestor up to
    ``mount``. A folder that is not there reads as None: a container's mount is its own cgroup
    while /proc/self/cgroup names the host's path (Docker on cgroup v1), so the walk reaches the
    container's limit at the mount itself."""
    folder, limits = os.path.join(mount, path.lstrip("/")), []
    while True:
        limits.append(read_limit(folder))
        if os.path.normpath(folder) == os.path.normpath(mount):
            return limits
        folder = os.path.dirname(os.path.normpath(folder))


def _cpu_max(folder: str) -> int | None:
    """Whole CPUs (at least one) of a v2 ``cpu.max`` file ("QUOTA PERIOD" or "max PERIOD"); None
    when unlimited or unreadable."""
    try:
        with open(os.path.join(folder, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def _cfs_quota(folder: str) -> int | None:
    """Whole CPUs (at least one) of a v1 ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us``; None when
    unlimited (a quota of -1) or unreadable."""
    try:
        with open(os.path.join(folder, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(folder, "cpu.cfs_period_us")) as f:
            period = int(f.read())
    except (OSError, ValueError):
        return None
    return None if quota < 0 or period <= 0 else max(1, quota // period)


def ranks_sharing_cores(cores: int, machine_cores: int, local_world_size: int) -> int:
    """How many of this node's ranks share this rank's ``cores`` (its affinity mask), at least.

    Masks that together hold more cores than the machine has must overlap: ``local_world_size``
    masks of ``cores`` each on ``machine_cores`` are shared by ``ceil(local_world_size * cores /
    machine_cores)`` ranks on average. The whole machine: every rank (torchrun on a node);
    per-task shares (SLURM's binding): one; a NUMA node (torchrun --numa-binding) or a part of
    the node held by one launcher: the ranks on it.
    """
    local_world_size = max(1, local_world_size)
    return min(local_world_size, max(1, -(-local_world_size * cores // max(1, machine_cores))))


def auto_num_workers(
    num_shards: int,
    world_size: int,
    local_world_size: int,
    resampled: bool,
    cores: int | None = None,
    machine_cores: int | None = None,
    quota_cores: int | None = None,
) -> int:
    """Loader workers per rank for ``data.num_workers=-1``: one per core of this rank's share,
    less one core for the training process itself, between 1 and ``MAX_AUTO_WORKERS``.

    A rank's share is its usable cores divided by the ranks that share them
    (``ranks_sharing_cores``), and at most its part of a cgroup CPU limit (``cpu_quota_cores``,
    read with the cores when ``cores`` is not given), which holds every rank of the node. Without
    ``resampled`` a rank's shards are split among its workers, so there are at most
    ``num_shards // world_size`` of them.
    """
    if cores is None:
        cores = usable_cores()
        quota_cores = cpu_quota_cores() if quota_cores is None else quota_cores
    machine_cores = (os.cpu_count() or cores) if machine_cores is None else machine_cores
    # Until 2026-12-07 a mask smaller than the machine counted as this rank's own: 8 ranks of one
    # launcher held to 32 of 64 cores ran 16 workers each, 128 on 32 cores.
    share = cores // ranks_sharing_cores(cores, machine_cores, local_world_size)
    if quota_cores is not None:
        share = min(share, quota_cores // max(1, local_world_size))
    workers = max(1, min(share - 1, MAX_AUTO_WORKERS))
    if not resampled:
        workers = max(1, min(workers, num_shards // max(1, world_size)))
    return workers
