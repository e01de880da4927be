"""A rank that waits too long for its next batch says so (`data.stall_warning_s`).

A training step blocks in `next(stream)` until a loader worker delivers. When the data never
comes (a worker stuck on a hung network mount or a slow disk, a worker deadlocked after a fork)
the run was silent forever: no line, no metric, the GPU idle. `DataWaitWatch.next` marks when a
rank starts waiting; one watcher thread per rank logs a warning once the wait passes the
threshold, again each time the wait has doubled (at most an hour apart), and the batch's arrival
after such a warning. The eval's val batches are watched alike (`watched`), by a watcher that
ends with the eval.

Cost per batch on the training thread: a clock read, an attribute store and an uncontended lock
(about a microsecond); the watcher wakes every quarter threshold while nothing stalls. The batch
itself, its order and the step are untouched: the watcher only reads the clock.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator

log = logging.getLogger("vutrain")
MAX_WARNING_GAP_S = 3600.0
"""Repeat warnings at doubling waits, but never further apart than this."""
MAX_SLEEP_S = 3600.0
"""The watcher's longest sleep: `Event.wait` raises OverflowError past threading.TIMEOUT_MAX
(about 292 years), and a long threshold (data.stall_warning_s=1e11, "practically never") killed
the watcher thread with a traceback on its first sleep. Waking hourly costs nothing; `due` holds."""


class _Wait:
    """One `next` call in progress: when it began, and the step (or what else) it feeds."""

    __slots__ = ("started", "step", "what", "warned")

    def __init__(self, started: float, step: int | None, what: str | None):
        self.started, self.step, self.what, self.warned = started, step, what, False

    def purpose(self) -> str:
        """What the batch is for, as the lines say it (formatted only when a line is due)."""
        return self.what if self.what is not None else f"step {self.step}"


class DataWaitWatch:
    """Warns when `next(batches)` has blocked for `threshold_s` seconds (0 or inf: off, no thread).

    rank: named in the lines. describe_loader: returns what the warning says about the loader
    (its worker count, shards per worker), read only when a warning is due. The watcher thread
    starts at the first `next` and ends at `close()` (the trainer closes it with its stream, the
    evaluator at the end of each eval, the benchmarks with their Trainers): the thread holds
    `describe_loader`, so an open watch keeps its Trainer (engine, model, optimizer) alive.
    """

    def __init__(self, threshold_s: float, rank: int, describe_loader: Callable[[], str]):
        self.threshold_s, self.rank, self.describe_loader = float(threshold_s), rank, describe_loader
        self.enabled = 0 < self.threshold_s < math.inf  # inf: no timer could wait for it
        self._wait: _Wait | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next(self, batches: Iterator, step: int | None = None, what: str | None = None):
        """`next(batches)`, watched; `step`: the training step the batch is for, or `what`: what else
        it is for ("the eval of data.val_shards=..."), named in the lines."""
        if not self.enabled:
            return next(batches)
        if self._thread is None:
            self._start()
        wait = _Wait(time.monotonic(), step, what)
        self._wait = wait  # one store: the watcher reads it without the lock
        arrived = False
        try:
            batch = next(batches)
            arrived = True
            return batch
        finally:
            with self._lock:  # a warning is logged whole before the arrival check, never after it
                self._wait = None
            if wait.warned:
                waited = time.monotonic() - wait.started
                if arrived:
                    log.warning(
                        "rank %d: the batch for %s arrived after %.0f s of waiting",
                        self.rank,
                        wait.purpose(),
                        waited,
                    )
                else:  # the data ended (the eval's last batch was read) or the read failed
                    log.warning(
                        "rank %d: the wait for the batch for %s ended after %.0f s without one",
                        self.rank,
                        wait.purpose(),
                        waited,
                    )

    def watched(self, batches: Iterable, what: str) -> Iterator:
        """The items of `batches`, each pull watched as `next(..., what=what)` is (the eval's)."""
        it = iter(batches)
        while True:
            try:
                item = self.next(it, what=what)
            except StopIteration:
                return
            yield item

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
            if self._stop.wait(min(max(timeout, 0.01), MAX_SLEEP_S)):
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
                "rank %d has waited %.0f s for its next batch (%s; %s): the data loader is stuck "
                "or slow; check that the shard storage is reachable and fast (a hung network mount, a "
                "slow disk), data.num_workers and the shards per worker (more, smaller shards); "
                "warnings repeat while it waits (data.stall_warning_s)",
                self.rank,
                waited,
                wait.purpose(),
                loader,
            )
            return waited


def describe_val_loader(stream) -> str:
    """What an eval's data-wait warning says about its `ValStream`'s readers (as the trainer's says
    of its training stream)."""
    workers, shards = stream.loader_workers(), len(stream.shards)
    # Fewer shards than ranks: every rank reads every shard (and keeps its share of the samples).
    mine = len(stream.shards[stream.rank :: stream.world_size]) if shards >= stream.world_size else shards
    readers = f"{workers} loader workers" if workers else "no loader workers (read in this process)"
    return (
        f"{readers}, {shards} val shards over {stream.world_size} ranks: "
        f"{mine / max(1, workers):.1f} per worker"
    )
