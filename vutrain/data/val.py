"""Validation batches: one finite, ordered pass; each rank reads a disjoint part.

With at least as many shards as ranks, rank ``r`` reads shards ``r, r + world, ...``; with
fewer shards every rank reads all of them and keeps the samples with index ``i % world == r``
(index over raw samples, so each corrupt sample is counted by exactly one rank). Ranks may get
different numbers of batches; the last batch may be smaller than ``batch_size``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator

import torch

from .captions import template_fields
from .labels import category_label, normalize_tag, tag_values
from .samples import SkipCounter, SkipSample, decode_meta, decode_sample, image_member, iter_raw_samples
from .shards import check_openable, expand_shards

log = logging.getLogger(__name__)
_warned_repeats: set[tuple[str, ...]] = set()


class ValStream:
    """Iterable over this rank's validation batches (re-iterable; counts reset per pass).

    Each batch: ``pixel_values`` float[B, 3, S, S], ``input_ids`` / ``attention_mask``
    long[B, L], ``labels`` list[str] (the ``label_field`` metadata value, lists joined by ", ",
    "" when absent), ``label_sets`` list[list[str]] (the value's elements: one for a scalar, each
    element of a list, none when absent; what zero-shot scores against), ``tags`` list[list[str]]
    (the ``tags`` metadata, ``labels.tag_values``: a list, or a comma-separated string split, as
    training's tag positives read it; empty when absent; for the multi-label retrieval metrics),
    ``keys`` list[str] and ``image_ids`` list[str] (a digest of the encoded image bytes: equal for
    the same file, so recall can count identical images as one). A sample without a label still
    counts for retrieval; zero-shot leaves it out.
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
    ):
        template_fields(caption_template)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = distinct_shards(
            check_openable(expand_shards(shards, "data.val_shards"), "data.val_shards"), warn=rank == 0
        )
        self.preprocess, self.tokenize, self.batch_size = preprocess, tokenize, batch_size
        self.rank, self.world_size = rank, world_size
        self.caption_template, self.label_field = caption_template, label_field
        self._skipped = SkipCounter()

    def skipped(self) -> dict[str, int]:
        """Samples skipped by this rank in the current/last pass, by reason."""
        return dict(self._skipped)

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
        )
        return batch

    def __iter__(self) -> Iterator[dict]:
        self._skipped = SkipCounter()
        pixels, captions, metas, keys, image_ids = [], [], [], [], []
        for raw in self._my_raw_samples():
            try:
                image, caption, meta = decode_sample(raw, self.caption_template)
                pixel = self.preprocess(image)
            except SkipSample as e:
                self._skipped(e.reason, str(e))
                continue
            pixels.append(pixel)
            captions.append(caption)
            metas.append(meta)
            keys.append(raw["__key__"])
            image_ids.append(image_digest(raw))
            if len(pixels) == self.batch_size:
                yield self._batch(pixels, captions, metas, keys, image_ids)
                pixels, captions, metas, keys, image_ids = [], [], [], [], []
        if pixels:
            yield self._batch(pixels, captions, metas, keys, image_ids)


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
