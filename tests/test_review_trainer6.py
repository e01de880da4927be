"""The training loop's metrics rows: every step's eval once, also across a resume that trains nothing."""

from __future__ import annotations

import os

import pytest

from vutrain.metrics import read_metrics

from inprocess_trainer import DIST_ENV, train


class _KilledAfterCheckpoint(Exception):
    """Stands for a kill (node failure, time limit) right after a periodic checkpoint."""


def _killed_after_checkpoint_of(step: int):
    def hook(trainer):
        save = trainer.save

        def save_then_die():
            save()
            if trainer.step == step:
                raise _KilledAfterCheckpoint

        trainer.save = save_then_die

    return hook


def test_a_resume_at_a_lowered_max_steps_does_not_log_the_step_eval_twice(
    tiny_shards, tmp_path, single_process
):
    """A run killed after its periodic checkpoint at step 2 (saved after step 2's eval), resumed with
    train.max_steps=2, trains nothing and ends there. Its final eval ran step 2's eval again and
    metrics.jsonl had two eval rows for step 2. Now the logged eval is the final one: one eval row
    per step, returned as the run's last eval, and the run still finishes (done.json, final checkpoint)."""
    run_dir = str(tmp_path / "run")
    with pytest.raises(_KilledAfterCheckpoint):
        train(tiny_shards, run_dir, steps=4, on_trainer=_killed_after_checkpoint_of(2))
    for key in DIST_ENV:  # as a fresh process sees it
        os.environ.pop(key, None)
    last_eval = train(tiny_shards, run_dir, steps=2)
    evals = [row for row in read_metrics(run_dir) if any(key.startswith("eval/") for key in row)]
    assert [row["step"] for row in evals] == [2], evals
    assert last_eval and last_eval == {k: v for k, v in evals[0].items() if k.startswith("eval/")}
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    assert [row["step"] for row in read_metrics(run_dir) if "train/loss" in row] == [1, 2]
