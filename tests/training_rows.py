"""Short in-process runs that only train and log (no checkpoint, no eval, no val shards), and the
training rows they log, for the tests of what a training row holds (loss terms, gradient norms):
the real Trainer of tests/inprocess_trainer.py, the real metrics.jsonl read by tests/run_rows.py."""

from __future__ import annotations

from run_rows import metrics_rows

from inprocess_trainer import train

# Nothing but training: no checkpoint to write, no eval to run, so no held-out shards to read.
TRAIN_ONLY = {"train__checkpoint_every": 0, "eval__every": 0, "data__val_shards": ""}


def training_rows(shards: dict, run_dir: str, steps: int, on_trainer=None, **fields) -> list[dict]:
    """Train `steps` steps into `run_dir` with TRAIN_ONLY and `fields` (`train__zero_stage=0`, as
    inprocess_trainer.train takes them; the test holds conftest's `single_process`), `on_trainer`
    hooked in before training; the rows of its metrics.jsonl that log training (train/loss), in order."""
    train(shards, run_dir, steps, on_trainer=on_trainer, **{**TRAIN_ONLY, **fields})
    return [row for row in metrics_rows(run_dir) if "train/loss" in row]
