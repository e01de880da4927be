"""Review of the trainer's small pieces: the data-wait watcher (vutrain/data_wait.py).

A long `data.stall_warning_s` (1e11 s: "practically never", accepted by the config) made the
watcher thread's first sleep longer than `threading.TIMEOUT_MAX`: `Event.wait` raised
OverflowError, the thread died with a traceback on stderr, and the run was left without its stall
warnings. The watcher now sleeps at most an hour at a time.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest

from vutrain.data_wait import DataWaitWatch


def _parked_in_its_sleep(thread: threading.Thread) -> bool:
    """Whether `thread` (a watcher) is blocked in `Event.wait` inside `_watch`."""
    frame, names = sys._current_frames().get(thread.ident), []
    while frame is not None:  # innermost first
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return "wait" in names and "_watch" in names and names.index("wait") < names.index("_watch")


@pytest.mark.parametrize("threshold_s", [1e11, 4e10])
def test_a_very_long_stall_threshold_keeps_its_watcher_alive(threshold_s):
    failures: list[BaseException] = []
    previous_hook = threading.excepthook
    threading.excepthook = lambda args: failures.append(args.exc_value)
    try:
        watch = DataWaitWatch(threshold_s, rank=0, describe_loader=lambda: "test loader")
        assert watch.enabled
        assert watch.next(iter([7, 8])) == 7
        thread = watch._thread
        # Wait (generous deadline) until the watcher has either died or gone to sleep.
        deadline = time.monotonic() + 30
        while thread.is_alive() and not _parked_in_its_sleep(thread) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not failures, f"the watcher thread died: {failures[0]!r}"
        assert thread.is_alive() and _parked_in_its_sleep(thread)
        # A second batch is still watched, and close() ends the thread at once.
        assert watch.next(iter([9])) == 9
        watch.close()
        assert not thread.is_alive() and not failures
    finally:
        threading.excepthook = previous_hook
