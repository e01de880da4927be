"""Continue an epoch on a different world size (or micro batch): what is left and who reads it.

A ``TrainStream`` state is per rank and per worker (see webdataset.py). To resume it on another
number of ranks, the states of *all* old ranks (gathered at save time) are turned into a
world-size-independent fact: the multiset ``C`` of samples (shard URL, key) already drawn in
the current epoch ``e`` (a multiset: a spec may list a shard twice, ``a.tar::b.tar::a.tar``, to
upsample it, and each copy is its own draw). Each old worker drew the first ``drawn`` samples of
its deterministic per-epoch sequence, so ``C`` is recomputed by replaying those sequences over
the shards' tar headers only (local tars: no payload byte is read; remote ones are read through).

The remainder of epoch ``e`` is then every sample of every listed shard, less ``C`` (with
multiplicity), taken in epoch ``e``'s shard order and tar order (``R``). Its batches are dealt
to the new ranks: with ``n = min(|R|, samples the old world still owed in e) // (B' * W')``
remaining batches per rank, rank ``r`` reads ``R[r*n*B' : (r+1)*n*B']`` and, inside it, each
DataLoader worker a contiguous slice sized by the batches it builds; each worker shuffles its
slice with a shuffle buffer.
The new stream numbers those ``n`` batches as the last ``n`` of epoch ``e`` at the new world
size, so later epochs follow the normal plan.

Guarantee (the consumed-samples set of epoch e): every sample (copy) of ``R`` that fits into the
remaining ``n * B' * W'`` is drawn exactly once after the resume, no sample of ``C`` is drawn
again in epoch ``e``, and the at most ``B' * W' - 1`` samples of ``R`` beyond that are dropped
(the same end-of-epoch rule as an uninterrupted epoch). Samples that fail to decode are skipped
and counted; a worker whose slice runs dry because of them reads its slice again (the normal
stream's rule). The order after the resume differs from the uninterrupted run's.

The stream state after such a resume carries the remainder's description (its epoch, first
batch and the old ranks' states), so a later resume on the same world size is again bit-exact,
and a second change of world size within the same epoch recurses through it.
"""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from .epoch_plan import fallback_shards, shuffle_buffer, worker_shards
from .samples import iter_raw_samples, iter_samples_with_end

log = logging.getLogger(__name__)

SampleId = tuple[str, str]
"""(shard URL, sample key): a sample's identity within a run's shard list."""

SAMPLE_LOG_ENV = "VUTRAIN_SAMPLE_LOG"
"""Test hook: when set to a path, each rank appends the keys of the batches it hands out there."""

# Plan fields that may differ between the saved and the resumed stream; all others must match.
RESHAPEABLE = ("rank", "world_size", "workers", "batch_size", "steps_per_epoch")


class StreamStateError(ValueError):
    """A saved data position this stream cannot continue; one line that says what to do."""


class ShardKeys:
    """Keys of each shard in tar order, read once from the tar headers (payloads are skipped), with
    what the reader counts while reading them (``tar_error``, ``ignored_member``)."""

    def __init__(self):
        self._cache: dict[str, tuple[list[str], dict[str, Counter], Counter]] = {}

    def __call__(self, url: str) -> list[str]:
        """The keys of the shard at ``url``, in tar order (read once, then cached)."""
        return self._read(url)[0]

    def counts(self, url: str) -> tuple[dict[str, Counter], Counter]:
        """What a reader of ``url`` counts: by sample key, as it reads that sample (before handing
        it out), and at the shard's end (after its last sample: the damage that dropped a sample)."""
        return self._read(url)[1:]

    def _read(self, url: str) -> tuple[list[str], dict[str, Counter], Counter]:
        if url not in self._cache:
            self._cache[url] = _read_shard(url)
        return self._cache[url]


def _read_keys(url: str) -> list[str]:
    """The keys of the shard at ``url`` in tar order, as the training workers read them."""
    return _read_shard(url)[0]


def _read_shard(url: str) -> tuple[list[str], dict[str, Counter], Counter]:
    # The workers' own reader without the payloads (a local tar: its headers only), so a damaged
    # shard gives the same keys (and counts) as the workers drew from it, and the replays match.
    keys, by_key, pending = [], {}, []
    for sample in iter_raw_samples(url, pending.append, payloads=False):
        keys.append(sample["__key__"])
        by_key.setdefault(sample["__key__"], Counter(pending))
        pending.clear()
    return keys, by_key, Counter(pending)


class _Reads:
    """What a replayed reader read: samples taken into its shuffle buffer, shard ends passed."""

    def __init__(self):
        self.samples: Counter = Counter()
        self.ends: Counter = Counter()

    def shards(self, urls: list[str], keys: ShardKeys) -> Iterator[SampleId]:
        """The samples of ``urls`` in order, recorded as they are read (lazily, as a worker reads:
        a shard's end is passed as its last sample is read, samples.iter_samples_end_first)."""
        for url in urls:
            names = keys(url)
            for key in names:
                self.samples[(url, key)] += 1
                if key == names[-1]:
                    self.ends[url] += 1
                yield url, key
            if not names:
                self.ends[url] += 1

    def slice(
        self, ids: list[SampleId], keys: ShardKeys, counted: list[bool] | None = None
    ) -> Iterator[SampleId]:
        """The samples ``ids`` in order, recorded as ``_read_in_order`` reads them: it passes a
        shard's end as it reads the shard's last sample, or after a run when the next id is a
        sample the read has passed (the next copy of an upsampled shard). The end that comes with
        a last sample ``counted`` marks is not recorded: that reader leaves it uncounted."""
        positions: dict[str, dict[str, int]] = {}  # each shard's keys by tar position, built once
        for i, (url, key) in enumerate(ids):
            self.samples[(url, key)] += 1
            last = key == keys(url)[-1]
            if last and not (counted and counted[i]):
                self.ends[url] += 1
            yield url, key
            if url not in positions:
                positions[url] = {k: j for j, k in reversed(list(enumerate(keys(url))))}
            at, following = positions[url], ids[i + 1] if i + 1 < len(ids) else None
            passed = following and following[0] == url and at.get(following[1], -1) in range(at[key] + 1)
            if passed and not last:
                self.ends[url] += 1


def _worker_sequence(
    shards: list[str], plan: dict, epoch: int, worker: int, keys: ShardKeys, reads: _Reads | None = None
) -> Iterator[SampleId]:
    """The (url, key) sequence one old worker drew from in ``epoch`` (webdataset._epoch_samples)."""
    tag = f"{plan['seed']}/{epoch}/{plan['rank']}/{worker}"
    mine = worker_shards(
        shards,
        epoch,
        plan["rank"],
        plan["world_size"],
        worker,
        plan["workers"],
        plan["seed"],
        plan["shard_shuffle"],
    )
    wider = fallback_shards(
        shards, epoch, plan["rank"], plan["world_size"], plan["seed"], plan["shard_shuffle"]
    )
    reads = reads or _Reads()
    for repeat in range(1_000_000):
        if not any(keys(url) for url in mine):  # an empty split: the worker read wider shard lists
            reads.ends.update(mine)  # (webdataset._epoch_samples), past each shard's end
            if not wider:
                return
            mine = wider.pop(0)
            continue
        rng = random.Random(f"samples/{tag}/{repeat}")
        yield from shuffle_buffer(reads.shards(mine, keys), plan["shuffle_buffer"], rng)


def consumed_in_epoch(states: list[dict], shards: list[str], epoch: int, keys: ShardKeys) -> Counter:
    """Samples drawn in ``epoch`` by the ranks whose stream states are ``states`` (one per rank),
    each with the number of times it was drawn (a shard listed twice is drawn twice per epoch)."""
    consumed: Counter = Counter()
    left = None  # the rest of the epoch that this world continued, if it did (see below)
    for state in states:
        plan = state["plan"]
        remainder = state.get("remainder")
        in_remainder = remainder is not None and remainder["epoch"] == epoch
        if in_remainder:  # this world itself continued the epoch of an earlier one
            if left is None:  # whose draws every rank of this world carries: counted once (per
                # rank, a copy of an upsampled shard not yet drawn was taken for drawn, and left out)
                before = consumed_in_epoch(remainder["before"], shards, epoch, keys)
                consumed.update(before)
                left = left_in_epoch(shards, plan, epoch, before, keys)
            slices = _slices(left, epoch, int(remainder["first_batch"]), plan)
        for worker, info in state["workers"].items():
            if int(info["epoch"]) != epoch or not info["drawn"]:
                continue
            worker = int(worker)
            if in_remainder:
                sequence = _slice_sequence(slices.get(worker, []), plan, epoch, worker)
            else:
                sequence = _worker_sequence(shards, plan, epoch, worker, keys)
            consumed.update(sample for _, sample in zip(range(int(info["drawn"])), sequence))
    return consumed


def left_in_epoch(
    shards: list[str], plan: dict, epoch: int, consumed: Counter, keys: ShardKeys
) -> list[SampleId]:
    """The samples of ``epoch`` not in ``consumed``, in the epoch's shard order and tar order.

    Subtracted with multiplicity: of a shard listed twice, a sample drawn once stays once. (A
    set lost both copies, so an upsampled source shrank the rest of the epoch.)
    """
    owed = Counter(consumed)
    left = []
    for url in _epoch_order(shards, plan, epoch):
        for key in keys(url):
            if owed[(url, key)] > 0:
                owed[(url, key)] -= 1
            else:
                left.append((url, key))
    return left


@dataclass(frozen=True)
class Remainder:
    """The rest of epoch ``epoch``, served as batches ``first_batch ..`` of the epoch's end."""

    epoch: int
    first_batch: int
    before: list  # the stream states of the ranks that drew the epoch's first part

    def to_state(self) -> dict:
        """JSON form kept in the stream state."""
        return {"epoch": self.epoch, "first_batch": self.first_batch, "before": self.before}

    @classmethod
    def from_state(cls, state: dict) -> Remainder:
        """Inverse of ``to_state``."""
        return cls(int(state["epoch"]), int(state["first_batch"]), list(state["before"]))


def check_compatible(saved_plan: dict, plan: dict) -> None:
    """ValueError naming the data settings that differ beyond what a reshape can absorb."""
    diff = {
        k: (saved_plan.get(k), v) for k, v in plan.items() if k not in RESHAPEABLE and saved_plan.get(k) != v
    }
    if diff:
        changes = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise StreamStateError(
            f"the data stream state was saved with different data settings ({changes}); "
            "resume with the same data.* settings and seed, or start afresh with train.resume=never "
            "(or another output_dir)."
        )


def _epoch_size_range(plan: dict) -> range:
    """The ``data.num_samples`` values that give ``plan`` its steps per epoch (the plan keeps only
    ``num_samples // (batch_size * world_size)``)."""
    global_batch = plan["batch_size"] * plan["world_size"]
    return range(plan["steps_per_epoch"] * global_batch, (plan["steps_per_epoch"] + 1) * global_batch)


def check_same_epoch_size(saved_plan: dict, plan: dict) -> None:
    """StreamStateError when no single ``data.num_samples`` gives both plans their steps per epoch.

    ``steps_per_epoch`` is reshapeable (a new world or micro batch changes it), so comparing it
    cannot tell a changed ``data.num_samples``: over one, the epoch's remainder was numbered from
    the new epoch's end, before its start when the new epoch is shorter (a negative batch index
    and epoch -2 on, where a same-world resume refuses the change).
    """
    saved, now = _epoch_size_range(saved_plan), _epoch_size_range(plan)
    if saved.start < now.stop and now.start < saved.stop:
        return
    raise StreamStateError(
        f"the data stream state was saved with another data.num_samples (an epoch of "
        f"{saved.start}..{saved.stop - 1} samples then, {now.start}..{now.stop - 1} now); resume with the "
        "saved data.num_samples, or start afresh with train.resume=never (or another output_dir)."
    )


def reshape_state(states: list[dict], plan: dict, shards: list[str], keys: ShardKeys | None = None) -> dict:
    """This rank's stream state under ``plan`` from the states of all old ranks (``states``).

    Args:
        states: ``TrainStream.state_dict()`` of every old rank, in rank order.
        plan: the new stream's plan (``asdict(_Plan)``): its rank, world size, workers, batch.
        shards: the expanded shard list (the same for old and new streams).
        keys: the shards' keys, read once (pass the same to ``plan_remainder`` afterwards).
    Returns:
        A state for ``TrainStream.load_state_dict``: the same state when nothing reshapeable
        changed (bit-exact resume), else one that serves the epoch's remainder first.
    """
    old = states[0]["plan"]
    check_compatible(old, plan)
    check_same_epoch_size(old, plan)
    if (
        all(states[r]["plan"] == dict(plan, rank=r) for r in range(len(states)))
        and len(states) == plan["world_size"]
    ):
        return states[plan["rank"]]
    next_batch = int(states[0]["next_batch"])
    spe_old, spe = old["steps_per_epoch"], plan["steps_per_epoch"]
    epoch, done = divmod(next_batch, spe_old)
    state = {"version": states[0]["version"], "plan": dict(plan), "workers": {}}
    if plan["rank"] == 0:  # the old ranks' skip counts, once: the run's total stays the run's
        skipped = skipped_so_far(states)
        if skipped:
            state["skipped_before"] = skipped
    if old["resampled"] or done == 0:
        # Resampled streams draw with replacement (no consumed set to honour); at an epoch
        # boundary nothing of the epoch was drawn: either way continue at the same share of it.
        state["next_batch"] = epoch * spe + (done * spe) // spe_old
        if old["resampled"] and done:
            state["resample_salt"] = resample_salt(epoch, states)
        return state
    owed = (spe_old - done) * old["batch_size"] * old["world_size"]
    keys = keys or ShardKeys()
    consumed = consumed_in_epoch(states, shards, epoch, keys)
    left = len(left_in_epoch(shards, plan, epoch, consumed, keys))
    steps = min(left, owed) // (plan["batch_size"] * plan["world_size"])
    first = (epoch + 1) * spe - steps
    log.info(
        "epoch %d continues on %d ranks: %d samples drawn before, %d left, %d batches per rank",
        epoch,
        plan["world_size"],
        consumed.total(),
        left,
        steps,
    )
    state["next_batch"] = first
    state["remainder"] = Remainder(epoch, first, [dict(s) for s in states]).to_state()
    if plan["rank"] == 0:  # applied when the epoch's remainder is over (TrainStream.skipped)
        recount = reader_recount(states, shards, plan, epoch, first, consumed, keys)
        if recount:
            state["recount"] = {"epoch": epoch, "counts": recount}
    return state


def with_recount(skipped: dict[str, int], recount: dict | None) -> dict[str, int]:
    """``skipped`` with a reshape's ``reader_recount`` correction (``{"epoch", "counts"}``) applied."""
    if not recount:
        return dict(skipped)
    total = Counter(skipped)
    total.update(recount["counts"])  # update() adds negative corrections too
    return {k: n for k, n in total.items() if n > 0}


def reader_recount(
    states: list[dict],
    shards: list[str],
    plan: dict,
    epoch: int,
    first: int,
    consumed: Counter,
    keys: ShardKeys,
) -> dict[str, int]:
    """What the skip counts carried from the old ranks still need by reason once ``epoch`` is over
    (negative: counted twice), so that its reader counts (``ignored_member``, ``tar_error``) hold
    each damaged shard's end once per read of its last sample, as an uninterrupted epoch counts them.

    A sample's own counts need nothing: a new worker does not count again the samples the old
    readers had read ahead (``counted_ahead``), so those are right at every step. The ends are what
    is left: a shard's damage is counted with its last sample (samples.iter_samples_end_first), and
    the old readers may have passed ends that no one reads again, or left some to no one. Replayed
    over the tar headers, as ``consumed_in_epoch`` does; the new ranks are taken to read their whole
    remainder slices (``_read_in_order``). A second change of world size within the epoch corrects
    what the first one took the interrupted world to read.
    """
    owed = _ends_owed(states, shards, plan, epoch, first, consumed, keys)
    ends = _ends_counted(states, shards, epoch, keys)
    recount: Counter = Counter()
    for url, n in owed.items():
        for reason, c in keys.counts(url)[1].items():
            recount[reason] += (n - ends[url]) * c
    return {k: n for k, n in recount.items() if n}


def _ends_owed(
    states: list[dict],
    shards: list[str],
    plan: dict,
    epoch: int,
    first: int,
    consumed: Counter,
    keys: ShardKeys,
) -> Counter:
    """For each damaged shard: the reads of its last sample in ``epoch`` (each counts its end once)
    by the world of ``states``, those before it and the world of ``plan`` reading its remainder
    slices whole, less the ends that ``plan``'s world counts as it does so."""
    ahead = counted_ahead(states, shards, epoch, keys)
    left = left_in_epoch(shards, plan, epoch, consumed, keys)
    reads, counted_ends = _full_reads(left, epoch, first, plan, keys, _counted_mask(left, ahead))
    owed: Counter = Counter()
    for url in dict.fromkeys(shards):
        names = keys(url)
        if names and keys.counts(url)[1]:  # a shard without samples: its readers passed its end alike
            last = (url, names[-1])
            owed[url] = consumed[last] + max(ahead[last], reads[last]) - counted_ends[url]
    return owed


def _world_reads(states: list[dict], shards: list[str], epoch: int, keys: ShardKeys) -> tuple[Counter, ...]:
    """(drawn, read ahead: read but not drawn, shard ends passed) of the workers of ``states`` in
    ``epoch``, replayed (``consumed_in_epoch``'s sequences, recording what their readers read)."""
    drawn, ahead, ends = Counter(), Counter(), Counter()
    for state in states:
        plan, remainder = state["plan"], state.get("remainder")
        in_remainder = remainder is not None and int(remainder["epoch"]) == epoch
        slices, counted = (
            plan_remainder(Remainder.from_state(remainder), shards, plan, keys) if in_remainder else ({}, {})
        )
        for worker, info in state["workers"].items():
            if int(info["epoch"]) != epoch or not info["drawn"]:
                continue
            worker, reads = int(worker), _Reads()
            if in_remainder:
                ids, mask = slices.get(worker, []), counted.get(worker)
                sequence = _slice_sequence(ids, plan, epoch, worker, reads, keys, mask)
            else:
                sequence = _worker_sequence(shards, plan, epoch, worker, keys, reads)
            mine = Counter(sample for _, sample in zip(range(int(info["drawn"])), sequence))
            drawn.update(mine)
            ahead.update(reads.samples - mine)
            ends.update(reads.ends)
    return drawn, ahead, ends


def counted_ahead(states: list[dict], shards: list[str], epoch: int, keys: ShardKeys) -> Counter:
    """Samples of ``epoch`` that the readers of ``states`` (or of a world before it in the epoch) read
    into their shuffle buffers, and counted, but that no one drew: the next world reads them again.

    Up to ``shuffle_buffer - 1`` a worker. Counted again by the new ranks, they had raised the logged
    ``train/ignored_members`` and ``tar_error`` counts until the epoch's end (38 ignored members of
    24), where a correction took them back; the new workers now leave them uncounted.
    """
    drawn, ahead, _ = _world_reads(states, shards, epoch, keys)
    remainder = states[0].get("remainder")
    if remainder is not None and int(remainder["epoch"]) == epoch:  # this world continued an earlier one
        ahead = (counted_ahead(remainder["before"], shards, epoch, keys) - drawn) | ahead
    return ahead


def _counted_mask(left: list[SampleId], counted: Counter) -> list[bool]:
    """For each sample of ``left``: whether a reader has counted it already (``counted_ahead``; of a
    shard listed twice, as many copies as were counted, the first ones)."""
    owed = Counter(counted)
    mask = []
    for sample in left:
        mask.append(owed[sample] > 0)
        owed[sample] -= 1
    return mask


def _full_reads(
    left: list[SampleId], epoch: int, first: int, plan: dict, keys: ShardKeys, counted: list[bool]
) -> tuple[Counter, Counter]:
    """(samples read, shard ends counted) by every rank of ``plan`` reading its remainder slice of
    ``left`` whole (each worker draws its slice once; a shard's end is passed with its last
    sample, also when that is the worker's last draw). ``counted``: ``_counted_mask`` of ``left``,
    the samples whose counts (with the end they carry) the workers leave out."""
    reads = _Reads()
    for rank in range(plan["world_size"]):
        ranked = dict(plan, rank=rank)
        masks = _slices(counted, epoch, first, ranked)
        for worker, ids in _slices(left, epoch, first, ranked).items():
            sequence = _slice_sequence(ids, ranked, epoch, worker, reads, keys, masks[worker])
            for _ in zip(range(len(ids)), sequence):
                pass
    return reads.samples, reads.ends


def _ends_counted(states: list[dict], shards: list[str], epoch: int, keys: ShardKeys) -> Counter:
    """Shard ends counted in ``epoch`` so far by the world of ``states`` and those before it, with
    the correction of the change of world size that began its remainder of the epoch.

    That change set the ends to its total (``_ends_owed``) plus what this world would count reading
    its slices whole; this world counted the ends it did (the earlier worlds' own counts cancel).
    """
    _, _, ends = _world_reads(states, shards, epoch, keys)
    remainder = states[0].get("remainder")
    if remainder is None or int(remainder["epoch"]) != epoch:
        return ends
    before, first = remainder["before"], int(remainder["first_batch"])
    consumed = consumed_in_epoch(before, shards, epoch, keys)
    ends.update(_ends_owed(before, shards, dict(states[0]["plan"], rank=0), epoch, first, consumed, keys))
    return ends


def resample_salt(epoch: int, states: list[dict]) -> dict:
    """What makes a resampled stream's draws in the rest of ``epoch`` new after a world-size change.

    The new workers start their (seed, epoch, rank, worker) sequences with nothing drawn, so
    without it the new rank 0 drew exactly what the old rank 0 drew from the epoch's start.
    Salted with the old world's position and shape, a later change in the same epoch gets its own.
    """
    plan = states[0]["plan"]
    salt = f"{states[0]['next_batch']}/{len(states)}x{plan['batch_size']}"
    return {"epoch": epoch, "salt": salt}


def skipped_so_far(states: list[dict]) -> dict[str, int]:
    """Skip counts by reason over every rank's stream state (workers, and earlier world sizes')."""
    total: Counter = Counter()
    for state in states:
        total.update(with_recount(state.get("skipped_before", {}), state.get("recount")))
        for info in state["workers"].values():
            total.update(info["skipped"])
    return dict(total)


def _epoch_order(shards: list[str], plan: dict, epoch: int) -> list[str]:
    return worker_shards(shards, epoch, 0, 1, 0, 1, plan["seed"], plan["shard_shuffle"])


def plan_slices(
    remainder: Remainder, shards: list[str], plan: dict, keys: ShardKeys | None = None
) -> dict[int, list[SampleId]]:
    """The samples each logical worker of ``plan``'s rank reads in the remainder epoch."""
    keys = keys or ShardKeys()
    consumed = consumed_in_epoch(remainder.before, shards, remainder.epoch, keys)
    left = left_in_epoch(shards, plan, remainder.epoch, consumed, keys)
    return _slices(left, remainder.epoch, remainder.first_batch, plan)


def plan_remainder(
    remainder: Remainder, shards: list[str], plan: dict, keys: ShardKeys | None = None
) -> tuple[dict[int, list[SampleId]], dict[int, list[bool]]]:
    """``plan_slices`` and, in step with each slice, whether an old reader counted that sample
    already (``counted_ahead``): what ``remainder_samples`` leaves uncounted."""
    keys = keys or ShardKeys()
    consumed = consumed_in_epoch(remainder.before, shards, remainder.epoch, keys)
    left = left_in_epoch(shards, plan, remainder.epoch, consumed, keys)
    counted = _counted_mask(left, counted_ahead(remainder.before, shards, remainder.epoch, keys))
    return tuple(_slices(x, remainder.epoch, remainder.first_batch, plan) for x in (left, counted))


def _slices(left: list, epoch: int, first: int, plan: dict) -> dict[int, list]:
    """``left`` dealt to ``plan``'s rank and its workers for the batches ``first ..`` of ``epoch``
    (or any list in step with it, such as its ``_counted_mask``)."""
    batch, workers = plan["batch_size"], plan["workers"]
    end = (epoch + 1) * plan["steps_per_epoch"]
    steps = end - first
    start = plan["rank"] * steps * batch
    slices: dict[int, list] = {}
    for worker in range(workers):
        n = len(range(first + (worker - first) % workers, end, workers))
        slices[worker] = left[start : start + n * batch]
        start += n * batch
    return slices


def _slice_sequence(
    ids: list[SampleId],
    plan: dict,
    epoch: int,
    worker: int,
    reads: _Reads | None = None,
    keys=None,
    counted: list[bool] | None = None,
) -> Iterator[SampleId]:
    """The order in which a worker draws its remainder slice (endless: passes repeat); ``reads``
    records what its reader reads (with ``keys``; ``counted``: its first pass's ``_counted_mask``)."""
    tag = f"remainder/{plan['seed']}/{epoch}/{plan['rank']}/{worker}"
    for repeat in range(1_000_000):
        if not ids:
            return
        source = reads.slice(ids, keys, counted if repeat == 0 else None) if reads else iter(ids)
        yield from shuffle_buffer(source, plan["shuffle_buffer"], random.Random(f"{tag}/{repeat}"))


def remainder_samples(
    ids: list[SampleId], plan: dict, epoch: int, worker: int, count=None, counted: list[bool] | None = None
) -> Iterator[dict]:
    """Raw samples of a worker's remainder slice, in ``_slice_sequence`` order (endless).

    Reads the slice's shards in slice order, so the shuffle buffer sees the same input order as
    the key replay in ``consumed_in_epoch``; a shard listed twice is read once per copy. The first
    pass leaves uncounted the samples that ``counted`` marks (``plan_remainder``): an old reader
    counted them already; a later pass reads them anew, and counts them, as any worker's does.
    """
    tag = f"remainder/{plan['seed']}/{epoch}/{plan['rank']}/{worker}"
    for repeat in range(1_000_000):
        n = 0
        raw = _read_in_order(ids, count, counted if repeat == 0 else None)
        for sample in shuffle_buffer(raw, plan["shuffle_buffer"], random.Random(f"{tag}/{repeat}")):
            n += 1
            yield sample
        if n == 0:
            raise RuntimeError(
                f"the remainder of epoch {epoch} for worker {worker} holds no readable "
                "samples; check data.train_shards."
            )


def _read_in_order(ids: list[SampleId], count=None, counted: list[bool] | None = None) -> Iterator[dict]:
    """The raw samples ``ids`` names, in the order of ``ids``.

    Within one copy of a shard the slice keeps tar order, so one read of the shard serves a run
    of its ids; a run that goes on with a key the read has passed is the next copy of an
    upsampled shard, for which the shard is read again.

    The read starts at the shard's start, so it also passes samples outside the slice (drawn by the
    old ranks, or another worker's): what the reader counts for them (their ignored members) is
    dropped, as they were counted where they were drawn. Counts reach ``count`` only for the
    samples yielded, and for the shard's end (its ``tar_error``) when the run reads up to it: with
    the shard's last sample when the run holds it (the worker may ask for nothing after it). A sample
    that ``counted`` marks (in step with ``ids``) is yielded uncounted, with the end it carries.
    """
    i = 0
    while i < len(ids):
        url, present = ids[i][0], set()
        pending: list[str] = []  # counted while reading the next sample (or the shard's end)
        for sample, end in iter_samples_with_end(url, pending.append):
            if i == len(ids) or ids[i][0] != url:
                break
            present.add(sample["__key__"])
            mine = sample["__key__"] == ids[i][1]
            reasons, pending[:] = pending[:], []
            if mine:
                if not (counted and counted[i]):
                    _count_all(count, reasons + end)
                i += 1
                yield sample
            else:
                pending[:] = end  # counted below if the read goes on to the end (the last sample)
        else:  # the read reached the shard's end for this run: its damage is counted here
            _count_all(count, pending)
        # Keys the shard no longer holds (damaged since its keys were listed) are passed over.
        while i < len(ids) and ids[i][0] == url and ids[i][1] not in present:
            i += 1


def _count_all(count, reasons: list[str]) -> None:
    if count is not None:
        for reason in reasons:
            count(reason)


def log_batch_keys(keys: list[str]) -> None:
    """Test hook: append ``keys`` (one line each) to ``$VUTRAIN_SAMPLE_LOG.<pid>`` if that is set."""
    path = os.environ.get(SAMPLE_LOG_ENV)
    if path and keys:
        with open(f"{path}.{os.getpid()}", "a", encoding="utf-8") as fh:
            fh.write("".join(f"{k}\n" for k in keys))
