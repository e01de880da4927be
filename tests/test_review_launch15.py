"""launch/local.sh when launch.py alone gets SIGTERM; hostfiles that start with a UTF-8 BOM.

A supervisor that signals the pid it started (launch.py, not the whole process group) made
launch.py pass the TERM to its ranks, which checkpointed and left preempted.json, and then exit 1:
local.sh exited 1 instead of 75 ("resume with the same command"). A hostfile saved by a Windows
editor starts with a byte order mark, which DeepSpeed's reader and the scripts' own took for part
of the first host ("\\ufeffn1"): deepspeed.sbatch said "lists n1 n2 but the job runs on n1 n2".
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from launch_kill import processes_with, start_tiny_run

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
DEEPSPEED_SBATCH = ROOT / "launch" / "slurm" / "deepspeed.sbatch"
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"
MAKE_HOSTFILE = ROOT / "launch" / "make_hostfile.sh"
BOM = b"\xef\xbb\xbf"


@pytest.mark.slow
def test_sigterm_to_launch_py_alone_with_a_checkpoint_exits_75(tmp_path):
    """launch.py alone SIGTERMed while the run trains: the ranks checkpoint and leave preempted.json,
    launch.py exits 1; local.sh exits 75 (it exited 1)."""
    launch, out = start_tiny_run(tmp_path)
    metrics = out / "metrics.jsonl"
    stderr = ""
    try:
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0):
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline, "no training step within 120 s"
            time.sleep(0.05)
        procs = processes_with(str(out))
        launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        assert len(launch_py) == 1, launch_py
        os.kill(launch_py[0], signal.SIGTERM)
        _, stderr = launch.communicate(timeout=150)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
        left = processes_with(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived local.sh: {left}\n{stderr}"
    assert (out / "preempted.json").exists(), stderr
    assert list((out / "checkpoints").glob("step_*")), stderr
    assert launch.returncode == 75, stderr
    assert "exited 1, but the ranks checkpointed" in stderr, stderr


def assert_one_line_about_the_bom(proc: subprocess.CompletedProcess, hostfile: Path) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "byte order mark" in lines[0] and str(hostfile) in lines[0], proc.stderr
    assert "\ufeff" not in proc.stderr, proc.stderr


def test_local_sh_refuses_a_hostfile_with_a_bom(tmp_path):
    """local.sh handed the file to deepspeed, whose world info then named host '\\ufefflocalhost'."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(BOM + b"localhost slots=1\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "HOSTFILE": str(hostfile), "PYTHON": "false"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), "x=1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30
    )
    assert_one_line_about_the_bom(proc, hostfile)


def test_deepspeed_sbatch_refuses_a_hostfile_with_a_bom(tmp_path):
    """The job's nodes, BOM first: one line naming the mark (it said "lists n1 n2 but the job runs on
    n1 n2")."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(BOM + b"n1 slots=1\nn2 slots=1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text("#!/bin/bash\n[[ \"$1 $2\" == 'show hostnames' ]] && printf 'n1\\nn2\\n'\nexit 0\n")
    scontrol.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "VUTRAIN_ROOT": str(ROOT),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch-%j"), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)", "SLURM_NTASKS": "2",
        "CUDA_VISIBLE_DEVICES": "", "PYTHON": "false", "HOSTFILE": str(hostfile),
    }  # fmt: skip
    proc = subprocess.run(
        ["bash", str(DEEPSPEED_SBATCH), "x=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )
    assert_one_line_about_the_bom(proc, hostfile)


def test_ds_node_refuses_a_hostfile_with_a_bom(tmp_path):
    """The first node of a BOM hostfile: one line naming the mark (it said "node n1 is not listed")."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(BOM + b"n1 slots=1\nn2 slots=1\n")
    env_file = tmp_path / "env"
    env_file.write_text("PYTHONUNBUFFERED=1\n")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "SLURMD_NODENAME": "n1", "PYTHON": "false"}
    proc = subprocess.run(
        ["bash", str(DS_NODE), str(hostfile), str(env_file), "x=1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert_one_line_about_the_bom(proc, hostfile)


def test_make_hostfile_drops_a_bom_of_the_node_list(tmp_path):
    """A node list read from a file a Windows editor saved: clean host names (it wrote "\\ufeffn1")."""
    proc = subprocess.run(
        ["bash", str(MAKE_HOSTFILE), "-s", "1", "\ufeffn1,n2"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "n1 slots=1\nn2 slots=1\n"
