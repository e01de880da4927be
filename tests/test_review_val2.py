"""The validation set's data path: every held-out sample read once per eval across ranks, bad
samples skipped and counted the same way at every eval, and a shard named twice read once."""

from __future__ import annotations

import collections
import json
import logging
import tarfile

import pytest
import torch
from tar_shards import rewrite_members
from tiny_eval import evals_on_rank, train_tokenizer

from vutrain.data.synthetic import write_synthetic
from vutrain.data.val import ValStream

from helpers_dist import run_distributed


def _preprocess(image):
    return torch.zeros(3, 4, 4)


def _tokenize(captions):
    return {
        "input_ids": torch.zeros(len(captions), 2, dtype=torch.long),
        "attention_mask": torch.ones(len(captions), 2, dtype=torch.long),
    }


def _break_two_samples(shard: str) -> None:
    """Rewrite ``shard`` with its first sample's JPEG undecodable and its second without a caption
    (no ``.txt``, no title in its ``.json``)."""
    with tarfile.open(shard) as tar:
        first, second = sorted({name.split(".")[0] for name in tar.getnames()})[:2]

    def edit(name: str, payload: bytes) -> bytes | None:
        key, ext = name.split(".")
        if key == first and ext == "jpg":
            return b"not a jpeg"
        if key == second and ext == "txt":
            return None
        if key == second and ext == "json":
            meta = json.loads(payload)
            del meta["title"], meta["caption"]
            return json.dumps(meta).encode()
        return payload

    rewrite_members(shard, edit)


def _passes(spec: str, world_size: int) -> tuple[collections.Counter, list[int], int]:
    """(keys read over every rank, samples per rank, samples skipped over every rank) of one eval."""
    keys, per_rank, skipped = collections.Counter(), [], 0
    for rank in range(world_size):
        stream = ValStream(
            spec, preprocess=_preprocess, tokenize=_tokenize, batch_size=2, rank=rank, world_size=world_size
        )
        mine = [k for batch in stream for k in batch["keys"]]
        assert mine == [k for batch in stream for k in batch["keys"]]  # the same order at every eval
        keys.update(mine)
        per_rank.append(len(mine))
        skipped += sum(stream.skipped().values())
    return keys, per_rank, skipped


@pytest.mark.parametrize(
    "val_samples, shard_size, world_size",
    [(7, 3, 2), (7, 7, 2), (7, 7, 3), (3, 1, 4)],  # uneven split, one shard, shards < ranks, a rank idle
)
def test_every_validation_sample_is_read_once_and_bad_ones_counted_once(
    tmp_path, val_samples, shard_size, world_size
):
    info = write_synthetic(str(tmp_path), 1, shard_size, image_size=8, val_samples=val_samples)
    first = str(tmp_path / "val" / "00000.tar")
    if shard_size > 1:
        _break_two_samples(first)
    keys, per_rank, skipped = _passes(info["val_shards"], world_size)
    bad = 2 if shard_size > 1 else 0
    assert all(n == 1 for n in keys.values())
    assert len(keys) == val_samples - bad and skipped == bad
    assert sum(per_rank) == val_samples - bad
    if val_samples < world_size:
        assert per_rank[-1] == 0


def test_a_validation_shard_named_twice_is_read_once(tmp_path, caplog, monkeypatch):
    """Overlapping brace ranges joined with `::` (the form that upsamples a training source) made
    every rank read shard 00001 twice: its samples were evaluated twice, so eval/num_samples
    counted 9 of a 6-sample set and the metrics weighted them double, without a word."""
    info = write_synthetic(str(tmp_path), 1, 2, image_size=8, val_samples=6)
    val = tmp_path / "val"
    spec = f"{val}/{{00000..00001}}.tar::./{val.relative_to(tmp_path)}/{{00001..00002}}.tar"
    monkeypatch.chdir(tmp_path)  # the repeat spelled as another path to the same file
    with caplog.at_level(logging.WARNING, logger="vutrain.data.val"):
        for world_size in (1, 2, 3, 4):
            keys, _, _ = _passes(spec, world_size)
            assert len(keys) == 6 and all(n == 1 for n in keys.values()), (world_size, keys)
    assert collections.Counter(_passes(info["val_shards"], 2)[0]) == keys
    warnings = [r.getMessage() for r in caplog.records if "more than once" in r.getMessage()]
    assert len(warnings) == 1  # rank 0 says it once per process, not at every eval
    assert "00001.tar" in warnings[0] and "data.val_shards" in warnings[0]


@pytest.mark.slow
def test_two_gloo_ranks_score_each_sample_once_at_every_eval(tmp_path):
    """7 held-out samples in shards of 3, 3 and 1 (two bad ones in the first), the spec naming
    shard 00001 twice: both ranks' two evals cover the same 5 samples and count 2 skipped."""
    info = write_synthetic(str(tmp_path / "data"), 16, 3, image_size=16, val_samples=7)
    val = tmp_path / "data" / "val"
    _break_two_samples(str(val / "00000.tar"))
    tok_dir = train_tokenizer(info["train_shards"], str(tmp_path / "tok"))
    spec = f"{val}/{{00000..00001}}.tar::{val}/{{00001..00002}}.tar"
    rows = run_distributed(evals_on_rank, 2, spec, tok_dir, 2)
    assert rows[0] == rows[1]
    for row in rows[0]:
        assert row["eval/num_samples"] == 5
        assert row["eval/skipped_samples"] == 2
    assert rows[0][0] == rows[0][1]  # the same samples, in the same order: the same metrics
