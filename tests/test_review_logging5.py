"""Python warnings on ranks other than 0 keep all they say and carry one `[rank N]`.

setup_logging tagged a warning's text by replacing `warnings.formatwarning`: tracemalloc's "Object
allocated at" note (`-X tracemalloc`, for a ResourceWarning) never reached that hook and was lost on
those ranks, and under `logging.captureWarnings(True)` the tagged text went into a log line whose
format tagged it again: "[rank 1] WARNING py.warnings: [rank 1] ...".
"""

from __future__ import annotations

import pytest
from rank_stderr import script_stderr_lines

# Every test starts a Python process, in tests/rank_stderr.py: conftest finds the processes a
# test starts only in its own module.
pytestmark = pytest.mark.slow

SCRIPT = """
import gc, logging, sys, warnings
from vutrain.logging_setup import setup_logging

setup_logging()
setup_logging()  # twice (a sweep, a notebook): one tag
if sys.argv[1] == "capture":
    logging.captureWarnings(True)  # a user's or a library's choice
warnings.simplefilter("default")  # the user asks to see every warning, on every rank


def leak():
    open(sys.executable, "rb")  # never closed: a ResourceWarning when it is collected


if sys.argv[1] == "capture":
    warnings.warn("the user's notice", UserWarning)
else:
    leak()
    gc.collect()
"""


def stderr_lines(mode: str, *python_options: str, **env: str) -> list[str]:
    """stderr lines of a fresh process that set up logging with the launcher's variables `env`
    and then warned (`capture`: a UserWarning through logging; else a ResourceWarning)."""
    # The warnings filters are the script's own, whatever PYTHONWARNINGS pytest runs under.
    return script_stderr_lines(SCRIPT, mode, python_options, unset=("PYTHONWARNINGS",), **env)


def test_tracemalloc_note_is_kept_and_tagged_on_other_ranks():
    """Rank 1's ResourceWarning keeps the "Object allocated at" traceback Python adds under
    `-X tracemalloc`, each line tagged (before: the note was dropped on ranks other than 0)."""
    lines = stderr_lines("resource", "-X", "tracemalloc=5", RANK="1", WORLD_SIZE="2")
    assert any("ResourceWarning: unclosed file" in line for line in lines), lines
    assert "[rank 1] Object allocated at (most recent call last):" in lines, lines
    assert all(line.startswith("[rank 1] ") for line in lines), lines
    assert not [line for line in lines if line.startswith("[rank 1] [rank")], lines


def test_rank_zero_keeps_the_tracemalloc_note_untagged():
    lines = stderr_lines("resource", "-X", "tracemalloc=5", RANK="0", WORLD_SIZE="2")
    assert "Object allocated at (most recent call last):" in lines, lines
    assert not [line for line in lines if "[rank" in line], lines


def test_captured_warning_is_tagged_once_on_other_ranks():
    """With logging.captureWarnings(True) the warning is a log line: the log format's tag alone
    (before: "[rank 1] WARNING py.warnings: [rank 1] <string>:...")."""
    lines = stderr_lines("capture", RANK="1", WORLD_SIZE="2")
    logged = [line for line in lines if "py.warnings" in line]
    assert len(logged) == 1, lines
    assert logged[0].count("[rank 1]") == 1, logged
    assert " [rank 1] WARNING py.warnings: <string>:" in logged[0], logged
    assert logged[0].endswith("UserWarning: the user's notice"), logged
