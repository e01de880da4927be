"""metrics.jsonl on resume: a process killed (SIGKILL) in the middle of `truncate_after`, after the
rows past the checkpoint were appended to metrics.discarded.jsonl and before metrics.jsonl was
replaced, then a resume: each discarded row is in metrics.discarded.jsonl exactly once.

A real child process is killed at that point (its `os.replace` of metrics.jsonl sends SIGKILL to
itself); the resume is the real MetricsWriter.
"""

import json
import os
import subprocess
import sys

import pytest

from vutrain.metrics import MetricsWriter, read_metrics

_KILLED_RESUME = """
import os, signal, sys
import vutrain.metrics as metrics
real_replace = os.replace
def replace(src, dst):
    if dst.endswith("metrics.jsonl"):  # the rows are in metrics.discarded.jsonl, not yet moved out
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
metrics.os.replace = replace
metrics.MetricsWriter(sys.argv[1], True).truncate_after(int(sys.argv[2]))
"""


def _run_dir(tmp_path) -> str:
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "metrics.jsonl", "w") as fh:
        for step in range(1, 7):
            fh.write(json.dumps({"step": step, "train/loss": float(step)}) + "\n")
    return str(run)


def _discarded(run: str) -> list[int]:
    with open(os.path.join(run, "metrics.discarded.jsonl")) as fh:
        return [json.loads(line)["step"] for line in fh]


def _killed_resume(run: str, step: int) -> None:
    done = subprocess.run([sys.executable, "-c", _KILLED_RESUME, run, str(step)], timeout=120)
    assert done.returncode == -9  # killed at the point under test


@pytest.mark.slow
def test_a_resume_killed_between_the_discard_and_the_rewrite_discards_each_row_once(tmp_path):
    run = _run_dir(tmp_path)
    _killed_resume(run, 4)
    assert _discarded(run) == [5, 6]  # appended; metrics.jsonl still holds them
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5, 6]
    writer = MetricsWriter(run, enabled=True)
    assert writer.truncate_after(4) == 2
    writer.close()
    # Before: [5, 6, 5, 6], the rows of the killed resume appended a second time.
    assert _discarded(run) == [5, 6]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert not {"metrics.jsonl.tmp", "metrics.jsonl.resuming"} & set(os.listdir(run))


@pytest.mark.slow
def test_a_resume_killed_after_an_earlier_discard_keeps_the_earlier_rows_and_resumes_elsewhere(tmp_path):
    """An earlier resume's rows stay; the killed one's are cut off and moved again, here by a resume
    from another checkpoint (step 2), which moves rows 3..6 once."""
    run = _run_dir(tmp_path)
    with open(os.path.join(run, "metrics.discarded.jsonl"), "w") as fh:
        fh.write(json.dumps({"step": 9, "discarded_at_resume_from": 8}) + "\n")
    _killed_resume(run, 4)
    writer = MetricsWriter(run, enabled=True)
    assert writer.truncate_after(2) == 4
    writer.close()
    assert _discarded(run) == [9, 3, 4, 5, 6]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_a_resume_after_a_completed_rewrite_whose_marker_was_left_moves_nothing_again(tmp_path):
    """A kill after the rename, before the marker's removal: the rows are in the discarded file
    alone, and stay there once."""
    run = _run_dir(tmp_path)
    writer = MetricsWriter(run, enabled=True)
    writer.truncate_after(4)
    with open(os.path.join(run, "metrics.jsonl.resuming"), "w") as fh:
        json.dump({"discarded_size": None}, fh)  # the marker as the killed resume wrote it
    assert writer.truncate_after(4) == 0
    writer.close()
    assert _discarded(run) == [5, 6]
    assert not os.path.exists(os.path.join(run, "metrics.jsonl.resuming"))
