"""launch/local.sh when its launch.py or its runner ends early: real runner, launch.py and trainer,
one CPU rank.

A launch.py killed while it still imports DeepSpeed (before its --save_pid file, before any rank)
made the runner exit 0, and local.sh reported success with nothing trained. A SIGTERM to every
process of the launch (scancel, a supervisor stopping the process group) killed the runner at once
while launch.py stopped its ranks, which checkpointed: local.sh said "their launch.py died" and
exited 143, which a resume-on-75 loop takes for a failure.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from launch_kill import kill_launch_py_once, processes_with, start_tiny_run


def launch_py_still_importing(procs: dict[int, str], first_seen: dict[str, float]) -> bool:
    """True once a launch.py has run for half a second (local.sh polls every 0.1 s) and has not yet
    written its --save_pid file /tmp/<runner pid>.deepspeed (it does after importing DeepSpeed)."""
    launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
    if not launch_py:
        return False
    runner = Path(f"/proc/{launch_py[0]}/stat").read_text().split(") ")[-1].split()[1]
    assert not Path(f"/tmp/{runner}.deepspeed").exists(), "launch.py imported DeepSpeed within 0.5 s"
    first_seen.setdefault("t", time.monotonic())
    return time.monotonic() - first_seen["t"] >= 0.5


def test_launch_py_killed_while_importing_deepspeed_is_no_success(tmp_path):
    """launch.py SIGKILLed before its --save_pid file and before any rank: the runner exits 0;
    local.sh must exit 1 with one line saying nothing trained (it exited 0)."""
    launch, out = start_tiny_run(tmp_path)
    first_seen: dict[str, float] = {}
    stderr = kill_launch_py_once(
        launch, out, lambda procs: launch_py_still_importing(procs, first_seen), "local.sh"
    )
    assert launch.returncode == 1, stderr
    assert "died before the trainer started" in stderr and "Nothing was trained" in stderr, stderr
    assert "Traceback" not in stderr, stderr
    assert not (out / "config.yaml").exists()


@pytest.fixture(scope="module")
def group_terminated_run(tmp_path_factory) -> tuple[int, str, Path]:
    """A run SIGTERMed as a whole process group (as scancel or a supervisor does) while it trains:
    local.sh's exit status, its stderr, the run folder. Whatever still runs is killed."""
    launch, out = start_tiny_run(tmp_path_factory.mktemp("group_term"))
    metrics = out / "metrics.jsonl"
    stderr = ""
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.05)
        os.killpg(launch.pid, signal.SIGTERM)
        _, stderr = launch.communicate(timeout=150)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        left = processes_with(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived local.sh: {left}\n{stderr}"
    return launch.returncode, stderr, out


def test_group_sigterm_leftover_warning_names_the_live_launch_py(group_terminated_run):
    """The runner dies of the TERM before launch.py, which still stops its ranks: the warning says
    so (it said "their launch.py died")."""
    _, stderr, _ = group_terminated_run
    warning = next(line for line in stderr.splitlines() if "outlived its launcher" in line)
    assert "launch.py died" not in warning, warning
    assert "still running" in warning, warning


def test_group_sigterm_with_a_preemption_checkpoint_exits_75(group_terminated_run):
    """The ranks checkpointed and left preempted.json: local.sh exits 75, resume with the same
    command (it exited 143, the runner's death by the TERM)."""
    rc, stderr, out = group_terminated_run
    assert (out / "preempted.json").exists(), stderr
    assert list((out / "checkpoints").glob("step_*")), stderr
    assert rc == 75, stderr
