"""How a training run ends and what it leaves behind: exit code, done.json, curves.png, metrics."""

from __future__ import annotations

import json
import logging
import sys
import types

import pytest
from step_signals import signal_before_step

from inprocess_trainer import overrides, train


def test_a_plot_that_cannot_be_saved_leaves_a_finished_run_that_exits_0(
    tiny_shards, tmp_path, single_process, caplog
):
    """curves.png is a convenience: savefig failing for real (a directory stands where the PNG goes,
    as a full disk or a broken matplotlib would) raised after done.json, and the entry script
    exited 1 with a traceback, so SLURM reported the finished job as failed. Now: exit 0, done.json,
    one warning line naming curves.png."""
    from vutrain import train as entry

    run_dir = tmp_path / "run"
    (run_dir / "curves.png").mkdir(parents=True)
    args = overrides(tiny_shards, str(run_dir), 2, eval__every=0, train__checkpoint_every=0)
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        code = entry.main(["--config", "tiny", *args])
    assert code == 0
    with open(run_dir / "done.json", encoding="utf-8") as fh:
        assert json.load(fh) == {"step": 2}
    warnings = [r.getMessage() for r in caplog.records if "curves.png" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings


class _RecordingSummaryWriter:
    """Stands in for tensorboard's SummaryWriter (not installed here): records whether it was closed."""

    made: list = []

    def __init__(self, log_dir, purge_step=None):
        self.closed = False
        _RecordingSummaryWriter.made.append(self)

    def add_scalar(self, key, value, step):
        pass

    def flush(self):
        pass

    def close(self):
        self.closed = True


def test_a_preempted_run_closes_its_tensorboard_writer(tiny_shards, tmp_path, single_process, monkeypatch):
    """Preempted (and any other exception) left `_train` before `metrics.close()`: the TensorBoard
    writer (its thread and event file) stayed open in a process that goes on (a sweep, a notebook).
    Every writer the run made is closed now, whichever way the run ended."""
    from vutrain.trainer import Preempted

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _RecordingSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    monkeypatch.setattr(_RecordingSummaryWriter, "made", [])

    def signal_at_step_2(trainer):
        signal_before_step(trainer, 2)

    with pytest.raises(Preempted):
        train(tiny_shards, str(tmp_path / "run"), steps=4, on_trainer=signal_at_step_2, eval__every=0)
    assert _RecordingSummaryWriter.made, "the run made no TensorBoard writer"
    assert all(writer.closed for writer in _RecordingSummaryWriter.made)


def test_metrics_rows_take_numpy_and_tensor_scalars(tmp_path):
    """A numpy float32 or a 0-d tensor (a loss term logged as it came) made json.dumps raise in
    `MetricsWriter.write`, losing the row and ending the run. They are written as floats now
    (numpy bools as bools), beside the plain numbers."""
    import numpy as np
    import torch

    from vutrain.metrics import MetricsWriter, read_metrics

    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write(
        np.int64(3),
        {
            "train/loss": np.float32(0.5),
            "train/align": torch.tensor(2.5),
            "train/count": np.int64(7),
            "eval/value": np.array(0.25),
            "flag": np.bool_(True),
            "name": "x",
        },
    )
    writer.close()
    assert read_metrics(str(tmp_path)) == [
        {
            "step": 3,
            "train/loss": 0.5,
            "train/align": 2.5,
            "train/count": 7.0,
            "eval/value": 0.25,
            "flag": True,
            "name": "x",
        }
    ]


def test_plot_run_leaves_the_processs_matplotlib_backend_alone(tmp_path):
    """plot_run called `matplotlib.use("Agg")`: a notebook or script that trained and then plotted
    had its backend switched (inline plots stopped showing). The backend stays as it was now, and
    curves.png is still a PNG."""
    import matplotlib

    from vutrain.metrics import MetricsWriter
    from vutrain.plots import plot_run

    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write(1, {"train/loss": 2.0})
    writer.write(2, {"train/loss": 1.5, "eval/i2t_r1": 0.5, "eval/zeroshot_chance": 0.1})
    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        path = plot_run(str(tmp_path))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    with open(path, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
