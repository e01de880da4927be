"""Shared by the rank-tag logging tests (test_review_logging4.py, test_review_logging5.py): a Python
script run in a fresh process as one rank a launcher started, and the stderr lines it printed."""

from __future__ import annotations

import os
import subprocess
import sys

from vutrain.logging_setup import RANK_VARIABLES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_stderr_lines(
    script: str, mode: str, python_options: tuple[str, ...] = (), unset: tuple[str, ...] = (), **env: str
) -> list[str]:
    """stderr lines of `python OPTIONS -c SCRIPT MODE`, which must exit 0, run with the launcher's
    variables `env` alone: those pytest runs under, and the names in `unset`, are dropped, so the
    tag the script prints comes from `env` only."""
    dropped = set(RANK_VARIABLES) | set(unset)
    clean = {k: v for k, v in os.environ.items() if k not in dropped}
    proc = subprocess.run(
        [sys.executable, *python_options, "-c", script, mode],
        env={**clean, "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()
