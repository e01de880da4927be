"""Helpers for the kernels' CPU tests under the Triton interpreter.

The interpreter only works when ``TRITON_INTERPRET=1`` is set before anything
imports Triton (see ``kernels.runtime.interpreting``). Inside a large pytest run
some other module may already have imported it (``torch.distributed.nn`` and
``transformers`` do), so a test module can ask to re-run itself in a fresh
interpreter process instead of silently testing the torch fallback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from kernels.runtime import interpreting, triton_importable


def triton_mode() -> str:
    """``"gpu"``, ``"interpreter"``, ``"subprocess"`` (interpreter needs a fresh
    process) or ``"none"`` (Triton not installed)."""
    if not triton_importable():
        return "none"
    if torch.cuda.is_available() and not interpreting():
        return "gpu"
    return "interpreter" if interpreting() else "subprocess"


def run_module_in_interpreter(test_file: str | Path, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """Run ``pytest test_file`` in a new Python with ``TRITON_INTERPRET=1``."""
    root = Path(__file__).resolve().parent.parent
    env = dict(
        os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(test_file)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
