"""A rank that waits too long for its next batch says so (`data.stall_warning_s`).

A training step blocks in `next(stream)` until a loader worker delivers. When the data never
comes (a worker stuck on a hung network mount or a slow disk, a worker deadlocked after a fork)
the run was silent forever: no line, no metric, the GPU idle. `DataWaitWatch.next` marks when a
rank starts waiting; one watcher thread per rank logs a warning once the wait passes the
threshold, again each time the wait has doubled (at most an hour apart), and the batch's arrival
after such a warning.

Cost per batch on the training thread: a clock read, an attribute store and an uncontended lock
(about a microsecond); the watcher wakes every quarter threshold while nothing stalls. The batch
itself, its order and the step are untouched: the watcher only reads the clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("vutrain")
MAX_WARNING_GAP_S = 3600.0
"""Repeat warnings at doubling waits, but never further apart than this."""


class _Wait:
    """One `next` call in progress: when it began, and the step it feeds."""

    __slots__ = ("started", "step", "warned")

    def __init__(self, started: float, step: int):
        self.started, self.step, self.warned = started, step, False


class DataWaitWatch:
    """Warns when `next(batches)` has blocked for `threshold_s` seconds (0 or inf: off, no thread).

    rank: named in the lines. describe_loader: returns what the warning says about the loader
    (its worker count, shards per worker), read only when a warning is due. The watcher thread
    starts at the first `next` and ends at `close()` (the trainer closes it with its stream).
    """

    def __init__(self, threshold_s: float, rank: int, describe_loader: Callable[[], str]):
        self.threshold_s, self.rank, self.describe_loader = float(threshold_s), rank, describe_loader
        self.enabled = 0 < self.threshold_s < math.inf  # inf: no timer could wait for it
        self._wait: _Wait | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next(self, batches: Iterator, step: int):
        """`next(batches)`, watched; `step`: the training step the batch is for (named in the lines)."""
        if not self.enabled:
            return next(batches)
        if self._thread is None:
            self._start()
        wait = _Wait(time.monotonic(), step)
        self._wait = wait  # one store: the watcher reads it without the lock
        try:
            return next(batches)
        finally:
            with self._lock:  # a warning is logged whole before the arrival check, never after it
                self._wait = None
            if wait.warned:
                log.warning(
                    "rank %d: the batch for step %d arrived after %.0f s of waiting",
                    self.rank,
                    step,
                    time.monotonic() - wait.started,
                )

    def close(self) -> None:
        """Stop the watcher thread (a later `next` starts a new one)."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
            self._stop.clear()

    def _start(self) -> None:
        self._thread = threading.Thread(
            target=self._watch, name=f"vutrain-data-wait-r{self.rank}", daemon=True
        )
        self._thread.start()

    def _watch(self) -> None:
        idle_poll = self.threshold_s / 4  # a wait seen up to this late is still warned about on time
        seen: _Wait | None = None
        due = 0.0  # when `seen` gets its next warning (monotonic seconds)
        while True:
            wait, now = self._wait, time.monotonic()
            if wait is None:
                timeout = idle_poll
            else:
                if wait is not seen:
                    seen, due = wait, wait.started + self.threshold_s
                if now >= due:
                    waited = self._warn(wait, now)
                    if waited is None:  # it arrived meanwhile
                        continue
                    due = wait.started + min(2 * waited, waited + MAX_WARNING_GAP_S)
                timeout = due - now
            if self._stop.wait(max(timeout, 0.01)):
                return

    def _warn(self, wait: _Wait, now: float) -> float | None:
        """Log that `wait` is still waiting; the seconds waited, or None if it has ended."""
        with self._lock:
            if self._wait is not wait:
                return None
            waited = now - wait.started
            wait.warned = True
            try:
                loader = self.describe_loader()
            except Exception as exc:  # the warning matters more than its details
                loader = f"loader details unavailable: {exc!r}"
            log.warning(
                "rank %d has waited %.0f s for its next batch (step %d; %s): the data loader is stuck "
                "or slow; check that the shard storage is reachable and fast (a hung network mount, a "
                "slow disk), data.num_workers and the shards per worker (more, smaller shards); "
                "warnings repeat while it waits (data.stall_warning_s)",
                self.rank,
                waited,
                wait.step,
                loader,
            )
            return waited
