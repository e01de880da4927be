"""The logged gradient norm's interval maximum and the end-of-run saves, with real Trainers in this
process (world 1, tests/inprocess_trainer.py), real DeepSpeed engines and real checkpoints.

- train/grad_norm_max: the largest global gradient norm of the logging interval's optimizer steps
  (inf for a non-finite one), kept across a resume mid-interval. Before: only the logging step's
  norm was logged, so a spike between two logging steps never appeared.
- A run resumed at its last step whose final eval is pre-empted does not save that step's
  checkpoint again. Before: a full save inside SLURM's warning window, rewriting the files loaded.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from step_signals import signal_before_step

from inprocess_trainer import train

NO_EVAL = dict(train__checkpoint_every=0, eval__every=0, data__val_shards="")


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _train_rows(run_dir: str) -> list[dict]:
    return [r for r in _rows(run_dir) if "train/loss" in r]


def _record_step_norms(norms: dict):
    """on_trainer hook: norms[step] = DeepSpeed's norm after that optimizer step, read on the host
    (-1 or NaN as inf, as train/grad_norm reads them)."""

    def hook(trainer) -> None:
        step_fn = trainer.train_step

        def train_step():
            out = step_fn()
            value = float(trainer.engine.get_global_grad_norm())
            norms[trainer.step + 1] = value if value >= 0 else math.inf
            return out

        trainer.train_step = train_step

    return hook


def test_grad_norm_max_is_the_largest_norm_of_the_interval(tiny_shards, tmp_path, single_process):
    """log_every 3 over 6 steps: each row's train/grad_norm_max is exactly the largest of its three
    steps' norms (step 1's spike shows in the step-3 row), and train/grad_norm stays the logging
    step's own norm."""
    norms: dict = {}
    run_dir = str(tmp_path / "run")
    train(tiny_shards, run_dir, steps=6, on_trainer=_record_step_norms(norms), train__log_every=3, **NO_EVAL)
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == [3, 6] and sorted(norms) == [1, 2, 3, 4, 5, 6]
    for row in rows:
        interval = [norms[s] for s in range(row["step"] - 2, row["step"] + 1)]
        assert row["train/grad_norm"] == norms[row["step"]], (row, norms)
        assert row["train/grad_norm_max"] == max(interval), (row, norms)
    assert rows[0]["train/grad_norm_max"] > rows[0]["train/grad_norm"], (rows, norms)


@pytest.mark.parametrize(
    "reported, expected",
    [
        ([torch.tensor(2.0), 3.5, torch.tensor(1.0)], 3.5),
        ([torch.tensor(2.0), torch.tensor(-1.0), torch.tensor(1.0)], math.inf),
        ([1.0, float("nan"), 0.5], math.inf),
        ([None, None], None),
    ],
)
def test_grad_norm_max_maps_deepspeeds_markers_as_grad_norm_does(reported, expected):
    """IntervalNormMax over DeepSpeed's per-step values: tensors and floats give their maximum;
    its -1 and NaN markers count as inf; no norm at all (None) leaves the column out; a read
    starts the next interval empty, and its state survives JSON."""
    from vutrain.grad_norm import IntervalNormMax

    norm_max = IntervalNormMax()
    for value in reported:
        norm_max.add(value, torch.device("cpu"))
    restored = IntervalNormMax()
    restored.load_state_dict(json.loads(json.dumps(norm_max.state_dict())), torch.device("cpu"))
    assert norm_max.read() == expected and restored.read() == expected
    assert norm_max.read() is None


def test_grad_norm_max_survives_a_resume_mid_interval(tiny_shards, tmp_path, single_process):
    """A run pre-empted at step 2 of a 3-step interval and resumed logs, at steps 3 and 6, the
    train/grad_norm_max of a run that did not stop (rel 1e-6), and step 3's is the largest of the
    resumed run's steps 1-3, step 1 and 2 before the pre-emption included."""
    from vutrain.trainer import Preempted

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(tiny_shards, straight, steps=6, train__log_every=3, **NO_EVAL)
    norms: dict = {}

    def before(trainer) -> None:
        _record_step_norms(norms)(trainer)
        signal_before_step(trainer, 1)

    with pytest.raises(Preempted) as raised:
        train(tiny_shards, split, steps=6, on_trainer=before, train__log_every=3, **NO_EVAL)
    assert raised.value.step == 2
    train(tiny_shards, split, steps=6, on_trainer=_record_step_norms(norms), train__log_every=3, **NO_EVAL)
    want, got = _train_rows(straight), _train_rows(split)
    assert [r["step"] for r in got] == [3, 6]
    assert got[0]["train/grad_norm_max"] == max(norms[1], norms[2], norms[3]), (got, norms)
    for w, g in zip(want, got):
        assert g["train/grad_norm_max"] == pytest.approx(w["train/grad_norm_max"], rel=1e-6), (w, g)


def _files(directory: str) -> dict:
    """{relative path: (inode, mtime_ns)} of every file below `directory`: a rewrite changes them."""
    found = {}
    for root, _dirs, names in os.walk(directory):
        for name in names:
            st = os.stat(os.path.join(root, name))
            found[os.path.relpath(os.path.join(root, name), directory)] = (st.st_ino, st.st_mtime_ns)
    return found


def _preempt_each_eval(trainer) -> None:
    """on_trainer hook: SIGUSR1 as every eval starts (SLURM's warning arriving during the eval)."""
    evaluate = trainer.evaluator

    def evaluator(engine, stop_requested=None):
        os.kill(os.getpid(), signal.SIGUSR1)
        return evaluate(engine, stop_requested=stop_requested)

    trainer.evaluator = evaluator


def test_a_final_eval_preempted_after_a_resume_at_the_last_step_saves_nothing(
    tiny_shards, tmp_path, single_process
):
    """A 2-step run pre-empted during its final eval saves step 2 (exit 75); its requeued job,
    pre-empted during that eval again, leaves the checkpoint directory's files as they were (same
    inodes and times) and exits 75 again; the next requeue finishes with one eval row for step 2."""
    from vutrain.trainer import Preempted

    run_dir = str(tmp_path / "run")
    common = dict(train__checkpoint_every=0, eval__every=0)
    for _ in range(2):
        before = _files(os.path.join(run_dir, "checkpoints")) if os.path.isdir(run_dir) else None
        with pytest.raises(Preempted) as raised:
            train(tiny_shards, run_dir, steps=2, on_trainer=_preempt_each_eval, **common)
        assert raised.value.step == 2
    after = _files(os.path.join(run_dir, "checkpoints"))
    assert before and after == before
    metrics = train(tiny_shards, run_dir, steps=2, **common)
    assert metrics
    evals = [r for r in _rows(run_dir) if any(k.startswith("eval/") for k in r)]
    assert [r["step"] for r in evals] == [2]
    with open(os.path.join(run_dir, "done.json"), encoding="utf-8") as fh:
        assert json.load(fh)["step"] == 2
