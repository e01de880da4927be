"""What a run logs, with real Trainers in this process (world 1, tests/inprocess_trainer.py) and
real metrics files.

- The loss-term columns (align_uniform's train/align, train/uniform) are the mean over the
  logging interval's good micro-batches, weighted as train/loss is. Before: the last micro-batch
  of the logging step, beside an interval-mean train/loss.
- A metrics.jsonl row whose "step" is a number written as a string ("4", a hand-edited or
  foreign row) reads back with an int step: logged_eval finds it and curves.png draws it on the
  numeric axis. Before: read but never matched. A step that is no whole number (4.5, true) is
  skipped and counted like a torn line.
- train/grad_norm: the global gradient norm before clipping of the logging step's optimizer step
  (DeepSpeed's, on the device under ZeRO, read on logging steps only), checked against autograd;
  present at ZeRO-3 and at ZeRO-0 in fp32 too. Before: no such column.
"""

from __future__ import annotations

import logging
import math
import numbers
import os

import pytest
import torch
from run_rows import metrics_rows
from step_signals import signal_before_step
from training_rows import TRAIN_ONLY, training_rows

from inprocess_trainer import train


def _record_terms(seen: list):
    """on_trainer hook: after each loss call, append (step it belongs to, loss, its terms) to `seen`."""

    def hook(trainer) -> None:
        inner = trainer.loss_fn.forward

        def loss(*args, **kwargs):
            value = inner(*args, **kwargs)
            terms = {k: float(v) for k, v in trainer.loss_fn.last_terms.items()}
            seen.append((trainer.step + 1, float(value.detach()), terms))
            return value

        trainer.loss_fn.forward = loss

    return hook


@pytest.mark.parametrize(
    "log_every, accum, accumulation", [(3, 1, "plain"), (1, 2, "plain"), (2, 2, "gradcache")]
)
def test_loss_term_columns_are_interval_means_like_train_loss(
    tiny_shards, tmp_path, single_process, log_every, accum, accumulation
):
    """align_uniform with train.log_every=3, or 2 micro-batches per step (plain, or GradCache's one
    loss per step): each row's train/align and train/uniform equal the mean of the terms of every
    loss call of its interval, as train/loss is the mean of their losses (rel 1e-6)."""
    seen: list = []
    rows = training_rows(
        tiny_shards,
        str(tmp_path / "run"),
        steps=6,
        on_trainer=_record_terms(seen),
        loss__name="align_uniform",
        train__log_every=log_every,
        train__grad_accum_steps=accum,
        train__accumulation=accumulation,
    )
    assert [r["step"] for r in rows] == list(range(log_every, 7, log_every))
    for row in rows:
        interval = [s for s in seen if row["step"] - log_every < s[0] <= row["step"]]
        assert len(interval) == log_every * (accum if accumulation == "plain" else 1)
        assert row["train/loss"] == pytest.approx(sum(s[1] for s in interval) / len(interval), rel=1e-6)
        for key in ("align", "uniform"):
            mean = sum(s[2][key] for s in interval) / len(interval)
            assert row[f"train/{key}"] == pytest.approx(mean, rel=1e-6), (key, row, interval)


def test_term_columns_leave_out_skipped_micro_batches(tiny_shards, tmp_path, single_process):
    """A NaN loss at step 2 of a 3-step interval: the row's terms are the mean of the two good
    steps (finite), as train/loss is; a NaN term was not summed in."""
    seen: list = []

    def hook(trainer) -> None:
        _record_terms(seen)(trainer)
        inner = trainer.loss_fn.forward

        def loss(*args, **kwargs):
            value = inner(*args, **kwargs)
            if trainer.step + 1 == 2:
                trainer.loss_fn.last_terms = {
                    k: v * float("nan") for k, v in trainer.loss_fn.last_terms.items()
                }
                return value * float("nan")
            return value

        trainer.loss_fn.forward = loss

    (row,) = training_rows(
        tiny_shards,
        str(tmp_path / "run"),
        steps=3,
        on_trainer=hook,
        loss__name="align_uniform",
        train__log_every=3,
    )
    assert row["train/nonfinite_skipped"] == 1
    good = [s for s in seen if s[0] != 2]
    for key in ("align", "uniform"):
        assert math.isfinite(row[f"train/{key}"])
        assert row[f"train/{key}"] == pytest.approx(sum(s[2][key] for s in good) / 2, rel=1e-6)


def test_term_interval_sums_survive_a_resume_mid_interval(tiny_shards, tmp_path, single_process):
    """A run pre-empted at step 2 of a 4-step logging interval and resumed logs at step 4 the same
    train/align and train/uniform as a run that did not stop (rel 1e-5)."""
    from vutrain.trainer import Preempted

    common = dict(TRAIN_ONLY, loss__name="align_uniform", train__log_every=4)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train(tiny_shards, straight, steps=4, **common)
    with pytest.raises(Preempted) as raised:
        train(tiny_shards, split, steps=4, on_trainer=lambda t: signal_before_step(t, 1), **common)
    assert raised.value.step == 2
    train(tiny_shards, split, steps=4, **common)
    want = [r for r in metrics_rows(straight) if r["step"] == 4][0]
    got = [r for r in metrics_rows(split) if r["step"] == 4][0]
    for key in ("train/loss", "train/align", "train/uniform"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def _write_lines(run_dir, lines: list[str]) -> None:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(line + "\n" for line in lines)


def test_a_string_step_reads_back_as_an_int_and_is_matched(tmp_path):
    """A row with "step": "4" is found by logged_eval(run, 4) and read with the int step 4."""
    from vutrain.metrics import logged_eval, read_metrics

    run_dir = str(tmp_path)
    _write_lines(run_dir, ['{"step": 2, "train/loss": 1.0}', '{"step": "4", "eval/i2t_r1": 0.5}'])
    assert [r["step"] for r in read_metrics(run_dir)] == [2, 4]
    assert logged_eval(run_dir, 4) == {"eval/i2t_r1": 0.5}


def test_a_step_that_is_no_whole_number_is_skipped_and_counted(tmp_path, caplog):
    """Steps 4.5, true and "x" are not rows: read_metrics leaves them out with one warning that
    counts 3, and truncate_after moves them out of metrics.jsonl; an integral 6.0 reads as 6."""
    from vutrain.metrics import MetricsWriter, read_metrics

    run_dir = str(tmp_path)
    lines = [
        '{"step": 4.5, "a": 1}',
        '{"step": true, "a": 2}',
        '{"step": "x", "a": 3}',
        '{"step": 6.0, "a": 4}',
    ]
    _write_lines(run_dir, lines)
    with caplog.at_level(logging.WARNING, logger="vutrain.metrics"):
        rows = read_metrics(run_dir)
    assert rows == [{"step": 6, "a": 4}]
    assert "3 line(s) skipped" in caplog.text
    assert MetricsWriter(run_dir, enabled=True).truncate_after(10) == 3
    assert [r["step"] for r in read_metrics(run_dir)] == [6]


def test_curves_draw_string_steps_on_the_numeric_axis(tmp_path):
    """plot_run on rows with steps 1, "2", 3: the training-loss line's x data are the numbers 1, 2, 3."""
    from matplotlib.figure import Figure

    from vutrain.plots import plot_run

    run_dir = str(tmp_path)
    _write_lines(
        run_dir,
        [
            '{"step": 1, "train/loss": 3.0}',
            '{"step": "2", "train/loss": 2.0}',
            '{"step": 3, "train/loss": 1.0}',
        ],
    )
    saved: list = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        saved.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = savefig
    try:
        assert plot_run(run_dir)
    finally:
        Figure.savefig = original
    xs = list(saved[0].axes[0].lines[0].get_xdata())
    assert xs == [1, 2, 3] and all(isinstance(x, numbers.Integral) for x in xs), xs


def _reference_grad_norms(norms: dict):
    """on_trainer hook: norms[step] = the L2 norm of d loss / d trainable parameters of that step's
    one micro-batch, by torch.autograd.grad on the loss before the engine's backward."""

    def hook(trainer) -> None:
        inner = trainer.backward_step
        params = [p for p in trainer.engine.module.parameters() if p.requires_grad]

        def backward_step(loss, times):
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            squares = sum(float(g.double().pow(2).sum()) for g in grads if g is not None)
            norms[trainer.step + 1] = math.sqrt(squares)
            inner(loss, times)

        trainer.backward_step = backward_step

    return hook


def test_grad_norm_column_is_the_global_norm_before_clipping(tiny_shards, tmp_path, single_process):
    """ZeRO-2, train.grad_clip=0.01, log_every=2: each row's train/grad_norm is the gradient norm of
    its logging step computed by autograd (rel 1e-4), well above the clip, so taken before it."""
    norms: dict = {}
    rows = training_rows(
        tiny_shards,
        str(tmp_path / "run"),
        steps=4,
        on_trainer=_reference_grad_norms(norms),
        train__grad_clip=0.01,
        train__log_every=2,
    )
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["train/grad_norm"] == pytest.approx(norms[row["step"]], rel=1e-4), (row, norms)
        assert row["train/grad_norm"] > 0.1


@pytest.mark.parametrize("stage, present", [(3, True), (0, True)])
def test_grad_norm_column_under_zero_3_and_absent_where_deepspeed_has_none(
    tiny_shards, tmp_path, single_process, stage, present
):
    """ZeRO-3 logs a finite positive train/grad_norm in every row; so does train.zero_stage=0 in
    fp32 since 2026-12-07 (vutrain/grad_norm.py report_zero0_grad_norm; before, the column was left
    out there: tests/test_review_engine1.py)."""
    rows = training_rows(tiny_shards, str(tmp_path / "run"), steps=2, train__zero_stage=stage)
    assert rows
    for row in rows:
        assert ("train/grad_norm" in row) == present, row
        if present:
            assert math.isfinite(row["train/grad_norm"]) and row["train/grad_norm"] > 0
