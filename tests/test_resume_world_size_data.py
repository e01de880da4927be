"""TrainStream resumed on another world size: the epoch's remaining samples, each exactly once.

In-process streams on real JPEG shards (one TrainStream per simulated rank, no process group: the
data plan is a pure function of seed, epoch, rank and worker). Criterion: the keys drawn before
the world-size change plus those drawn after it, up to the end of the epoch, have no duplicates
and are exactly the keys of an uninterrupted epoch; the next epoch starts normally.
"""

import os
from collections import Counter

import pytest
from stream_keys import draw_keys
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream, make_preprocess
from vutrain.data.synthetic import write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

IMAGE = 16
BATCH = 4  # at world 2; 8 shards x 12 samples = 96: worlds 1, 2 and 4 split it evenly


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshape_data")
    info = write_synthetic(str(root / "syn"), 96, 12, image_size=IMAGE, seed=3, val_samples=8)
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 300, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    return {
        "shards": info["train_shards"],
        "tokenize": make_tokenize(tok, 16),
        "preprocess": make_preprocess(processor),
    }


def _streams(data, world, workers=0, batch=BATCH):
    return [
        TrainStream(
            data["shards"],
            preprocess=data["preprocess"],
            tokenize=data["tokenize"],
            batch_size=batch,
            rank=r,
            world_size=world,
            num_workers=workers,
            seed=5,
            shuffle_buffer=10,
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("old,new,workers", [(2, 1, 0), (2, 4, 0), (1, 2, 1), (2, 1, 2)])
def test_epoch_continues_on_new_world_size(data, tmp_path, monkeypatch, old, new, workers):
    full = _streams(data, 1)
    epoch_keys = draw_keys(full, full[0].steps_per_epoch, tmp_path, monkeypatch)
    assert len(epoch_keys) == len(set(epoch_keys)) == 96  # the uninterrupted epoch: each sample once

    before = _streams(data, old, workers=workers)
    drawn = draw_keys(before, 3, tmp_path, monkeypatch)
    states = {"ranks": [s.state_dict() for s in before]}
    batch = BATCH * old // new  # the global batch is kept, as the trainer requires
    after = _streams(data, new, workers=workers, batch=batch)
    for s in after:
        s.load_state_dict(states)
    left = after[0].steps_per_epoch - after[0].batches_seen % after[0].steps_per_epoch
    assert all(s.batches_seen == after[0].batches_seen for s in after)
    rest = draw_keys(after, left, tmp_path, monkeypatch)
    together = drawn + rest
    assert len(together) == len(set(together)), "a sample was drawn twice in the epoch"
    assert set(together) == set(epoch_keys), "a sample of the epoch was never drawn"
    assert all(s.epoch == 1 for s in after)

    # A same-world-size resume in the middle of the remainder is still exact (bit for bit).
    mid = _streams(data, new, workers=workers, batch=batch)
    for s in mid:
        s.load_state_dict(states)
    draw_keys(mid, 1, tmp_path, monkeypatch)
    again = _streams(data, new, workers=workers, batch=batch)
    for s, m in zip(again, mid):
        s.load_state_dict(m.state_dict())
    assert draw_keys(again, left - 1, tmp_path, monkeypatch) == draw_keys(
        mid, left - 1, tmp_path, monkeypatch
    )


def test_second_change_within_the_epoch(data, tmp_path, monkeypatch):
    """2 ranks -> 1 -> 4 inside one epoch: still each sample of the epoch exactly once."""
    full = _streams(data, 1)
    epoch_keys = set(draw_keys(full, full[0].steps_per_epoch, tmp_path, monkeypatch))
    a = _streams(data, 2)
    keys = draw_keys(a, 2, tmp_path, monkeypatch)
    b = _streams(data, 1, batch=2 * BATCH)
    for s in b:
        s.load_state_dict({"ranks": [x.state_dict() for x in a]})
    keys += draw_keys(b, 3, tmp_path, monkeypatch)
    c = _streams(data, 4, batch=BATCH // 2)
    for s in c:
        s.load_state_dict({"ranks": [x.state_dict() for x in b]})
    left = c[0].steps_per_epoch - c[0].batches_seen % c[0].steps_per_epoch
    keys += draw_keys(c, left, tmp_path, monkeypatch)
    assert len(keys) == len(set(keys)) and set(keys) == epoch_keys


def test_changed_data_settings_are_refused(data):
    a = _streams(data, 2)
    states = {"ranks": [s.state_dict() for s in a]}
    b = TrainStream(
        data["shards"],
        preprocess=data["preprocess"],
        tokenize=data["tokenize"],
        batch_size=BATCH,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=6,
        shuffle_buffer=10,
    )
    with pytest.raises(ValueError, match="seed: saved 5, now 6"):
        b.load_state_dict(states)


def test_global_batch_size_derives_the_accumulation():
    """train.global_batch_size keeps the batch on any world size (a requeue on fewer nodes)."""
    from vutrain.config import ConfigError, load_config
    from vutrain.global_batch import with_global_batch

    cfg = load_config(
        None, ["data.train_shards=x.tar", "train.micro_batch_size=8", "train.global_batch_size=32"]
    )
    assert [with_global_batch(cfg, w).train.grad_accum_steps for w in (1, 2, 4)] == [4, 2, 1]
    assert with_global_batch(load_config(None, ["data.train_shards=x.tar"]), 2).train.grad_accum_steps == 1
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch_size 8 x world 3"):
        with_global_batch(cfg, 3)


def test_epoch_continues_without_redraws_over_a_truncated_shard(data, tmp_path, monkeypatch):
    """A shard cut short mid-file: the resume's replay of what the old ranks drew read its keys
    with tarfile's stream mode, which disagreed with the workers' reader there, so the replayed
    sequences drifted: samples drawn before the change were drawn again after it (and undrawn
    ones were taken as drawn). Now both read the shard alike."""
    import shutil

    src = os.path.dirname(data["shards"])  # the brace pattern is in the file name
    shutil.copytree(src, tmp_path / "train")
    spec = str(tmp_path / "train" / os.path.basename(data["shards"]))
    cut = tmp_path / "train" / "00001.tar"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2 + 100])
    damaged = dict(data, shards=spec)
    before = _streams(damaged, 2)
    drawn = draw_keys(before, 3, tmp_path, monkeypatch)
    states = {"ranks": [s.state_dict() for s in before]}
    skipped_before = sum((Counter(s.skipped()) for s in before), Counter())
    assert skipped_before["tar_error"] >= 1
    after = _streams(damaged, 1, batch=2 * BATCH)
    after[0].load_state_dict(states)
    # The run's skip count carries over (train/skipped_samples: "since the start of the run"); it
    # went back to 0 on a world-size change.
    assert after[0].skipped() == dict(skipped_before)
    left = after[0].steps_per_epoch - after[0].batches_seen % after[0].steps_per_epoch
    rest = draw_keys(after, left, tmp_path, monkeypatch)
    assert set(drawn) & set(rest) == set(), "samples drawn before the change were drawn again"
    assert len(rest) == len(set(rest)) and after[0].epoch == 1
