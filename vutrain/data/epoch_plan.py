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


def auto_num_workers(
    num_shards: int,
    world_size: int,
    local_world_size: int,
    resampled: bool,
    cores: int | None = None,
    machine_cores: int | None = None,
) -> int:
    """Loader workers per rank for ``data.num_workers=-1``: one per core of this rank's share,
    less one core for the training process itself, between 1 and ``MAX_AUTO_WORKERS``.

    A rank's share is the usable cores divided by the ranks on the node, unless the affinity
    mask already is a per-task share (fewer cores than the machine has, as under SLURM). Without
    ``resampled`` a rank's shards are split among its workers, so there are at most
    ``num_shards // world_size`` of them.
    """
    cores = usable_cores() if cores is None else cores
    machine_cores = (os.cpu_count() or cores) if machine_cores is None else machine_cores
    if cores >= machine_cores:
        cores //= max(1, local_world_size)
    workers = max(1, min(cores - 1, MAX_AUTO_WORKERS))
    if not resampled:
        workers = max(1, min(workers, num_shards // max(1, world_size)))
    return workers
