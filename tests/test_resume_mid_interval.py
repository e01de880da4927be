"""A resume between two logging steps, at an eval step, gives the metrics an uninterrupted run gives.

train.log_every=5, train.checkpoint_every=3, eval.every=4: a SIGUSR1 before step 7 pre-empts the
run at step 8, mid logging interval and before step 8's eval. Before, the resumed run's row at
step 10 averaged the loss of steps 9-10 only (the interval's sums of steps 6-8 were not in the
checkpoint), and the eval of step 8 never ran. A world-1 Trainer in this process
(tests/inprocess_trainer.py).
"""

from __future__ import annotations

import json
import os

import pytest
from step_signals import signal_before_step

from inprocess_trainer import train

SCHEDULE = dict(train__log_every=5, train__checkpoint_every=3, eval__every=4)


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def test_preempted_mid_interval_at_an_eval_step_resumes_the_same_metrics(
    tiny_shards, tmp_path, single_process
):
    from vutrain.trainer import Preempted

    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    train(tiny_shards, full, steps=10, **SCHEDULE)
    with pytest.raises(Preempted) as raised:
        train(tiny_shards, split, steps=10, on_trainer=lambda t: signal_before_step(t, 7), **SCHEDULE)
    assert raised.value.step == 8  # not a logging step, an eval step
    train(tiny_shards, split, steps=10, **SCHEDULE)

    def column(rows, key):
        return {r["step"]: r[key] for r in rows if key in r}

    expected, got = _rows(full), _rows(split)
    for key in ("train/loss", "train/nonfinite_skipped", "eval/i2t_r1", "eval/t2i_r1", "eval/num_samples"):
        assert column(got, key) == pytest.approx(column(expected, key), abs=1e-5), key
    assert list(column(got, "train/loss")) == [5, 10]
    assert list(column(got, "eval/i2t_r1")) == [4, 8, 10]  # every step's eval, once


def test_rerunning_a_finished_run_changes_nothing(tiny_shards, tmp_path, single_process):
    """The same command again (train.resume=auto) over a finished run: before, it resumed at the
    last step, ran the final eval again and logged a second eval row for that step."""
    run = str(tmp_path / "run")
    first = train(tiny_shards, run, steps=4)
    rows = _rows(run)
    again = train(tiny_shards, run, steps=4)
    assert again == first and again  # the final eval's metrics, read back from metrics.jsonl
    assert _rows(run) == rows
