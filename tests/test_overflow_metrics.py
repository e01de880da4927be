"""Optimizer steps DeepSpeed skips on a gradient overflow are counted in the metrics and warned about.

DeepSpeed skips a step whose gradients hold an inf or NaN (fp16's loss scaler; ZeRO-1/2 in any
precision, with a finite loss that vutrain's non-finite guard lets through) and says nothing outside
fp16: the weights and the LR schedule stand still while the step counter moves on. A world-1
Trainer in this process (tests/inprocess_trainer.py), fp32 ZeRO-2 on the CPU; one parameter's
gradient is made inf in the second backward.
"""

from __future__ import annotations

import json
import logging
import os

import torch

from inprocess_trainer import train


def _poison_second_backward(trainer) -> None:
    param = next(p for p in trainer.engine.module.parameters() if p.requires_grad)
    calls = []

    def hook(grad):
        calls.append(1)
        return torch.full_like(grad, float("inf")) if len(calls) == 2 else grad

    param.register_hook(hook)


def test_a_step_deepspeed_skips_on_overflow_is_counted_and_warned(
    tiny_shards, tmp_path, single_process, caplog
):
    run_dir = str(tmp_path / "run")
    caplog.set_level(logging.WARNING, logger="vutrain")
    schedule = dict(train__zero_stage=2, train__log_every=1, eval__every=0, data__val_shards="")
    train(tiny_shards, run_dir, steps=4, on_trainer=_poison_second_backward, **schedule)
    train(tiny_shards, run_dir, steps=5, **schedule)  # resumed: the count is the run's
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    skipped = {r["step"]: r["train/overflow_skipped_steps"] for r in rows if "train/loss" in r}
    assert skipped == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1}
    # The loss was finite: it is no non-finite micro-batch.
    assert all(r["train/nonfinite_skipped"] == 0 for r in rows if "train/loss" in r)
    warnings = [r.getMessage() for r in caplog.records if "gradient overflow" in r.getMessage()]
    assert len(warnings) == 1 and "skipped 1 optimizer step(s) by step 2" in warnings[0], warnings
