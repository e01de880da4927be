"""Review of metrics and plots: curves.png from odd metrics.jsonl files, train/grad_norm's mapping."""

from __future__ import annotations

import json
import logging
import math
import os
from types import SimpleNamespace

import pytest
import torch

from vutrain.trainer import Trainer


def _write_rows(run_dir: str, rows: list[dict]) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row, allow_nan=True) + "\n" for row in rows)


def _plot_and_keep_figure(run_dir: str, monkeypatch):
    """plot_run on `run_dir` (the real PNG written), and the Figure it saved."""
    from matplotlib.figure import Figure

    from vutrain.plots import plot_run

    saved: list[Figure] = []
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    path = plot_run(run_dir)
    assert path is not None and os.path.getsize(path) > 0
    return saved[0]


def _visible(line) -> bool:
    """Whether a Line2D shows anything: a marker, or a segment between two distinct points."""
    points = set(zip(line.get_xdata(), line.get_ydata()))
    return line.get_marker() not in (None, "None", "", " ") or len(points) > 1


def test_a_single_training_row_is_drawn(tmp_path, monkeypatch):
    """A run shorter than train.log_every logs one training row: the loss panel showed nothing (a
    line of one point and no marker). Now that point has a marker."""
    _write_rows(str(tmp_path), [{"step": 5, "train/loss": 2.0}])
    fig = _plot_and_keep_figure(str(tmp_path), monkeypatch)
    lines = fig.axes[0].lines
    assert lines and any(_visible(line) for line in lines), [line.get_marker() for line in lines]


def test_finite_losses_between_nan_rows_are_drawn(tmp_path, monkeypatch):
    """Loss rows 1.0, NaN, 2.0, NaN, 3.0 (intervals whose micro-batches were all skipped): each
    finite point sat between two NaNs and was drawn as nothing. The line joins 1.0, 2.0, 3.0."""
    losses = [1.0, math.nan, 2.0, math.nan, 3.0]
    _write_rows(str(tmp_path), [{"step": i + 1, "train/loss": v} for i, v in enumerate(losses)])
    fig = _plot_and_keep_figure(str(tmp_path), monkeypatch)
    (line,) = fig.axes[0].lines
    # Agg draws no segment that touches a NaN: a NaN left in the line hides the points beside it
    assert list(zip(line.get_xdata(), line.get_ydata())) == [(1, 1.0), (3, 2.0), (5, 3.0)]


def test_values_that_are_no_number_are_left_out_and_counted(tmp_path, monkeypatch, caplog):
    """A hand-edited or foreign metrics.jsonl: a null zero-shot chance and an object loss raised
    TypeError (no curves.png at all), and a loss written "2.0" put the panel on a text axis. Now
    the numbers (the string "2.0" as 2.0) are drawn on numeric axes, the rest is left out with one
    warning that counts them."""
    rows = [
        {"step": 1, "train/loss": 3.0},
        {"step": 2, "train/loss": "2.0"},
        {"step": 3, "train/loss": {"mean": 1.5}},
        {"step": 4, "train/loss": 1.0},
        {"step": 4, "eval/zeroshot_top1": 0.5, "eval/i2t_r1": None, "eval/zeroshot_chance": None},
    ]
    _write_rows(str(tmp_path), rows)
    with caplog.at_level(logging.WARNING, logger="vutrain.plots"):
        fig = _plot_and_keep_figure(str(tmp_path), monkeypatch)
    (loss,) = fig.axes[0].lines
    assert list(loss.get_xdata()) == [1, 2, 4] and list(loss.get_ydata()) == [3.0, 2.0, 1.0]
    assert all(isinstance(y, float) for y in loss.get_ydata())
    assert fig.axes[1].get_legend_handles_labels()[1] == ["zeroshot_top1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 value(s)" in warnings[0], warnings


@pytest.mark.parametrize(
    ("reported", "logged"),
    [
        (torch.tensor(2.5), 2.5),
        (1.25, 1.25),
        (0, 0.0),
        (-1, math.inf),  # DeepSpeed's invalid-norm marker (bf16 ZeRO-1/2, non-finite gradient)
        (torch.tensor(-1.0), math.inf),
        (torch.tensor(math.nan), math.inf),
        (math.inf, math.inf),  # its overflow path sets float("inf") itself
        (None, None),  # no norm computed (ZeRO-0 in fp32)
    ],
)
def test_grad_norm_maps_deepspeeds_markers_to_inf(reported, logged):
    """train/grad_norm from DeepSpeed's get_global_grad_norm(): a norm (tensor or float) as a float,
    its -1 marker and NaN as inf, None (no norm) as absent. The mapping reads the engine and the
    non-finite guard's flag (here: the step was not skipped; test_review_nonfinite3.py: it was)."""
    engine = SimpleNamespace(get_global_grad_norm=lambda: reported)
    not_skipped = SimpleNamespace(
        engine=engine, device=torch.device("cpu"), _step_skipped=lambda: torch.tensor(False)
    )
    value = Trainer._grad_norm(not_skipped)
    assert value == logged and (value is None or isinstance(value, float)), value


def test_bytes_that_are_no_utf8_are_a_torn_line_not_a_crash(tmp_path, caplog):
    """A last line of garbage bytes (a crash that left junk, not a clean tear): reading
    metrics.jsonl raised UnicodeDecodeError, so the resume (truncate_after) and curves.png failed
    with a traceback. Now the line is skipped and counted, moves to metrics.discarded.jsonl on
    resume, and the kept rows stay byte for byte."""
    from vutrain.metrics import MetricsWriter, read_metrics

    good = b'{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.9}\n'
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(good + b'{"step": 3, "tr\xff\xfe\x80')
    with caplog.at_level(logging.WARNING, logger="vutrain.metrics"):
        assert [row["step"] for row in read_metrics(str(tmp_path))] == [1, 2]
    assert any("1 line(s) skipped" in r.getMessage() for r in caplog.records)
    assert MetricsWriter(str(tmp_path), enabled=True).truncate_after(2) == 1
    assert path.read_bytes() == good
    (moved,) = (tmp_path / "metrics.discarded.jsonl").read_text(encoding="utf-8").splitlines()
    assert json.loads(moved)["torn_line"].startswith('{"step": 3, "tr')
