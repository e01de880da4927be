"""Validation batches: one finite, ordered pass; each rank reads a disjoint part.

With at least as many shards as ranks, rank ``r`` reads shards ``r, r + world, ...``; with
fewer shards every rank reads all of them and keeps the samples with index ``i % world == r``
(index over raw samples, so each corrupt sample is counted by exactly one rank). Ranks may get
different numbers of batches; the last batch may be smaller than ``batch_size``.

With ``num_workers`` >= 2 (``data.num_workers``; -1, auto, resolves as training's loader does:
``epoch_plan.auto_num_workers``) DataLoader worker processes decode and preprocess:
each reads whole shards of this rank (worker ``w`` of ``W``: the rank's shards ``w, w + W, ...``),
so no tar byte is read twice; at most one worker per shard. The samples, their batches' sizes and
the skip counts are those of an in-process pass; the order of the samples is not (the workers'
shards interleave), and no metric depends on it. With fewer than two workers, or when every rank
reads every shard (fewer shards than ranks: a worker could not know the sample index of its
shards without reading those before them), the rank reads in this process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .captions import template_fields
from .epoch_plan import auto_num_workers
from .labels import category_label, normalize_tag, tag_values
from .samples import SkipCounter, SkipSample, decode_meta, decode_sample, image_member, iter_raw_samples
from .shards import check_openable, expand_shards
from .worker_tempdir import ensure_short_worker_tempdir

log = logging.getLogger(__name__)
_warned_repeats: set[tuple[str, ...]] = set()
WORKER_CHUNK = 16
"""Decoded samples a loader worker hands over at a time: ~10 MB of shared memory at 224 px, and a
short tail when the workers' shares end unevenly."""


class ValStream:
    """Iterable over this rank's validation batches (re-iterable; counts reset per pass).

    Each batch: ``pixel_values`` float[B, 3, S, S], ``input_ids`` / ``attention_mask``
    long[B, L], ``labels`` list[str] (the ``label_field`` metadata value, lists joined by ", ",
    "" when absent), ``label_sets`` list[list[str]] (the value's elements: one for a scalar, each
    element of a list, none when absent; what zero-shot scores against), ``tags`` list[list[str]]
    (the ``tags`` metadata, ``labels.tag_values``: a list, or a comma-separated string split, as
    training's tag positives read it; empty when absent; for the multi-label retrieval metrics),
    ``keys`` list[str], ``image_ids`` list[str] (a digest of the encoded image bytes: equal for
    the same file, so recall can count identical images as one) and ``video_ids`` list[str | None]
    (``video_identity``: equal for two encodings of one video). A sample without a label still
    counts for retrieval; zero-shot leaves it out.

    ``num_workers``: loader worker processes (module doc); -1 is training's auto count for a rank
    of ``local_world_size`` ranks on this node.
    """

    def __init__(
        self,
        shards: str,
        *,
        preprocess: Callable,
        tokenize: Callable[[list[str]], dict],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        caption_template: str = "{title}",
        label_field: str = "category_name",
        num_workers: int = 0,
        local_world_size: int = 1,
    ):
        template_fields(caption_template)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_workers < -1:
            raise ValueError(f"num_workers must be >= -1 (-1: auto, 0: in this process); got {num_workers}")
        self.shards = distinct_shards(
            check_openable(expand_shards(shards, "data.val_shards"), "data.val_shards"), warn=rank == 0
        )
        self.preprocess, self.tokenize, self.batch_size = preprocess, tokenize, batch_size
        self.rank, self.world_size = rank, world_size
        self.caption_template, self.label_field = caption_template, label_field
        if num_workers == -1:
            # As training's loader resolves it: -1 read every held-out image in the training
            # process (the config default, so most runs' evals were decode-bound on one core).
            num_workers = auto_num_workers(len(self.shards), world_size, local_world_size, resampled=False)
        self.num_workers = num_workers
        self._skipped = SkipCounter()

    def skipped(self) -> dict[str, int]:
        """Samples skipped by this rank in the current/last pass, by reason."""
        return dict(self._skipped)

    def loader_workers(self) -> int:
        """Worker processes of a pass: ``num_workers`` (auto resolved), at most one per shard of this
        rank; 0 (read in this process) below two (one worker would only add a hand-off) or when
        every rank reads every shard (the split by sample index needs the shards in order)."""
        if self.num_workers < 2 or len(self.shards) < self.world_size:
            return 0
        workers = min(self.num_workers, len(self.shards[self.rank :: self.world_size]))
        return workers if workers >= 2 else 0

    def _my_raw_samples(self) -> Iterator[dict]:
        if len(self.shards) >= self.world_size:
            for url in self.shards[self.rank :: self.world_size]:
                yield from iter_raw_samples(url, self._skipped)
            return
        index = 0
        for url in self.shards:
            # tar errors are counted by rank 0 only, since every rank reads every shard
            for raw in iter_raw_samples(url, self._skipped if self.rank == 0 else None):
                if index % self.world_size == self.rank:
                    yield raw
                index += 1

    def _batch(self, pixels, captions, metas, keys, image_ids) -> dict:
        batch = dict(self.tokenize(captions))
        label_sets = [label_values(meta.get(self.label_field), self.label_field) for meta in metas]
        batch.update(
            pixel_values=torch.stack(pixels),
            labels=[", ".join(values) for values in label_sets],
            label_sets=label_sets,
            tags=[tag_values(m.get("tags")) for m in metas],
            keys=keys,
            image_ids=image_ids,
            video_ids=[video_identity(m) for m in metas],
        )
        return batch

    def _decoded(self, raws: Iterator[dict], count: Callable) -> Iterator[tuple]:
        """(pixel, caption, meta, key, image id) of each decodable raw sample; ``count`` the others."""
        for raw in raws:
            try:
                image, caption, meta = decode_sample(raw, self.caption_template)
                pixel = self.preprocess(image)
            except SkipSample as e:
                count(e.reason, str(e))
                continue
            yield pixel, caption, meta, raw["__key__"], image_digest(raw)

    def _samples(self) -> Iterator[tuple]:
        """This pass's decoded samples (``_decoded``), skips counted in ``self._skipped``."""
        workers = self.loader_workers()
        if workers == 0:
            yield from self._decoded(self._my_raw_samples(), self._skipped)
            return
        if self.tokenize is not None:  # HF tokenizers' thread pool must not be used across fork
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ensure_short_worker_tempdir()  # a long TMPDIR made the workers drop their batches (a hang)
        # fork avoids pickling the caller's preprocess/tokenize closures into the workers
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        chunks = iter(
            DataLoader(
                _ShardWorkers(self, self.shards[self.rank :: self.world_size]),
                batch_size=None,
                num_workers=workers,
                multiprocessing_context=context,
                collate_fn=_as_is,
            )
        )
        try:
            for pixels, samples, skips in chunks:
                for reason, detail in skips:  # counted (and the first ones logged) here, as in-process
                    self._skipped(reason, detail)
                for pixel, sample in zip(pixels, samples, strict=True):
                    yield (pixel, *sample)
        finally:
            del chunks  # drops the DataLoader iterator now, which joins its workers (also when a
            # pass ends early: an interrupted eval)

    def __iter__(self) -> Iterator[dict]:
        self._skipped = SkipCounter()
        pixels, captions, metas, keys, image_ids = [], [], [], [], []
        for pixel, caption, meta, key, image_id in self._samples():
            pixels.append(pixel)
            captions.append(caption)
            metas.append(meta)
            keys.append(key)
            image_ids.append(image_id)
            if len(pixels) == self.batch_size:
                yield self._batch(pixels, captions, metas, keys, image_ids)
                pixels, captions, metas, keys, image_ids = [], [], [], [], []
        if pixels:
            yield self._batch(pixels, captions, metas, keys, image_ids)


class _ShardWorkers(IterableDataset):
    """A loader worker's share of a :class:`ValStream` pass: whole shards, every worker-count-th of
    ``shards`` (the rank's) from the worker's id, decoded in tar order; handed over in chunks of
    ``WORKER_CHUNK`` samples as (pixels [n, 3, S, S], [(caption, meta, key, image id)], [(reason,
    detail)]: the skips counted since the last chunk, the tar reader's included)."""

    def __init__(self, stream: ValStream, shards: list[str]):
        self.stream, self.shards = stream, shards

    def __iter__(self) -> Iterator[tuple]:
        info = get_worker_info()
        skips: list[tuple[str, str]] = []

        def count(reason: str, detail: str = "") -> None:
            skips.append((reason, detail))

        raws = (
            raw for url in self.shards[info.id :: info.num_workers] for raw in iter_raw_samples(url, count)
        )
        chunk: list[tuple] = []
        for sample in self.stream._decoded(raws, count):
            chunk.append(sample)
            if len(chunk) == WORKER_CHUNK:
                yield _hand_over(chunk, skips)
                chunk, skips[:] = [], []
        if chunk or skips:  # the last samples, or skips after the last one (a truncated shard's)
            yield _hand_over(chunk, skips)


def _hand_over(chunk: list[tuple], skips: list[tuple[str, str]]) -> tuple:
    # the pixels as one tensor: one shared-memory block per chunk, not one per image
    pixels = torch.stack([sample[0] for sample in chunk]) if chunk else torch.zeros(0)
    return pixels, [sample[1:] for sample in chunk], list(skips)


def _as_is(chunk):
    """The DataLoader's collate: a worker's chunk as it was made (its metadata untouched)."""
    return chunk


def distinct_shards(shards: list[str], warn: bool = True) -> list[str]:
    """``shards`` with each shard once, in order of first mention; ``warn``: say once per process
    which were named more than once.

    A held-out set is scored once per sample: a validation spec naming a shard twice (overlapping
    brace ranges joined with ``::``, the form that upsamples a training source) evaluated its
    samples twice, so ``eval/num_samples`` counted them twice and every metric weighted them double,
    without a word. A local shard is the same under another spelling of its path (``./v/0.tar``).
    """
    seen: set[str] = set()
    unique, repeated = [], []
    for url in shards:
        identity = os.path.realpath(url) if os.path.isfile(url) else url
        if identity in seen:
            repeated.append(url)
            continue
        seen.add(identity)
        unique.append(url)
    if repeated and warn and tuple(shards) not in _warned_repeats:
        _warned_repeats.add(tuple(shards))
        log.warning(
            "data.val_shards names %d shard(s) more than once (%s%s); each is evaluated once. "
            "Remove the repeats from data.val_shards to silence this.",
            len(repeated),
            ", ".join(repeated[:3]),
            ", ..." if len(repeated) > 3 else "",
        )
    return unique


def image_digest(raw: dict) -> str:
    """A digest of a decoded sample's encoded image bytes (a few KB, so cheap beside the decode)."""
    return hashlib.blake2b(raw[image_member(raw)], digest_size=16).hexdigest()


def video_identity(meta: dict) -> str | None:
    """The video a sample shows, from its metadata: its ``video_id`` (dataset tools' shards), else
    its ``url`` (plain img2dataset shards); None without either. Equal for two encodings of one
    thumbnail (a shard rebuilt at another size), which ``image_digest`` tells apart. Not the
    ``__key__``: img2dataset numbers samples by shard and position, so two builds share keys for
    different videos."""
    for field in ("video_id", "url"):
        value = meta.get(field)
        if isinstance(value, str) and value.strip():
            return f"{field}:{value.strip()}"
    return None


def label_values(value, field: str = "") -> list[str]:
    """A metadata value as zero-shot labels: a scalar is one, a list each of its elements (the
    classes ``collect_label_values`` makes of it), None none. Blank values are no label: the
    dataset tools write ``category_name: ""`` for an unknown category, which made "" a class
    (prompt "a thumbnail of .") that those samples were scored against. The ``tags`` field reads
    as training and the tag metrics read it (``labels.tag_values``): tags kept as one
    comma-separated string were one class, "cats, funny, compilation"; each tag in the form
    training ids it (``labels.normalize_tag``), so "Lets  Play" and "lets play" are one class as
    they are one positive. Other values: whitespace runs as one space, an integral float as its
    integer, NaN none ("Gaming " was a class beside "Gaming", NaN a class "nan"). ``category_id``
    reads as training reads it (``labels.category_label``): 20, "20" and 20.0 are one class (20.0,
    written by a pandas column with gaps, was a class beside 20), a fraction or -1 none."""
    if field == "tags":
        value = [normalize_tag(t) for t in tag_values(value)]
    elif field == "category_id":  # the classes are the ids `loss.positives=category` trains on
        value = category_label(value)
        value = None if value == -1 else value
    values = value if isinstance(value, list) else [value]
    texts = (_label_text(v) for v in values if v is not None)
    return [t for t in texts if t]


def _label_text(value) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):  # JSON NaN: pandas' missing value, no label (was class "nan")
            return ""
        if value.is_integer():
            value = int(value)
    return " ".join(str(value).split())


def iter_val_batches(
    shards: str,
    *,
    preprocess: Callable,
    tokenize: Callable[[list[str]], dict],
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    caption_template: str = "{title}",
    label_field: str = "category_name",
    num_workers: int = 0,
    local_world_size: int = 1,
) -> Iterator[dict]:
    """One pass over this rank's validation batches (see :class:`ValStream`)."""
    return iter(
        ValStream(
            shards,
            preprocess=preprocess,
            tokenize=tokenize,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            caption_template=caption_template,
            label_field=label_field,
            num_workers=num_workers,
            local_world_size=local_world_size,
        )
    )


def collect_label_values(shards: str, field: str = "category_name") -> list[str]:
    """Sorted distinct values of metadata ``field`` over all samples (zero-shot class names).

    List values (e.g. ``tags``) contribute each element. Only the ``.json`` members are read: a
    local plain tar's images and captions are seeked over (a held-out set is mostly JPEG bytes,
    and this runs at every start).
    """
    values: set[str] = set()
    skipped = SkipCounter()
    for url in check_openable(expand_shards(shards, "data.val_shards"), "data.val_shards"):
        for raw in iter_raw_samples(url, skipped, payloads={"json"}):
            try:
                value = decode_meta(raw).get(field)
            except SkipSample as e:
                skipped(e.reason, str(e))
                continue
            values.update(label_values(value, field))
    return sorted(values)
