"""Log lines of a multi-rank run: each can be traced to its rank (vutrain.logging_setup)."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import logging
from vutrain.logging_setup import setup_logging
setup_logging()
logging.getLogger("vutrain.trainer").warning("skipped a non-finite step")
logging.getLogger("torch").error("collective failed")
"""


def log_lines(**env: str) -> list[str]:
    """stderr lines of a fresh process that set up logging as the entry point does, with the
    launcher's variables `env`, and logged one vutrain warning and one library error."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, "PYTHONPATH": ROOT, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return proc.stderr.splitlines()


def test_other_ranks_name_themselves_in_each_line():
    """Under the deepspeed launcher (RANK=3, no `srun --label`) rank 3's warning and error carry
    `[rank 3]`, and still read "WARNING vutrain.trainer: ..." for a grep; before, the line was
    the same as rank 0's and the rank that skipped a step could not be found."""
    lines = log_lines(RANK="3", WORLD_SIZE="16")
    assert len(lines) == 2, lines
    assert "[rank 3] WARNING vutrain.trainer: skipped a non-finite step" in lines[0]
    assert "[rank 3] ERROR torch: collective failed" in lines[1]


def test_rank_zero_lines_keep_their_format():
    """Rank 0 (and a plain `python` run) prints no rank tag: its lines, which users and tests
    match, are unchanged, and a line without a tag is rank 0's."""
    for env in ({"RANK": "0", "WORLD_SIZE": "16"}, {}):
        lines = log_lines(**env)
        assert len(lines) == 2, lines
        assert all("[rank" not in line for line in lines), lines
        assert lines[0].split(" ", 2)[2] == "WARNING vutrain.trainer: skipped a non-finite step"
