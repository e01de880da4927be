"""The report of an exception that ends a thread names its rank on ranks other than 0.

torch tags the main thread's traceback ("[rank1]: ...") once the process group exists, but a thread's
uncaught exception printed through `threading.excepthook`, untagged on every rank: with the deepspeed
launcher's merged output, 16 identical "Exception in thread ..." reports named no rank.
"""

from __future__ import annotations

import pytest
from rank_stderr import script_stderr_lines

# Every test starts a Python process, in tests/rank_stderr.py: conftest finds the processes a
# test starts only in its own module.
pytestmark = pytest.mark.slow

SCRIPT = """
import sys, threading
from vutrain.logging_setup import setup_logging

if sys.argv[1] == "own-hook":
    def own_hook(args):
        if args.exc_type is not SystemExit:
            print("own hook:", args.exc_value, file=sys.stderr)

    threading.excepthook = own_hook
setup_logging()
setup_logging()  # twice (a sweep, a notebook): one tag


def work():
    raise RuntimeError("the watcher died")


thread = threading.Thread(target=work, name="watcher")
thread.start()
thread.join()
exit_quietly = threading.Thread(target=sys.exit, name="quiet")  # SystemExit ends a thread silently
exit_quietly.start()
exit_quietly.join()
"""


def thread_report(mode: str, **env: str) -> list[str]:
    """stderr lines of a fresh process that set up logging with the launcher's variables `env` and
    had a thread die of an exception."""
    return script_stderr_lines(SCRIPT, mode, **env)


def test_other_ranks_tag_each_line_of_a_thread_exception_report():
    """Rank 1's report starts with "[rank 1] Exception in thread watcher:", and every line of its
    traceback carries the tag too (before: none did); SystemExit still prints nothing."""
    lines = thread_report("default", RANK="1", WORLD_SIZE="2")
    assert lines[0] == "[rank 1] Exception in thread watcher:", lines
    assert lines[1] == "[rank 1] Traceback (most recent call last):", lines
    assert lines[-1] == "[rank 1] RuntimeError: the watcher died", lines
    assert all(line.startswith("[rank 1] ") for line in lines), lines
    assert not [line for line in lines if line.startswith("[rank 1] [rank")], lines


def test_rank_zero_report_and_a_users_own_hook_are_unchanged():
    """Rank 0 (and a plain `python` run) prints Python's own report; a hook the user installed
    before setup_logging stays in charge on any rank."""
    for env in ({"RANK": "0", "WORLD_SIZE": "2"}, {}):
        lines = thread_report("default", **env)
        assert lines[0] == "Exception in thread watcher:", lines
        assert lines[-1] == "RuntimeError: the watcher died", lines
        assert not [line for line in lines if "[rank" in line], lines
    assert thread_report("own-hook", RANK="1", WORLD_SIZE="2") == ["own hook: the watcher died"]
