"""Observability review: start-up errors of a second run in one process, TensorBoard on exit."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys
import threading
import time

import pytest
import torch.distributed as dist

from helpers_dist import run_distributed


def _two_failed_startups(rank: int, world_size: int) -> dict:
    """Two trainings in one process, each failing at start-up on both ranks with errors of their
    own, rank 0 watching as `train.main` does (a failed start leaves the watcher's `active()`
    true). Rank 1 reports once rank 0 has printed, so that rank 0's own message is the one shown."""
    from vutrain import startup_errors

    stderr = io.StringIO()
    codes = []
    with contextlib.redirect_stderr(stderr):
        for run in (1, 2):
            dist.init_process_group(
                "gloo",
                rank=rank,
                world_size=world_size,
                init_method=f"tcp://127.0.0.1:{os.environ['MASTER_PORT']}",
                timeout=datetime.timedelta(seconds=30),
            )
            if rank == 0:
                startup_errors.watch(world_size, lambda: True, poll_s=0.01)
            else:
                store = dist.distributed_c10d._get_default_store()
                store.wait([startup_errors.ACK_KEY], datetime.timedelta(seconds=20))
            codes.append(startup_errors.report(ValueError(f"run {run} failed"), rank, world_size))
            dist.destroy_process_group()
            if rank == 1:  # rank 0 hosts the store: let it close run 1's before run 2 meets there
                time.sleep(1.0)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _watchers():
        time.sleep(0.05)
    return {"stderr": stderr.getvalue(), "codes": codes, "watchers": _watchers()}


def _watchers() -> int:
    return sum(t.name == "startup-error-watch" for t in threading.enumerate())


@pytest.mark.slow
def test_second_run_in_one_process_shows_its_start_up_error():
    """Rank 0 prints each run's error once ("run 1", then "run 2"), both runs return exit code 1,
    and no watcher thread outlives its process group. Before: a module flag set by run 1 swallowed
    run 2's message, and run 1's watcher, still polling, saw rank 1's posted error and ended
    the process (exit 1) in the middle of run 2."""
    rank0, rank1 = run_distributed(_two_failed_startups, 2, init_process_group=False, timeout_s=60)
    assert rank0["stderr"].splitlines() == [
        "error: ValueError: run 1 failed",
        "error: ValueError: run 2 failed",
    ]
    assert rank0["codes"] == [1, 1] and rank1["codes"] == [1, 1]
    assert rank1["stderr"] == ""  # acknowledged by rank 0: it leaves the message to rank 0
    assert rank0["watchers"] == 0


class _QueueingSummaryWriter:
    """Stands in for torch's SummaryWriter where tensorboard is not installed, with the behaviour
    that matters here: events wait in memory until `flush()` or `close()` writes them."""

    def __init__(self, log_dir: str, purge_step: int | None = None):
        os.makedirs(log_dir, exist_ok=True)
        self.path = os.path.join(log_dir, "events.txt")
        self.pending: list[str] = []

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.pending.append(f"{step} {tag} {value}\n")

    def flush(self) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(self.pending)
        self.pending = []

    def close(self) -> None:
        self.flush()


def _events_on_disk(run_dir: str) -> list[str]:
    path = os.path.join(run_dir, "tensorboard", "events.txt")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return fh.read().splitlines()


def test_each_row_reaches_tensorboard_without_close(tmp_path, monkeypatch):
    """A row's scalars are on disk once `write` returns, before any `close()`: a pre-empted run
    (Preempted skips `close()`) or one stopped by NonFiniteLossError kept its last interval in
    metrics.jsonl but lost it from TensorBoard, whose writer queues events for up to 120 s."""
    module = type(os)("torch.utils.tensorboard")
    module.SummaryWriter = _QueueingSummaryWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    from vutrain.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write(1, {"train/loss": 2.5, "train/lr": 0.001})
    writer.write(2, {"train/loss": 2.0, "note": "text is not a scalar"})
    assert _events_on_disk(str(tmp_path)) == [
        "1 train/loss 2.5",
        "1 train/lr 0.001",
        "2 train/loss 2.0",
    ]


def test_each_row_reaches_real_tensorboard_without_close(tmp_path):
    """The same with the real SummaryWriter (skipped where tensorboard is not installed)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vutrain.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), enabled=True)
    writer.write(1, {"train/loss": 2.5})
    events = EventAccumulator(os.path.join(str(tmp_path), "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 2.5)]
