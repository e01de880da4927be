"""Rolling a run back with train.resume=<path>, then resuming with train.resume=auto.

A run with checkpoints at steps 2, 4 and 6 is resumed from step 2 by path and crashes after
saving step 4 again; the next start (train.resume=auto, as a SLURM requeue or a rerun gets it)
must continue from that new step 4. Before, the old step 6 of the abandoned continuation was still
in checkpoints/ and was the newest: the run "resumed" there, declared itself done at step 6, and
the new continuation's steps 5 and 6 were never trained. A world-1 Trainer in this process
(tests/inprocess_trainer.py).
"""

from __future__ import annotations

import glob
import json
import os

import pytest

from inprocess_trainer import train

SCHEDULE = dict(eval__every=0, data__val_shards="", train__checkpoint_every=2, train__keep_checkpoints=3)


def _train_rows(path: str) -> dict[int, float]:
    with open(path, encoding="utf-8") as fh:
        return {row["step"]: row["train/loss"] for row in map(json.loads, fh) if "train/loss" in row}


class _Crash(Exception):
    pass


def _crash_before_step(trainer, step: int) -> None:
    step_fn = trainer.train_step

    def wrapped():
        if trainer.step + 1 == step:
            raise _Crash
        return step_fn()

    trainer.train_step = wrapped


def test_auto_resume_after_a_rollback_continues_the_new_branch(tiny_shards, tmp_path, single_process):
    from vutrain import checkpoint as ckpt

    run = str(tmp_path / "run")
    train(tiny_shards, run, steps=6, **SCHEDULE)
    first = _train_rows(os.path.join(run, "metrics.jsonl"))
    rollback = os.path.join(run, "checkpoints", "step_00000002")
    with pytest.raises(_Crash):
        train(
            tiny_shards,
            run,
            steps=6,
            on_trainer=lambda t: _crash_before_step(t, 5),
            train__resume=rollback,
            **SCHEDULE,
        )
    # The abandoned continuation's checkpoints are kept, out of the way of resume and retention.
    (aside,) = glob.glob(os.path.join(run, "checkpoints.replaced-*"))
    assert sorted(os.listdir(aside)) == ["step_00000004", "step_00000006"]
    assert ckpt.list_tags(os.path.join(run, "checkpoints")) == ["step_00000002", "step_00000004"]

    resumed_at = []
    train(tiny_shards, run, steps=6, on_trainer=lambda t: resumed_at.append(t.step), **SCHEDULE)
    assert resumed_at == [4]
    again = _train_rows(os.path.join(run, "metrics.jsonl"))
    assert list(again) == [1, 2, 3, 4, 5, 6]
    assert again == pytest.approx(first, abs=1e-5)  # the same steps, trained again
