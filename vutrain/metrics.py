"""metrics.jsonl (one JSON object per line, always with "step"), TensorBoard when installed."""
from __future__ import annotations

import json
import logging
import math
import os

log = logging.getLogger(__name__)


class MetricsWriter:
    """Writes on rank 0 only; other ranks get a no-op writer so call sites need no rank checks."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception:  # tensorboard is optional: metrics.jsonl is the record
            self._tb = None

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so each step appears once."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path, encoding="utf-8") as fh:
            rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.writelines(rows)

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for key, value in values.items():
            row[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, allow_nan=True) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, float) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
