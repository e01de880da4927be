"""metrics.jsonl and its TensorBoard mirror on resume: each step appears once (vutrain/metrics.py)."""

from __future__ import annotations

import json
import os
import time

import pytest


def test_resume_hides_the_lost_segments_tensorboard_events(tmp_path):
    """A run logged steps 1-5, was killed and resumed from its step-3 checkpoint, then logged 4-6.
    metrics.jsonl moved rows 4 and 5 aside; TensorBoard kept showing them beside the new 4 and 5
    (the curve ran to 5 and back to 4) until the resumed writer purged them."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vutrain.metrics import MetricsWriter

    run = str(tmp_path)
    lost = MetricsWriter(run, enabled=True)
    for step in range(1, 6):
        lost.write(step, {"train/loss": 10.0 + step})
    lost.close()
    # TensorBoard reads event files in name order, and a name holds the second it was made, then a
    # per-process counter (not zero-padded): the resumed run's files must come after the lost ones.
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.05)
    resumed = MetricsWriter(run, enabled=True)
    assert resumed.truncate_after(3) == 2
    for step in range(4, 7):
        resumed.write(step, {"train/loss": 20.0 + step})
    resumed.close()

    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    expected = [(1, 11.0), (2, 12.0), (3, 13.0), (4, 24.0), (5, 25.0), (6, 26.0)]
    assert [(r["step"], r["train/loss"]) for r in rows] == expected
    events = EventAccumulator(os.path.join(run, "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == expected
