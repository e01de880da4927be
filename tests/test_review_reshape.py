"""Review: resuming on another world size (data remainder, checkpoint reshape).

Real JPEG shards, in-process TrainStreams (one per simulated rank; the data plan is a pure function
of seed, epoch, rank and worker).
"""

import glob
import os
from collections import Counter

import pytest
from stream_keys import draw_keys
from transformers import CLIPImageProcessor

from vutrain.data import TrainStream, make_preprocess
from vutrain.data.synthetic import write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

IMAGE = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("review_reshape")
    info = write_synthetic(str(root / "syn"), 8, 4, image_size=IMAGE, seed=3, val_samples=4)
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 300, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    a, b = sorted(glob.glob(str(root / "syn" / "train" / "*.tar")))[:2]
    return {
        "spec": f"{a}::{b}::{a}",  # a upsampled: listed twice
        "tokenize": make_tokenize(tok, 16),
        "preprocess": make_preprocess(processor),
    }


def _streams(data, world, batch, seed, workers=0):
    return [
        TrainStream(
            data["spec"],
            preprocess=data["preprocess"],
            tokenize=data["tokenize"],
            batch_size=batch,
            rank=r,
            world_size=world,
            num_workers=workers,
            seed=seed,
            shuffle_buffer=3,
            num_samples=12,
        )
        for r in range(world)
    ]


@pytest.mark.parametrize("seed,old,new", [(4, 1, 2), (5, 1, 2), (4, 2, 1), (5, 2, 1)])
def test_upsampled_shard_keeps_both_copies_in_the_remainder(data, tmp_path, monkeypatch, seed, old, new):
    """a::b::a (4 samples a shard), global batch 4, one batch drawn, then old -> new ranks.

    Criterion: 8 samples are left, so 2 batches per rank; the keys drawn before plus after the
    change, counted with multiplicity, equal those of an uninterrupted epoch (each key of a twice,
    of b once; on one new rank its slice holds both copies of a); then a same-world resume in the
    middle of the remainder replays the same keys.
    """
    full = _streams(data, 1, 4, seed)
    epoch_keys = Counter(draw_keys(full, full[0].steps_per_epoch, tmp_path, monkeypatch))
    assert sum(epoch_keys.values()) == 12 and sorted(set(epoch_keys.values())) == [1, 2]

    before = _streams(data, old, 4 // old, seed)
    drawn = draw_keys(before, 1, tmp_path, monkeypatch)
    states = {"ranks": [s.state_dict() for s in before]}
    after = _streams(data, new, 4 // new, seed)
    for s in after:
        s.load_state_dict(states)
    left = after[0].steps_per_epoch - after[0].batches_seen % after[0].steps_per_epoch
    assert left == 2, f"{left} batches per rank left of the epoch's 8 remaining samples, want 2"
    rest = draw_keys(after, left, tmp_path, monkeypatch)
    assert Counter(drawn + rest) == epoch_keys

    mid = _streams(data, new, 4 // new, seed)
    for s in mid:
        s.load_state_dict(states)
    draw_keys(mid, 1, tmp_path, monkeypatch)
    again = _streams(data, new, 4 // new, seed)
    for s, m in zip(again, mid):
        s.load_state_dict(m.state_dict())
    assert draw_keys(again, 1, tmp_path, monkeypatch) == draw_keys(mid, 1, tmp_path, monkeypatch)


def _reshape_round_trip(rank: int, world: int, ckpt_dir: str) -> dict:
    import torch
    from tiny_modules import TwoLayer

    from vutrain.checkpoint_reshape import load_reshaped, save_world_info
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    engine = build_engine(
        TwoLayer(), TrainConfig(micro_batch_size=2, zero_stage=0), world, torch.device("cpu")
    )
    engine.save_checkpoint(ckpt_dir, tag="step_00000004")
    state = {"step": 4, "nonfinite_in_row": 1, "zeroed_grad_steps": [3, 2], "data": None}
    save_world_info(engine, os.path.join(ckpt_dir, "step_00000004"), state)
    return load_reshaped(engine, ckpt_dir, "step_00000004")


def test_a_reshaped_resume_keeps_the_zeroed_gradient_step_count(tmp_path):
    """A resume on another world size rebuilds the trainer state from world.json, which left out the
    zeroed-gradient step count: train/zeroed_nonfinite_grad_steps restarted at 0 (and warned again)."""
    from helpers_dist import run_distributed

    (restored,) = run_distributed(_reshape_round_trip, 1, str(tmp_path / "checkpoints"))
    assert restored["zeroed_grad_steps"] == [3, 2] and restored["nonfinite_in_row"] == 1
