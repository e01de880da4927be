"""The training data stream over webdataset shards: split by rank and worker, exactly resumable.

``TrainStream`` yields batches forever::

    {"pixel_values": ByteTensor[B, 3, S, S], "input_ids": LongTensor[B, L],
     "attention_mask": LongTensor[B, L]}

``pixel_values`` is uint8 with a fast preprocess (``make_fast_preprocess``: the trainer's
default; normalised on the device by ``device_transform``) and
normalised float with a float one (``make_preprocess``: the processor's exact path). Workers
stack each batch straight into shared memory; the batches are pinned when CUDA is available.

Per worker, per epoch: shard list (epoch_plan.worker_shards) -> raw samples (undecoded bytes)
-> shuffle buffer -> decode + caption + preprocess (bad samples skipped and counted) -> batch
of ``batch_size`` -> tokenize. Decoding after the shuffle keeps buffers small and lets a
resumed stream replay the buffer without decoding.

Epochs: every rank produces exactly ``steps_per_epoch = num_samples // (batch_size * world_size)``
batches per epoch, so no rank waits alone in a collective. A worker whose shards run dry
before its share of the epoch is done reads them again from the start (a new shuffle), so
small shard splits repeat samples rather than end early; leftovers at the end of an epoch are
dropped and the next epoch reshuffles the shard order with (seed, epoch).

Resume: each batch carries a tag (logical worker, epoch, raw samples that worker drew from its
shuffle buffer this epoch, batch index, its skip counts); ``state_dict()`` keeps the latest tag
per worker and the next batch index. ``load_state_dict()`` restarts each worker at its next
batch: it replays shard reading and the shuffle buffer for the drawn samples without decoding
them, and the DataLoader's worker ids are rotated so its round robin resumes at the right
worker. The following batches then equal those of the uninterrupted stream. A position that
cannot continue (another shard list, other data settings) is refused in one line; with
``data.restart_stream`` the trainer calls ``restart_after()`` instead: the first batch of the next
epoch over the new list.
"""

from __future__ import annotations

import atexit
import hashlib
import itertools
import logging
import multiprocessing
import os
import random
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .captions import render_caption, template_fields
from .epoch_plan import (
    auto_num_workers,
    fallback_shards,
    first_batch_of_worker,
    shuffle_buffer,
    worker_shards,
)
from .epoch_remainder import (
    Remainder,
    ShardKeys,
    StreamStateError,
    log_batch_keys,
    plan_remainder,
    remainder_samples,
    reshape_state,
    skipped_so_far,
    with_recount,
)
from .labels import POSITIVES, collate_labels, sample_label
from .preprocess import make_preprocess
from .samples import SkipCounter, SkipSample, decode_sample, decode_sample_bytes, iter_samples_end_first
from .shards import check_openable, count_samples, expand_shards, is_remote
from .val import ValStream, collect_label_values, iter_val_batches
from .worker_tempdir import ensure_short_worker_tempdir

__all__ = [
    "TrainStream",
    "ValStream",
    "iter_val_batches",
    "collect_label_values",
    "expand_shards",
    "render_caption",
    "make_preprocess",
]

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
_STATE_VERSION = 1
_MAX_CONSECUTIVE_SKIPS = 10_000
_LIVE_STREAMS: weakref.WeakSet[TrainStream] = weakref.WeakSet()
# The settings behind _Plan fields whose names differ, for errors that say what to set.
_SETTING_NAMES = {
    "num_shards": "shards in data.train_shards",
    "workers": "loader workers (data.num_workers)",
    "batch_size": "train.micro_batch_size",
    "steps_per_epoch": "steps per epoch (data.num_samples // global batch)",
    "shuffle_buffer": "data.shuffle_buffer",
    "resampled": "data.resampled",
    "caption_template": "data.caption_template",
}


# What a resume that cannot continue the data position can do instead (the trainer's settings).
RESTART_STREAM = "data.restart_stream=true"
RESTART_ADVICE = (
    f"set {RESTART_STREAM} to keep the weights, optimizer, schedule and step and start the data "
    "stream afresh at the next epoch"
)
START_AFRESH = f"{RESTART_ADVICE}, or start afresh with train.resume=never (or another output_dir)"


def shard_list_id(shards: list[str]) -> dict:
    """The identity of a shard list, kept in the stream state: its length, first and last names and
    a digest of every name in order. Names without their folder, so moved shards still resume."""
    # Without a URL's query either: a signed URL's token changes between jobs.
    names = [os.path.basename(s.split("?", 1)[0].rstrip("/")) for s in shards]
    digest = hashlib.sha256("\n".join(names).encode("utf-8")).hexdigest()[:16]
    return {"count": len(names), "first": names[0], "last": names[-1], "digest": digest}


def shard_sizes_id(shards: list[str]) -> dict | None:
    """The file sizes of the shards, kept in the stream state: a digest of each size in order and
    their total, with digests of their modification times and of where they are (real folder and
    name). None when a shard is remote (or unreadable): its size is not known for free.

    The names alone miss a shard rebuilt in place (``dataset_tools build --retry-failed`` merges
    new samples into the same shard names), over which a saved position lands on other samples.
    Sizes, unlike modification times, survive a copy to another folder; the times tell a rewrite
    that kept the size (tars are padded to 10,240-byte records), where the files have not moved.
    """
    stats, folders = [], {}
    for url in shards:
        if is_remote(url):
            return None
        try:
            stats.append(os.stat(url))
        except OSError:
            return None
    for url in shards:  # one realpath a folder: a cluster file system's lookups are not free
        folder = os.path.dirname(os.path.abspath(url))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
    places = [os.path.join(folders[os.path.dirname(os.path.abspath(u))], os.path.basename(u)) for u in shards]
    return {
        "digest": _digest(st.st_size for st in stats),
        "bytes": sum(st.st_size for st in stats),
        "mtimes": _digest(st.st_mtime_ns for st in stats),
        "place": _digest(places),
    }


def _digest(items) -> str:
    return hashlib.sha256(",".join(map(str, items)).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _rewritten_in_place(saved: dict, now: dict) -> bool:
    """Whether shards of the same sizes at the same paths have other modification times than when
    ``saved`` (a ``shard_sizes_id``) was taken: rewritten since (or touched). States written before
    2026-12-07 carry no times."""
    return "mtimes" in saved and saved.get("place") == now["place"] and saved["mtimes"] != now["mtimes"]


def _refused(reason: str, advice: str) -> StreamStateError:
    """The one-line error for a data position this stream cannot continue; ``reason`` alone is kept
    as ``.reason`` for the warning of a resume that restarts the stream instead (data.restart_stream)."""
    error = StreamStateError(f"{reason}{advice}")
    error.reason = reason
    return error


def _describe_list(ident: dict) -> str:
    return f"{ident['count']} shards, {ident['first']} .. {ident['last']}, digest {ident['digest']}"


@atexit.register
def _close_live_streams() -> None:
    # An unclosed DataLoader iterator left to interpreter shutdown can stall exit for many
    # seconds while its workers time out; shut them down cleanly first.
    for stream in list(_LIVE_STREAMS):
        stream.close()


@dataclass(frozen=True)
class _Plan:
    """Everything that fixes the sequence of batches; a resumed stream must match it."""

    num_shards: int
    rank: int
    world_size: int
    workers: int  # logical workers: max(1, num_workers)
    batch_size: int
    steps_per_epoch: int
    seed: int
    shard_shuffle: bool
    shuffle_buffer: int
    resampled: bool
    caption_template: str


class _WorkerBatches:
    """The batches of one logical worker, from batch ``g0`` on (runs inside a DataLoader worker)."""

    def __init__(
        self,
        plan: _Plan,
        shards: list[str],
        preprocess,
        tokenize,
        worker: int,
        resume: dict | None,
        positives: str = "pair",
        remainder: tuple[int, list, list[bool] | None] | None = None,
        resample_salt: dict | None = None,
    ):
        self.plan, self.shards, self.preprocess, self.tokenize = plan, shards, preprocess, tokenize
        self.worker, self.resume, self.positives = worker, resume, positives
        # (epoch, this worker's slice, which of its samples were counted already) after a world-size change
        self.remainder = remainder
        self.resample_salt = resample_salt  # epoch_remainder.resample_salt after a world-size change
        self.skipped = SkipCounter(resume["skipped"] if resume else {})

    def _raw_pass(self, urls: Iterator[str]) -> Iterator[dict]:
        for url in urls:
            # A shard's damage is counted with its last sample: a worker whose share of the epoch
            # ends there asks for no more, and the tar_error was lost (2 of 4 on two ranks).
            yield from iter_samples_end_first(url, self.skipped)

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        """Shuffled raw samples of this worker for ``epoch``, endless (passes repeat)."""
        p = self.plan
        tag = f"{p.seed}/{epoch}/{p.rank}/{self.worker}"
        mine = worker_shards(
            self.shards, epoch, p.rank, p.world_size, self.worker, p.workers, p.seed, p.shard_shuffle
        )
        wider = fallback_shards(self.shards, epoch, p.rank, p.world_size, p.seed, p.shard_shuffle)
        for repeat in itertools.count():
            n = 0
            raw = self._raw_pass(iter(mine))
            for sample in shuffle_buffer(raw, p.shuffle_buffer, random.Random(f"samples/{tag}/{repeat}")):
                n += 1
                yield sample
            if n == 0:
                if not wider:
                    raise RuntimeError(
                        f"none of the {len(self.shards)} shards holds a readable sample (skipped: "
                        f"{dict(self.skipped)}); check data.train_shards."
                    )
                # One empty (or unreadable) shard must not stop the run when it is a worker's
                # whole split (one shard per worker is common): read more shards instead.
                log.warning(
                    "epoch %d: shards %s hold no readable samples; rank %d worker %d reads %d shards instead",
                    epoch,
                    mine,
                    p.rank,
                    self.worker,
                    len(wider[0]),
                )
                mine = wider.pop(0)

    def _resampled_samples(self, epoch: int) -> Iterator[dict]:
        p = self.plan
        tag = f"{p.seed}/{epoch}/{p.rank}/{self.worker}"
        if self.resample_salt and self.resample_salt["epoch"] == epoch:
            tag += f"/after {self.resample_salt['salt']}"  # not the old ranks' draws again
        rng = random.Random(f"resample/{tag}")

        def raw() -> Iterator[dict]:
            empty = 0
            while True:
                n = 0
                for sample in iter_samples_end_first(rng.choice(self.shards), self.skipped):
                    n += 1
                    yield sample
                empty = 0 if n else empty + 1
                if empty > max(100, 4 * len(self.shards)):
                    raise RuntimeError(
                        f"{empty} shards in a row held no readable samples; check data.train_shards."
                    )

        yield from shuffle_buffer(raw(), p.shuffle_buffer, random.Random(f"samples/{tag}"))

    def _decode(self, raw: dict) -> tuple[torch.Tensor, str, object] | None:
        try:
            if getattr(self.preprocess, "reads_bytes", False):  # the fast path decodes itself
                data, caption, meta = decode_sample_bytes(raw, self.plan.caption_template)
                try:
                    return self.preprocess(data), caption, sample_label(meta, self.positives)
                except SkipSample as e:
                    raise SkipSample(e.reason, f"{raw['__key__']}: {e}") from None
            image, caption, meta = decode_sample(raw, self.plan.caption_template)
            return self.preprocess(image), caption, sample_label(meta, self.positives)
        except SkipSample as e:
            self.skipped(e.reason, str(e))
        except Exception as e:  # a preprocessing failure must not stop training; count it
            self.skipped("preprocess_error", f"{raw.get('__key__')}: {e!r}")
        return None

    def __iter__(self) -> Iterator[dict]:
        p, w = self.plan, self.worker
        g = first_batch_of_worker(self.resume["next_batch"] if self.resume else 0, w, p.workers)
        drawn = 0
        if self.resume and self.resume.get("epoch") == g // p.steps_per_epoch:
            drawn = self.resume["drawn"]
        while True:
            epoch = g // p.steps_per_epoch
            if self.remainder and epoch == self.remainder[0]:  # see epoch_remainder.py
                _, ids, counted = self.remainder
                samples = remainder_samples(ids, asdict(p), epoch, w, self.skipped, counted)
            else:
                samples = self._resampled_samples(epoch) if p.resampled else self._epoch_samples(epoch)
            # Fast-forward: replay reading and shuffling of samples already handed out, muted so
            # skip counts (restored from the state) are not counted twice.
            self.skipped.muted = True
            for _ in range(drawn):
                next(samples)
            self.skipped.muted = False
            while g < (epoch + 1) * p.steps_per_epoch:
                pixels, captions, labels, failures, keys = [], [], [], 0, []
                while len(pixels) < p.batch_size:
                    raw = next(samples)
                    decoded = self._decode(raw)
                    drawn += 1
                    if decoded is None:
                        failures += 1
                        if failures > _MAX_CONSECUTIVE_SKIPS:  # all-bad shards must not spin forever
                            raise RuntimeError(
                                f"{failures} samples in a row were unusable "
                                f"({dict(self.skipped)}); "
                                "check data.train_shards and data.caption_template."
                            )
                        continue
                    failures = 0
                    pixels.append(decoded[0])
                    captions.append(decoded[1])
                    labels.append(decoded[2])
                    keys.append(f"{os.path.basename(raw['__url__'])}/{raw['__key__']}")
                batch = dict(self.tokenize(captions))
                batch["pixel_values"] = collate_pixels(pixels)
                if self.positives != "pair":  # loss.positives: category / tags
                    batch["labels"] = collate_labels(labels, self.positives)
                batch["_tag"] = {
                    "worker": w,
                    "epoch": epoch,
                    "drawn": drawn,
                    "batch": g,
                    "skipped": dict(self.skipped),
                    "keys": keys,
                }
                yield batch
                g += p.workers
            drawn = 0


def collate_pixels(pixels: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-sample images into one batch tensor.

    [3, S, S] samples (uint8 or float) give a contiguous [B, 3, S, S]. Inside a loader worker
    the batch is written straight into shared memory, as torch's ``default_collate`` does, so
    the queue does not copy it a second time.
    """
    first = pixels[0]
    if get_worker_info() is not None:
        storage = first._typed_storage()._new_shared(len(pixels) * first.numel(), device=first.device)
        batch = first.new(storage).resize_(len(pixels), *first.shape)
    else:
        batch = first.new_empty((len(pixels), *first.shape))
    for row, image in zip(batch, pixels):  # 10-50x faster than torch.stack for these shapes
        row.copy_(image)
    return batch


def _pin_batch(batch: dict) -> dict:
    """The batch with its tensors in pinned memory (what the DataLoader's pin thread does)."""
    return {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class _TrainIterable(IterableDataset):
    """Maps DataLoader worker ids to logical workers, rotated so the round robin resumes in place."""

    def __init__(
        self,
        plan: _Plan,
        shards,
        preprocess,
        tokenize,
        next_batch: int,
        workers: dict,
        positives: str = "pair",
        remainder: tuple[int, dict, dict] | None = None,
        resample_salt: dict | None = None,
    ):
        super().__init__()
        self.plan, self.shards, self.preprocess, self.tokenize = plan, shards, preprocess, tokenize
        self.next_batch, self.workers, self.positives = next_batch, workers, positives
        self.remainder, self.resample_salt = remainder, resample_salt

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.next_batch) % self.plan.workers
        resume = {"next_batch": self.next_batch, **self.workers.get(logical, {"skipped": {}})}
        if self.remainder:
            epoch, slices, counted = self.remainder
            remainder = (epoch, slices[logical], counted.get(logical))
        else:
            remainder = None
        return iter(
            _WorkerBatches(
                self.plan,
                self.shards,
                self.preprocess,
                self.tokenize,
                logical,
                resume,
                self.positives,
                remainder,
                self.resample_salt,
            )
        )


class _Cursor:
    """Position of a stream: next batch index and the latest tag of each logical worker.

    Shared by the stream and its iterators, so an iterator holds no reference to the stream:
    dropping the stream then frees the iterator (and joins its DataLoader workers) at once
    instead of in a garbage-collector pass, where worker shutdown stalls on timeouts.
    """

    def __init__(self):
        self.next_batch = 0
        self.workers: dict[int, dict] = {}


def _tag_batches(loader: Iterator[dict], cursor: _Cursor) -> Iterator[Batch]:
    """Strip each batch's tag into ``cursor`` and yield the tensors."""
    try:
        for batch in loader:
            tag = batch.pop("_tag")
            if tag["batch"] != cursor.next_batch:
                raise RuntimeError(
                    f"data stream out of order: got batch {tag['batch']}, expected {cursor.next_batch}"
                )
            cursor.workers[tag["worker"]] = {
                "epoch": tag["epoch"],
                "drawn": tag["drawn"],
                "skipped": dict(tag["skipped"]),
            }
            cursor.next_batch += 1
            log_batch_keys(tag["keys"])  # a no-op unless the test hook's variable is set
            yield batch
    finally:
        del loader  # drops the DataLoader iterator now, which joins its workers


class TrainStream:
    """Endless, exactly resumable stream of training batches for one rank (see module doc).

    Args:
        shards: brace-expandable spec, sources joined by ``::`` (``data.train_shards``).
        preprocess: ``make_fast_preprocess(image_processor)`` (bytes -> uint8 [3, S, S]; batches of
            uint8 [B, 3, S, S]) or any PIL image -> FloatTensor[3, S, S] (``make_preprocess``).
        tokenize: list of B captions -> {"input_ids": [B, L], "attention_mask": [B, L]}.
        batch_size: samples per batch on this rank (the micro batch).
        rank, world_size: this process's data-parallel rank and the number of ranks.
        num_workers: DataLoader worker processes (0: read in this process; -1: auto, see
            ``epoch_plan.auto_num_workers``; a resume adopts the saved count).
        seed: fixes shard order, shuffles and resampling (same on all ranks).
        caption_template: e.g. "{title}", "{title}. tags: {tags}" (see captions.py).
        shuffle_buffer: samples held by each worker's shuffle buffer (<= 1 disables).
        shard_shuffle: reshuffle the shard order every epoch with (seed, epoch).
        resampled: draw shards with replacement per worker (no shard-count requirement).
        positives: "pair" (default), "category" or "tags": batches then also carry "labels"
            (LongTensor [B] or [B, T]; see labels.py) for the multi-positive losses.
        num_samples: samples per epoch over all ranks; default from sizes.json / __len__ /
            *_stats.json next to the shards.
        local_world_size: ranks on this node (sizes the auto worker count).
        prefetch_factor: batches each worker prepares ahead.
        pin_memory: pin batches for non-blocking copies; None: when CUDA is available.
    """

    def __init__(
        self,
        shards: str,
        *,
        preprocess: Callable,
        tokenize: Callable[[list[str]], dict],
        batch_size: int,
        rank: int,
        world_size: int,
        num_workers: int,
        seed: int,
        caption_template: str = "{title}",
        shuffle_buffer: int = 1000,
        shard_shuffle: bool = True,
        resampled: bool = False,
        num_samples: int | None = None,
        local_world_size: int = 1,
        prefetch_factor: int = 2,
        pin_memory: bool | None = None,
        positives: str = "pair",
    ):
        template_fields(caption_template)  # unknown placeholder -> ValueError now, not in a worker
        if positives not in POSITIVES:
            raise ValueError(
                f"loss.positives={positives!r} is not valid; choose one of {', '.join(POSITIVES)}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1 or num_workers < -1 or prefetch_factor < 1:
            raise ValueError(
                f"need batch_size >= 1, num_workers >= -1 and prefetch_factor >= 1; got "
                f"{batch_size}, {num_workers}, {prefetch_factor}"
            )
        self.shards = check_openable(expand_shards(shards, "data.train_shards"), "data.train_shards")
        self.auto_workers = num_workers == -1
        if self.auto_workers:
            num_workers = auto_num_workers(len(self.shards), world_size, local_world_size, resampled)
            log.info("data.num_workers=-1: %d loader workers per rank", num_workers)
        workers = max(1, num_workers)
        if not resampled and len(self.shards) < world_size * workers:
            raise ValueError(
                f"data.train_shards has {len(self.shards)} shards for {world_size} ranks x {workers} "
                "workers: "
                "write more, smaller shards (dataset_tools build --shard-size) or set data.num_workers / "
                "data.resampled=true"
            )
        if num_samples is None:
            num_samples = count_samples(self.shards)
            if num_samples is None:
                raise ValueError(
                    "data.num_samples is not set and no sizes.json, __len__ or *_stats.json was "
                    f"found next to {shards}; set data.num_samples to the samples per epoch."
                )
        self.num_samples = int(num_samples)
        steps = self.num_samples // (batch_size * world_size)
        if steps < 1:
            raise ValueError(
                f"data.num_samples={self.num_samples} is smaller than one global batch "
                f"({batch_size} x {world_size} ranks); lower the batch size or add data."
            )
        self.plan = _Plan(
            len(self.shards),
            rank,
            world_size,
            workers,
            batch_size,
            steps,
            seed,
            shard_shuffle,
            shuffle_buffer,
            resampled,
            caption_template,
        )
        self.num_workers, self.preprocess, self.tokenize = num_workers, preprocess, tokenize
        self.prefetch_factor = prefetch_factor
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.positives = positives
        self._cursor = _Cursor()
        # Skips counted by the ranks of an earlier world size (the new rank 0 carries their total).
        self._skipped_before: dict[str, int] = {}
        self._recount: dict | None = None  # epoch_remainder.reader_recount, kept until applied
        self._remainder: Remainder | None = None  # the rest of an epoch begun on another world size
        self._slices: dict[int, list] = {}
        self._counted: dict[int, list[bool]] = {}  # in step with _slices: samples the old readers counted
        self._resample_salt: dict | None = None  # resampled draws of an epoch begun on another world
        self._iterator: Iterator[Batch] | None = None
        self._generators: weakref.WeakSet = weakref.WeakSet()
        _LIVE_STREAMS.add(self)

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch on every rank: ``num_samples // (batch_size * world_size)``."""
        return self.plan.steps_per_epoch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self._cursor.next_batch // self.plan.steps_per_epoch

    @property
    def batches_seen(self) -> int:
        """Batches handed out so far (including those before a resume)."""
        return self._cursor.next_batch

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far on this rank by reason, summed over workers (and, on rank 0 after
        a resume on another world size, the earlier ranks' skips: summed over ranks, the run's)."""
        total: Counter = Counter(self._skipped_before)
        for info in self._cursor.workers.values():
            total.update(info["skipped"])
        if self._recount and self.epoch > self._recount["epoch"]:
            # A reshape's correction of the damaged shards' ends the old ranks' readers had passed
            # (or left to no one), applied once the epoch is over: during it, the counts stay as saved.
            return with_recount(total, self._recount)
        return dict(total)

    def _loader(self) -> Iterator[dict]:
        workers = {w: dict(v) for w, v in self._cursor.workers.items()}
        remainder = (self._remainder.epoch, self._slices, self._counted) if self._remainder else None
        dataset = _TrainIterable(
            self.plan,
            self.shards,
            self.preprocess,
            self.tokenize,
            self._cursor.next_batch,
            workers,
            self.positives,
            remainder,
            self._resample_salt,
        )
        if self.num_workers == 0:
            # No DataLoader, so no pin thread: pin here. The trainer's non_blocking copies are
            # asynchronous only from pinned memory; from pageable memory CUDA may complete them
            # synchronously with the host, behind the work already queued on the device (a
            # stall per micro-batch). Like the DataLoader, a machine without CUDA pins nothing.
            batches = iter(dataset)
            return map(_pin_batch, batches) if self.pin_memory and torch.cuda.is_available() else batches
        if self.tokenize is not None:  # HF tokenizers' thread pool must not be used across fork
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ensure_short_worker_tempdir()  # a long TMPDIR made the workers drop their batches (a hang)
        # fork avoids pickling the caller's preprocess/tokenize closures into the workers
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        return iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                multiprocessing_context=context,
                prefetch_factor=self.prefetch_factor,
                pin_memory=self.pin_memory,
            )
        )

    def __iter__(self) -> Iterator[Batch]:
        """A new iterator that continues after the last batch handed out (by any iterator)."""
        generator = _tag_batches(self._loader(), self._cursor)
        self._generators.add(generator)
        return generator

    def close(self) -> None:
        """Stop the loader workers of every open iterator (the stream can be iterated again)."""
        for generator in list(self._generators):
            generator.close()
        self._iterator = None

    def __enter__(self) -> TrainStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = iter(self)
        return next(self._iterator)

    def state_dict(self) -> dict:
        """JSON-serialisable position after the last batch handed out (save one per rank)."""
        state = {
            "version": _STATE_VERSION,
            "next_batch": self._cursor.next_batch,
            "plan": asdict(self.plan),
            "workers": {str(w): v for w, v in sorted(self._cursor.workers.items())},
            "shards": {**shard_list_id(self.shards), "sizes": self._shard_sizes()},
        }
        skipped_before = dict(self._skipped_before)
        if self._recount and self.epoch > self._recount["epoch"]:
            skipped_before = with_recount(skipped_before, self._recount)
        elif self._recount:
            state["recount"] = dict(self._recount)
        if skipped_before:
            state["skipped_before"] = skipped_before
        if self._remainder and self.epoch <= self._remainder.epoch:
            state["remainder"] = self._remainder.to_state()
        if self._resample_salt and self.epoch <= self._resample_salt["epoch"]:
            state["resample_salt"] = dict(self._resample_salt)
        return state

    def _shard_sizes(self) -> dict | None:
        """``shard_sizes_id`` of this stream's shards, read once per stream: a stat of every shard
        at every checkpoint, on every rank, would load a cluster file system's metadata server."""
        if not hasattr(self, "_sizes_id"):
            self._sizes_id = shard_sizes_id(self.shards)
        return self._sizes_id

    def _check_same_shards(self, state: dict) -> None:
        """ValueError (one line) when ``state`` was saved over another shard list, or over shards of
        the same names whose files have changed since (other sizes); a warning (rank 0) when the
        files at the same paths kept their sizes but not their modification times.

        The position is a count of samples drawn from each worker's share of the (shuffled) list:
        over another list it lands on other samples. Before 2026-12-06 a list of the same length
        (shards replaced, or one added and one removed) resumed there without a word.
        """
        saved, now = state.get("shards"), shard_list_id(self.shards)
        if saved is None:  # states written before say nothing
            return
        if saved["digest"] != now["digest"]:
            raise _refused(
                f"data.train_shards names other shards than when this data position was saved "
                f"(saved {_describe_list(saved)}; now {_describe_list(now)})",
                f", so the position would land on other samples: restore the saved data.train_shards, "
                f"or {START_AFRESH}.",
            )
        # Remote shards, and states written before 2026-12-06, carry no sizes to compare.
        saved_sizes = saved.get("sizes")
        sizes = self._shard_sizes() if saved_sizes else None
        if saved_sizes and sizes and saved_sizes["digest"] != sizes["digest"]:
            raise _refused(
                f"the shards of data.train_shards changed on disk since this data position was saved "
                f"(same {_describe_list(now)}, other file sizes: {saved_sizes['bytes']} bytes in all "
                f"then, {sizes['bytes']} now)",
                f", so the position would land on other samples: restore the saved shards, "
                f"or {START_AFRESH}.",
            )
        if saved_sizes and sizes and _rewritten_in_place(saved_sizes, sizes) and self.plan.rank == 0:
            # A warning, not a refusal: a copy back into place or a touch changes the times too, and
            # a refusal would stop a requeued job that may well be right.
            log.warning(
                "the shards of data.train_shards were modified since this data position was saved "
                "(same paths and sizes, other modification times): if they were rebuilt "
                "(dataset_tools build --retry-failed), the resumed position lands on other samples; "
                "then %s. If they were only copied or touched, nothing is wrong.",
                RESTART_ADVICE,
            )

    def load_state_dict(self, state: dict) -> None:
        """Continue after the batch at which ``state`` was taken (same settings required).

        ``{"ranks": [state of rank 0, rank 1, ...]}`` (every rank's state, e.g. from a checkpoint
        written on another world size) is also accepted: see epoch_remainder.py.
        """
        self._check_same_shards(state["ranks"][0] if "ranks" in state else state)
        keys = ShardKeys()  # each shard's keys read once, for the reshape and the slices alike
        if "ranks" in state:
            try:
                state = reshape_state(state["ranks"], asdict(self.plan), self.shards, keys)
            except StreamStateError as exc:  # its advice predates data.restart_stream: add it
                if RESTART_STREAM in str(exc):
                    raise
                reason, sep, advice = str(exc).partition("; ")
                raise _refused(reason, f"{sep}{advice} Or {RESTART_ADVICE}.") from None
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported data stream state version {state.get('version')!r}")
        saved, plan = state["plan"], self.plan
        adopt = self.auto_workers and saved.get("workers") != plan.workers
        if adopt:
            # An automatic worker count follows the saved one, so a job requeued onto a node
            # with another core count still resumes exactly.
            plan = replace(plan, workers=int(saved["workers"]))
        now = asdict(plan)
        diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
        if diff:
            changes = ", ".join(
                f"{_SETTING_NAMES.get(k, k)}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items()
            )
            workers = (
                f" (data.num_workers={saved['workers']}, or -1, which adopts the saved count)"
                if "workers" in diff
                else ""
            )
            raise _refused(
                f"the data stream state was saved with different settings ({changes})",
                f"; resume with the saved values{workers}, or {START_AFRESH}.",
            )
        if adopt:  # only now: a refused state must leave the stream as built (restart_after)
            log.info(
                "resuming with the saved %s loader workers (auto chose %d)", plan.workers, self.plan.workers
            )
            self.plan, self.num_workers = plan, plan.workers
        self._cursor.next_batch = int(state["next_batch"])
        self.close()  # batches prefetched by open iterators belong to the old position
        self._cursor.workers = {
            int(w): {
                "epoch": int(v["epoch"]),
                "drawn": int(v["drawn"]),
                "skipped": {k: int(c) for k, c in v["skipped"].items()},
            }
            for w, v in state["workers"].items()
        }
        self._skipped_before = {k: int(c) for k, c in state.get("skipped_before", {}).items()}
        self._recount = dict(state["recount"]) if "recount" in state else None
        self._remainder = Remainder.from_state(state["remainder"]) if "remainder" in state else None
        self._slices, self._counted = {}, {}
        if self._remainder:
            self._slices, self._counted = plan_remainder(
                self._remainder, self.shards, asdict(self.plan), keys
            )
        self._resample_salt = dict(state["resample_salt"]) if "resample_salt" in state else None

    def restart_after(self, state: dict) -> int:
        """Start at the first batch of the epoch after the one ``state`` was saved in, over this
        stream's own shard list and settings (``data.restart_stream``); returns that epoch.

        For a saved position that ``load_state_dict`` refuses (shards added or replaced): the new
        list is read from an epoch's start, its order seeded by (seed, epoch) like any later epoch,
        so not epoch 0's again. ``state`` is a rank's own or ``{"ranks": [...]}``; the skip counts
        so far are kept (of all old ranks on rank 0 for the latter, as a reshape does).
        """
        ranks = state["ranks"] if "ranks" in state else [state]
        saved_batches, saved_steps = int(ranks[0]["next_batch"]), int(ranks[0]["plan"]["steps_per_epoch"])
        epoch = -(-saved_batches // saved_steps)  # an epoch begun counts as read
        self.close()  # batches prefetched by open iterators belong to the old position
        self._cursor.next_batch = epoch * self.plan.steps_per_epoch
        self._cursor.workers = {}
        own_skips = "ranks" not in state or self.plan.rank == 0
        self._skipped_before = skipped_so_far(ranks) if own_skips else {}
        self._recount = None
        self._remainder, self._slices, self._counted, self._resample_salt = None, {}, {}, None
        return epoch
