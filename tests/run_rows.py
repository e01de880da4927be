"""The rows of a run's metrics.jsonl: the keys of a training row as the trainer writes them (README,
"The run directory") and a reader of the rows a run wrote."""

from __future__ import annotations

import json
import os

# Wall-clock columns of a training row: they differ between any two runs.
TIMING_KEYS = [
    "train/samples_per_s",
    "train/samples_per_s_per_rank",
    "train/step_time",
    "train/data_time",
    "train/forward_time",
    "train/loss_time",
    "train/backward_time",
    "train/optimizer_time",
]
TRAIN_KEYS = [
    "train/loss",
    "train/lr",
    "train/logit_scale",
    *TIMING_KEYS,
    "train/skipped_samples",
    "train/overflow_skipped_steps",
    "train/zeroed_nonfinite_grad_steps",
    "train/epoch",
    "train/grad_norm",
    "train/grad_norm_max",
    "train/nonfinite_skipped",
]


def metrics_rows(run_dir: str, drop=()) -> list[dict]:
    """Every row of `run_dir`'s metrics.jsonl, in order, without the keys in `drop`."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in fh]
