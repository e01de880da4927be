"""A shard without readable samples (img2dataset writes an empty tar when every download of a shard
failed) must not stop training when it is a worker's whole split; resume and the world-size
reshape's replay must follow the worker to the shards it reads instead."""

import os
import tarfile

import pytest
import torch
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream
from vutrain.data.epoch_plan import worker_shards
from vutrain.data.epoch_remainder import SAMPLE_LOG_ENV, ShardKeys, consumed_in_epoch
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.shards import expand_shards
from vutrain.data.synthetic import write_synthetic

WORLD, SEED = 5, 3  # 5 shards (one empty) on 5 ranks: every rank's split is one shard


def _tokenize(texts):
    return {"input_ids": torch.zeros(len(texts), 4, dtype=torch.long)}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("empty_shard")
    write_synthetic(str(root), 48, 12, image_size=16, seed=1, val_samples=0)
    with tarfile.open(root / "train" / "00004.tar", "w"):  # no members: every download failed
        pass
    return str(root / "train" / "{00000..00004}.tar")


def _stream(spec, rank):
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return TrainStream(
        spec,
        preprocess=make_fast_preprocess(processor),
        tokenize=_tokenize,
        batch_size=2,
        rank=rank,
        world_size=WORLD,
        num_workers=0,
        seed=SEED,
        shuffle_buffer=6,
        num_samples=48,
    )


def _empty_rank(spec, epoch=0):
    shards = expand_shards(spec)
    return next(
        r for r in range(WORLD) if worker_shards(shards, epoch, r, WORLD, 0, 1, SEED, True) == [shards[4]]
    )


def test_a_worker_whose_shards_are_empty_reads_its_rank_s_then_all_shards(spec, tmp_path, monkeypatch):
    rank = _empty_rank(spec)
    straight = _stream(spec, rank)
    assert straight.steps_per_epoch == 4
    expected = [next(straight) for _ in range(8)]  # two epochs, no "hold no readable samples" error
    assert all(b["pixel_values"].shape == (2, 3, 16, 16) for b in expected)

    # Exact resume in the middle of the fallback.
    first = _stream(spec, rank)
    for _ in range(3):
        next(first)
    resumed = _stream(spec, rank)
    resumed.load_state_dict(first.state_dict())
    for want in expected[3:]:
        assert torch.equal(next(resumed)["pixel_values"], want["pixel_values"])

    # The world-size reshape replays the same draws (the samples this rank consumed).
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(tmp_path / "keys"))
    logged = _stream(spec, rank)
    for _ in range(3):
        next(logged)
    drawn = open(f"{tmp_path}/keys.{os.getpid()}").read().split()
    assert len(drawn) == 6 and not any(k.startswith("00004.tar/") for k in drawn)
    consumed = consumed_in_epoch([logged.state_dict()], logged.shards, 0, ShardKeys())
    assert sorted(drawn) == sorted(f"{os.path.basename(url)}/{key}" for url, key in consumed)
