"""A rank waiting for its next batch says so (vutrain/data_wait.py, data.stall_warning_s).

A shard whose read never returns (a hung network mount, a loader worker stuck on slow storage)
left the run silent forever: no line, no metric. Here the shards are named pipes (FIFOs) that
nobody writes yet: opening one blocks, as a read from a dead mount does, until the test "brings
the mount back" and writes the real tar bytes into them.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import threading
import time

import pytest
import torch
from tar_shards import rank_streams, write_two_image_shards

from inprocess_trainer import train

THRESHOLD_S = 0.5
WARNINGS = 3  # due at 0.5, 1.0 and 2.0 s of waiting; the data comes once the third is logged


class _DataLines(logging.Handler):
    """The data-wait lines logged on the `vutrain` logger (from any thread)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.stalls, self.arrivals = [], []

    def emit(self, record):
        text = record.getMessage()
        if "for its next batch" in text:
            self.stalls.append((time.monotonic(), text))
        elif "arrived after" in text:
            self.arrivals.append((time.monotonic(), text))


@pytest.fixture
def data_lines():
    handler, logger = _DataLines(), logging.getLogger("vutrain")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


class _BlockedShards:
    """Turn shard files into FIFOs: opening one blocks until `release()`, after which each FIFO serves
    the file's bytes to every reader (a later epoch opens it again) until `unblock()`."""

    def __init__(self, paths: list[str]):
        self.contents = {}
        for path in paths:
            with open(path, "rb") as fh:
                self.contents[path] = fh.read()
            os.unlink(path)
            os.mkfifo(path)
        self.writers: list[threading.Thread] = []
        self.released_at = None
        self.stop = threading.Event()

    def release(self) -> None:
        self.released_at = time.monotonic()
        for path, data in self.contents.items():
            writer = threading.Thread(target=self._feed, args=(path, data), daemon=True)
            writer.start()
            self.writers.append(writer)

    def _feed(self, path: str, data: bytes) -> None:
        while not self.stop.is_set():
            try:
                with open(path, "wb") as fifo:  # blocks until a reader opens the shard
                    fifo.write(data)
            except BrokenPipeError:  # a reader that stopped early, or unblock()
                pass

    def unblock(self) -> None:
        """End the writers: each waits in open() for a reader, so open and close the read ends."""
        self.stop.set()
        deadline = time.monotonic() + 30
        while any(w.is_alive() for w in self.writers) and time.monotonic() < deadline:
            for path in self.contents:
                try:
                    os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            time.sleep(0.01)
        assert not any(w.is_alive() for w in self.writers)


def _release_after(blocked: _BlockedShards, lines: _DataLines) -> threading.Thread:
    """Let the data come once the third warning is logged (not after a fixed time: on a loaded
    machine the wait may start late, and a fixed release then came before the third warning)."""

    def release() -> None:
        deadline = time.monotonic() + 120
        while len(lines.stalls) < WARNINGS and time.monotonic() < deadline:
            time.sleep(0.01)
        blocked.release()

    thread = threading.Thread(target=release, daemon=True)
    thread.start()
    return thread


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("vutrain-data-wait")]


def _check_lines(lines: _DataLines, blocked: _BlockedShards, started: float, purpose: str, loader: str):
    """Three warnings (at 0.5, 1 and 2 s of waiting), each saying rank, seconds, what the batch is for
    (`purpose`: "step 1", "the eval of data.val_shards=..."), the loader and what to check; then one
    arrival line after the release."""
    what = re.escape(purpose)
    texts = [text for _, text in lines.stalls]
    assert len(texts) == 3, texts  # doubling waits: never a line per poll
    waited = []
    for text in texts:
        found = re.search(rf"rank 0 has waited (\d+) s for its next batch \({what}; (.*?)\): ", text)
        assert found and found.group(2) == loader, text
        waited.append(int(found.group(1)))
        for advice in ("shard storage is reachable", "data.num_workers", "shards per worker"):
            assert advice in text, text
    # 0.5 s rounds either way
    assert waited[0] in (0, 1) and waited == sorted(waited) and waited[-1] >= 2, texts
    first_warning = lines.stalls[0][0] - started
    assert THRESHOLD_S <= first_warning, first_warning
    assert all(at < blocked.released_at for at, _ in lines.stalls), "a warning after the data came"
    assert len(lines.arrivals) == 1, lines.arrivals
    at, text = lines.arrivals[0]
    assert at >= blocked.released_at
    arrived = re.match(rf"rank 0: the batch for {what} arrived after (\d+) s of waiting$", text)
    assert arrived and int(arrived.group(1)) >= 2, text  # after the third warning


def _losses(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_a_trainer_blocked_on_its_shards_warns_then_trains_on_unchanged(
    tiny_shards, tmp_path, single_process, data_lines
):
    """A real Trainer whose shards block until its third warning logs three warnings (rank, seconds,
    step 1, the loader, what to check) and one arrival line, then trains all 3 steps with the losses of a run
    whose shards never blocked; no watcher thread outlives train()."""
    shards_dir = os.path.dirname(tiny_shards["train_shards"])
    copy = str(tmp_path / "shards")
    shutil.copytree(shards_dir, copy)
    shards = {"train_shards": tiny_shards["train_shards"].replace(shards_dir, copy), "val_shards": ""}
    settings = dict(eval__every=0, train__checkpoint_every=0, data__stall_warning_s=THRESHOLD_S)

    plain_run = str(tmp_path / "plain")
    train(shards, plain_run, steps=3, **settings)
    assert data_lines.stalls == [] and data_lines.arrivals == []  # a run that never waits says nothing
    assert _watch_threads() == []

    timers = []

    def block_the_shards(trainer):
        # After the build (the tokenizer reads the shards), before the stream opens its first one.
        files = sorted(glob.glob(os.path.join(copy, "*.tar")))
        assert len(files) == 4
        blocked = _BlockedShards(files)
        timers.append((blocked, time.monotonic(), _release_after(blocked, data_lines)))

    blocked_run = str(tmp_path / "blocked")
    try:
        train(shards, blocked_run, steps=3, on_trainer=block_the_shards, **settings)
    finally:
        for blocked, _, timer in timers:
            timer.join()
            blocked.unblock()
    blocked, started, _ = timers[0]
    loader = "no loader workers (read in this process), 4 shards over 1 ranks: 4.0 per worker"
    _check_lines(data_lines, blocked, started, purpose="step 1", loader=loader)
    assert json.load(open(os.path.join(blocked_run, "done.json"), encoding="utf-8")) == {"step": 3}
    assert _losses(blocked_run) == pytest.approx(_losses(plain_run), rel=1e-6)
    assert len(_losses(blocked_run)) == 3
    assert _watch_threads() == []


def test_a_loader_worker_blocked_on_a_fifo_shard_is_reported(tmp_path, data_lines):
    """The same through a real DataLoader worker (its open() of the shard blocks in the worker
    process; the rank waits on the worker's queue): the lines, then the very batches of the same
    stream over plain files, in order."""
    from vutrain.data_wait import DataWaitWatch

    pattern = write_two_image_shards(tmp_path, shards=2, per_shard=4)
    expected_stream = rank_streams(pattern, 1, 2, 1, 8, workers=1)[0]
    with expected_stream:
        expected = [next(expected_stream) for _ in range(6)]
    stream = rank_streams(pattern, 1, 2, 1, 8, workers=1)[0]  # lists the shards while they are files
    blocked = _BlockedShards([str(tmp_path / "0.tar"), str(tmp_path / "1.tar")])
    watch = DataWaitWatch(THRESHOLD_S, 0, lambda: "1 loader workers")
    started = time.monotonic()
    timer = _release_after(blocked, data_lines)
    try:
        got = [watch.next(stream, step=7)]
        assert len(_watch_threads()) == 1
        got += [watch.next(stream, step=8 + i) for i in range(5)]  # the next epoch opens the FIFOs again
    finally:
        timer.join()
        watch.close()
        stream.close()
        blocked.unblock()
    assert _watch_threads() == []
    _check_lines(data_lines, blocked, started, purpose="step 7", loader="1 loader workers")
    for a, b in zip(got, expected, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


def test_the_threshold_is_checked_and_zero_is_off(tmp_path):
    """0 (and inf, which no timer can wait for) reads without a watcher thread; negative, NaN or
    infinite thresholds are refused in one line."""
    from vutrain.config import ConfigError, load_config
    from vutrain.data_wait import DataWaitWatch

    for off in (0, float("inf")):
        watch = DataWaitWatch(off, 0, lambda: "")
        assert watch.next(iter([1, 2]), step=1) == 1
        assert _watch_threads() == []
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match=r"^data.stall_warning_s must be "):
            load_config("tiny", [f"output_dir={tmp_path}", f"data.stall_warning_s={bad}"])
