"""Scratch folders of the tools that train on synthetic shards, removed when the tool ends.

`count_step_ops.py`, `profile_step.py` and `host_python_time.py` each write synthetic shards and
a run folder; each run left a `/tmp/vutrain-*` folder behind, on success and on error.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable


def run_with_scratch(main: Callable[[list[str] | None, Callable[[str], str]], int], argv) -> int:
    """`main(argv, make_scratch)`, where `make_scratch(prefix)` makes a temporary folder that is
    removed once `main` returns or raises."""
    made: list[str] = []

    def make_scratch(prefix: str) -> str:
        made.append(tempfile.mkdtemp(prefix=prefix))
        return made[-1]

    try:
        return main(argv, make_scratch)
    finally:
        for folder in made:
            shutil.rmtree(folder, ignore_errors=True)
