"""Checkpoint review 14 (real DeepSpeed engines on gloo ranks, real checkpoint files): a resume on
another world size in the middle of a logging interval brings back all of the interval's state
(its loss-term sums and largest gradient norm too), and a save makes metrics.jsonl durable before
its marker says the checkpoint is complete."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_modules import TwoLayer
from zero_engines import small_engine

from helpers_dist import run_distributed

# What Trainer.state_dict() holds between two logging steps (train.log_every > 1), besides the data
# position: rank 0's values, as world.json records the interval for the rank that logs it. An inf
# norm is a step the non-finite guard skipped (grad_norm.py), which JSON must carry as well.
INTERVAL_STATE = {
    "step": 3,
    "nonfinite_in_row": 0,
    "interval": [2.5, 3.0, 1.0],
    "zeroed_grad_steps": [1, 0],
    "eval_pending": False,
    "finished": False,
    "interval_wall": 0.75,
    "interval_steps": 3,
    "interval_terms": {"align": 1.25, "uniform": -3.5},
    "interval_grad_norm_max": float("inf"),
}


def _save_on_two_ranks(rank, world, run_dir):
    """Rank 0 logged a row before the save (as the trainer does at a logging step); returns the
    paths rank 0 fsynced, in order."""
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    torch.manual_seed(0)
    engine = small_engine(TwoLayer(8), stage=2, world=world, micro=2)
    for _ in range(3):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    synced = []
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": 3, "train/loss": 1.0}) + "\n")
        real_fsync = os.fsync

        def recording_fsync(fd):  # the real fsync, with the path it flushed noted
            synced.append(os.readlink(f"/proc/self/fd/{fd}"))
            real_fsync(fd)

        os.fsync = recording_fsync
    try:
        state = dict(INTERVAL_STATE, data={"rank": rank})
        ckpt.save_checkpoint(engine, run_dir, 3, state, rank, keep=1)
    finally:
        if rank == 0:
            os.fsync = real_fsync
    return synced


def _resume(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = small_engine(TwoLayer(8), stage=2, world=world, micro=4)  # the global batch of 2 x 2
    state = ckpt.load_checkpoint(engine, *ckpt.resolve_resume("auto", run_dir, verbose=False), rank=rank)
    state.pop("rng", None)
    return state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(run dir, rank 0's fsynced paths) of a checkpoint saved at step 3 by 2 ranks."""
    run_dir = str(tmp_path_factory.mktemp("ckpt14") / "run")
    synced = run_distributed(_save_on_two_ranks, 2, run_dir, init_process_group=False)[0]
    return run_dir, synced


def test_a_resume_on_another_world_size_keeps_the_whole_logging_interval(saved):
    """Saved by 2 ranks between two logging steps, resumed on 1: every part of the interval comes
    back. Before, world.json left out the loss terms' sums and the interval's largest gradient norm,
    so the next row's train/grad_norm_max (a spike before the resume was lost) and
    train/align/uniform covered only the steps after the resume, while train/loss covered all."""
    run_dir, _ = saved
    (state,) = run_distributed(_resume, 1, run_dir, init_process_group=False)
    assert state.pop("data") == {"ranks": [{"rank": 0}, {"rank": 1}]}
    assert state == INTERVAL_STATE


def test_metrics_jsonl_is_flushed_to_disk_before_the_marker(saved):
    """A machine crash (not a killed process) loses what is still in the page cache: the marker of
    step 3 could survive while metrics.jsonl came back without the rows up to step 3, and the
    resumed run, which logs from step 4 on, never wrote them again (a silent gap in the curves).
    Before, the save fsynced the checkpoint's files only."""
    run_dir, synced = saved
    marker = os.path.join("step_00000003.tmp", "COMPLETE.json.tmp")
    marker_at = next(i for i, p in enumerate(synced) if p.endswith(marker))
    metrics = os.path.realpath(os.path.join(run_dir, "metrics.jsonl"))
    assert metrics in synced[:marker_at], synced
