"""Accounting of non-finite steps in the metrics rows, with real Trainers in this process (world 1,
tests/inprocess_trainer.py: real DeepSpeed engines on the CPU, real shards and checkpoints).

- A step whose gradients the optimizer zeroes for a NaN gradient under a finite loss (bf16 at
  ZeRO-1/2 through grad_clip.py's device-side clip, ZeRO-0 with fp32 weights through its step
  pre-hook) is counted in `train/zeroed_nonfinite_grad_steps` and warned about once, across a
  resume; a step the non-finite guard skipped (a NaN loss) is not counted there. Before: counted
  nowhere, no warning.
- GradCache (one loss over the step's k micro-batches) counts a skipped step as k skipped
  micro-batches, as plain accumulation does: `train/nonfinite_skipped` and the
  `train.max_nonfinite_steps` streak agree between the two. Before: 1 per skipped step.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from inprocess_trainer import train

QUIET = dict(eval__every=0, data__val_shards="", train__log_every=1)
ZEROED = "train/zeroed_nonfinite_grad_steps"


def _rows(run_dir: str) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return {r["step"]: r for r in map(json.loads, fh) if "train/loss" in r}


def _poison(nan_grad_steps: set[int] = frozenset(), nan_loss_steps: set[int] = frozenset()):
    """on_trainer hook: at the given (1-based) steps one parameter's gradient becomes NaN under a
    finite loss, or the loss itself becomes NaN. During step n's work `trainer.step` is n - 1."""

    def hook(trainer) -> None:
        param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
        param.register_hook(
            lambda g: torch.full_like(g, float("nan")) if trainer.step + 1 in nan_grad_steps else g
        )
        inner = trainer.loss_fn.forward

        def loss(*args, **kwargs):
            value = inner(*args, **kwargs)
            return value * float("nan") if trainer.step + 1 in nan_loss_steps else value

        trainer.loss_fn.forward = loss

    return hook


def _warnings(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize(
    "setup",
    [
        dict(train__precision="bf16", train__zero_stage=1, train__grad_clip=1.0),
        dict(train__precision="bf16", train__zero_stage=2, train__grad_clip=0.0),
        dict(train__precision="fp32", train__zero_stage=0, train__grad_clip=1.0),
    ],
    ids=["bf16-zero1-clip", "bf16-zero2-noclip", "fp32-zero0"],
)
def test_a_zeroed_nonfinite_gradient_step_is_counted_and_warned_across_a_resume(
    tiny_shards, tmp_path, single_process, caplog, setup
):
    """A NaN gradient under a finite loss at step 2 and a NaN loss at step 3 (the guard's skip), 4
    steps, then resumed to 5 from the step-4 checkpoint: `train/zeroed_nonfinite_grad_steps` is
    0, 1, 1, 1, 1 (once per step though DeepSpeed clips 2 parameter groups; the guard's step not
    counted), the losses after stay finite, and one warning names step 2."""
    run_dir = str(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="vutrain")
    runs = dict(QUIET, train__checkpoint_every=4, **setup)
    train(tiny_shards, run_dir, steps=4, on_trainer=_poison({2}, {3}), **runs)
    train(tiny_shards, run_dir, steps=5, **runs)
    rows = _rows(run_dir)
    assert {s: r[ZEROED] for s, r in rows.items()} == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1}
    assert {s: r["train/nonfinite_skipped"] for s, r in rows.items()} == {1: 0, 2: 0, 3: 1, 4: 0, 5: 0}
    assert all(r["train/overflow_skipped_steps"] == 0 for r in rows.values())
    assert all(torch.isfinite(torch.tensor(rows[s]["train/loss"])) for s in (4, 5)), "finite weights"
    warned = _warnings(caplog, "non-finite gradient under a finite loss")
    assert len(warned) == 1 and "1 optimizer step(s) by step 2" in warned[0], warned


@pytest.mark.parametrize("accumulation", ["plain", "gradcache"])
def test_a_skipped_step_counts_its_micro_batches_under_both_accumulations(
    tiny_shards, tmp_path, single_process, accumulation
):
    """2 micro-batches per step, every loss of step 2 NaN: `train/nonfinite_skipped` is 2 at step 2
    under plain accumulation and GradCache alike (GradCache said 1), and the train loss after is
    finite."""
    run_dir = str(tmp_path / "run")
    train(
        tiny_shards,
        run_dir,
        steps=3,
        on_trainer=_poison(nan_loss_steps={2}),
        train__grad_accum_steps=2,
        train__micro_batch_size=8,
        train__accumulation=accumulation,
        train__checkpoint_every=0,
        **QUIET,
    )
    rows = _rows(run_dir)
    assert {s: r["train/nonfinite_skipped"] for s, r in rows.items()} == {1: 0, 2: 2, 3: 0}
    assert all(torch.isfinite(torch.tensor(rows[s]["train/loss"])) for s in (1, 3))


@pytest.mark.parametrize("accumulation", ["plain", "gradcache"])
def test_max_nonfinite_steps_means_micro_batches_under_both_accumulations(
    tiny_shards, tmp_path, single_process, accumulation
):
    """train.max_nonfinite_steps=2 with 2 micro-batches per step: one fully non-finite step (2
    non-finite micro-batches in a row) stops both runs at step 2. GradCache trained on (its streak
    grew by 1 per step)."""
    from vutrain.trainer import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row by step 2"):
        train(
            tiny_shards,
            str(tmp_path / "run"),
            steps=4,
            on_trainer=_poison(nan_loss_steps={2}),
            train__grad_accum_steps=2,
            train__micro_batch_size=8,
            train__accumulation=accumulation,
            train__max_nonfinite_steps=2,
            train__checkpoint_every=0,
            **QUIET,
        )
