"""Review 7 of the optimizer and schedule: no bug found; these pin what a user of open_clip expects.

- With gradient accumulation (train.global_batch_size=48 over micro-batches of 16 on one rank: 3
  micro-batches per step), under both train.accumulation modes, the warm-up + cosine schedule
  advances once per optimizer step, not per micro-batch: each logged train/lr is
  train.lr x lr_lambda(step), DeepSpeed took one optimizer step per 3 micro-steps, and the
  schedule ends at train.max_steps. A real Trainer in this process (tests/inprocess_trainer.py).
"""

from __future__ import annotations

import json
import os

import pytest

from inprocess_trainer import train

LR, WARMUP, STEPS, MICRO, GLOBAL = 1e-3, 2, 4, 16, 48


@pytest.mark.parametrize("accumulation", ["gradcache", "plain"])
def test_schedule_counts_optimizer_steps_not_micro_batches(
    accumulation, tiny_shards, tmp_path, single_process
):
    from vutrain.config import TrainConfig
    from vutrain.optim import lr_lambda

    seen = {}

    def keep(trainer):
        seen["trainer"] = trainer

    run_dir = str(tmp_path / "run")
    train(
        tiny_shards, run_dir, STEPS, on_trainer=keep,
        train__lr=LR, train__warmup_steps=WARMUP, train__micro_batch_size=MICRO,
        train__global_batch_size=GLOBAL, train__accumulation=accumulation, train__log_every=1,
        train__checkpoint_every=0, eval__every=0,
    )  # fmt: skip
    engine = seen["trainer"].engine
    assert engine.gradient_accumulation_steps() == GLOBAL // MICRO
    assert engine.global_steps == STEPS and engine.micro_steps == STEPS * GLOBAL // MICRO
    assert engine.lr_scheduler.last_epoch == STEPS
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if "train/lr" in line]
    schedule = TrainConfig(warmup_steps=WARMUP, max_steps=STEPS)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    # A schedule stepped per micro-batch would log 0.5, 0.5, 0.0, 0.0 (x LR) here.
    assert [r["train/lr"] for r in rows] == pytest.approx([LR * lr_lambda(s, schedule) for s in range(STEPS)])
