"""DeepSpeed's log lines on a rank other than 0 carry `[rank N]` as vutrain's do
(vutrain.logging_setup): DeepSpeed's logger has its own handler and format, so RANK_FORMAT
never reached it and a rank's DeepSpeed error read like rank 0's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the entry point does (setup_logging, then import deepspeed, which builds its logger), then
# DeepSpeed's logger at each level, a message from log_dist (which names its rank itself) and one
# with bad arguments (logging reports those; the caller must not raise).
SCRIPT = """
import logging
from vutrain.logging_setup import setup_logging
setup_logging()
from deepspeed.utils import logger
logger.info("ds info")
logger.warning("ds warning")
logger.error("ds error %s", "boom")
logger.error("[Rank 1] from log_dist")
logger.error("bad %d", "args")
logging.getLogger("vutrain.trainer").warning("vutrain warning")
print("done", flush=True)
"""


def ds_lines(rank: str) -> list[str]:
    """stdout and stderr lines (DeepSpeed's handler writes to stdout) of a process as rank `rank`,
    without DeepSpeed's accelerator notice."""
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, "PYTHONPATH": ROOT, "RANK": rank, "WORLD_SIZE": "2"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    lines = [line for line in proc.stdout.splitlines() if "Setting accelerator" not in line]
    assert lines and lines[-1] == "done", proc.stdout
    return lines


@pytest.mark.slow
def test_deepspeed_errors_on_other_ranks_name_their_rank():
    """Rank 1 prints DeepSpeed's errors only (its warnings and INFO stay quiet, as before), each
    with `[rank 1]`; log_dist's own "[Rank 1]" is not doubled; nothing else changes."""
    lines = ds_lines("1")
    text = "\n".join(lines)
    assert "ds info" not in text and "ds warning" not in text, text
    boom = [line for line in lines if "ds error boom" in line]
    assert len(boom) == 1 and "[ERROR]" in boom[0] and "[rank 1] ds error boom" in boom[0], text
    dist = [line for line in lines if "from log_dist" in line]
    assert len(dist) == 1 and dist[0].lower().count("[rank 1]") == 1, text
    assert "[rank 1] WARNING vutrain.trainer: vutrain warning" in text, text


@pytest.mark.slow
def test_deepspeed_lines_on_rank_zero_keep_their_format():
    """Rank 0 prints DeepSpeed's warnings and errors, untagged (a line without a tag is rank 0's)."""
    lines = ds_lines("0")
    text = "\n".join(lines)
    assert "ds info" not in text, text
    assert any(line.endswith("] ds warning") for line in lines), text
    assert any(line.endswith("] ds error boom") for line in lines), text
    assert not any("[rank" in line for line in lines if "from log_dist" not in line), text
