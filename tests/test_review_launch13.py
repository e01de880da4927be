"""The SLURM scripts on allocations whose nodes differ, and with a SLURM_CONF that names no file.

srun.sbatch divided the job's tasks by its nodes: `-N 2 -n 4` given as 3 and 1 tasks
(SLURM_TASKS_PER_NODE=3,1) asked srun for 2 per node, which the second node cannot hold. Both
sbatch scripts and make_hostfile.sh took the first node's GPUs for every node: `--gpus=12` over 2
nodes may be 8 and 4. A SLURM_CONF naming no file made each scontrol call retry it for 60 s.

The scripts run by hand with the SLURM variables of such an allocation (no cluster needed): each
stops before it reaches scontrol or srun, either on the check under test or, where the allocation
is fine, on an exported WORLD_SIZE that matches nothing (check_world_size, which comes later).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRUN_SBATCH = ROOT / "launch" / "slurm" / "srun.sbatch"
DEEPSPEED_SBATCH = ROOT / "launch" / "slurm" / "deepspeed.sbatch"
MAKE_HOSTFILE = ROOT / "launch" / "make_hostfile.sh"
WORLD_SIZE_REFUSAL = "WORLD_SIZE"


def run_script(
    script: Path, tmp_path: Path, args: tuple[str, ...] | list[str] = (), **slurm: str
) -> subprocess.CompletedProcess:
    """SCRIPT run by hand as the batch step of a 2-node job, in an environment of SLURM's variables only."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "VUTRAIN_ROOT": str(ROOT),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch-%j"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "CUDA_VISIBLE_DEVICES": "",
        **slurm,
    }
    return subprocess.run(
        ["bash", str(script), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30
    )


def assert_refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], proc.stderr


def test_srun_refuses_tasks_a_node_cannot_hold(tmp_path):
    """3,1 tasks over 2 nodes: one line asking for --ntasks-per-node (it asked srun for 2 per node)."""
    proc = run_script(SRUN_SBATCH, tmp_path, SLURM_TASKS_PER_NODE="3,1", SLURM_NTASKS="4", WORLD_SIZE="99")
    assert_refused(proc, "SLURM_TASKS_PER_NODE", "--ntasks-per-node")


@pytest.mark.parametrize("tasks_per_node", ["2(x2)", "4,2", "2,3"])
def test_srun_accepts_nodes_that_hold_the_tasks(tmp_path, tasks_per_node):
    """Every node holds 2 of the 4 tasks (some more): the script goes on to its later checks."""
    proc = run_script(
        SRUN_SBATCH, tmp_path, SLURM_TASKS_PER_NODE=tasks_per_node, SLURM_NTASKS="4", WORLD_SIZE="99"
    )
    assert_refused(proc, WORLD_SIZE_REFUSAL)


@pytest.mark.parametrize(
    ("script", "tasks"), [(SRUN_SBATCH, "2(x2)"), (DEEPSPEED_SBATCH, "1(x2)")], ids=["srun", "deepspeed"]
)
def test_sbatch_refuses_gpus_that_differ_between_nodes(tmp_path, script, tasks):
    """`--gpus=a100:6` over 2 nodes, 2 on the first: one line asking for --gpus-per-node."""
    proc = run_script(
        script, tmp_path, SLURM_TASKS_PER_NODE=tasks, CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS="a100:6",
        WORLD_SIZE="99",
    )  # fmt: skip
    assert_refused(proc, "SLURM_GPUS=a100:6", "--gpus-per-node")
    even = run_script(
        script, tmp_path, SLURM_TASKS_PER_NODE=tasks, CUDA_VISIBLE_DEVICES="0,1", SLURM_GPUS="a100:4",
        WORLD_SIZE="99",
    )  # fmt: skip
    assert_refused(even, WORLD_SIZE_REFUSAL)


@pytest.mark.parametrize(
    ("script", "tasks"), [(SRUN_SBATCH, "2(x2)"), (DEEPSPEED_SBATCH, "1(x2)")], ids=["srun", "deepspeed"]
)
def test_sbatch_names_a_missing_slurm_conf_at_once(tmp_path, script, tasks):
    """SLURM_CONF naming no file: one line naming it, before scontrol retries it for 60 s per call."""
    proc = run_script(script, tmp_path, SLURM_TASKS_PER_NODE=tasks, SLURM_CONF=str(tmp_path / "no.conf"))
    assert_refused(proc, "SLURM_CONF=", "unset it")


def test_make_hostfile_expands_without_a_missing_slurm_conf(tmp_path):
    """The hosts come from the built-in expander at once, with one warning naming SLURM_CONF."""
    proc = run_script(
        MAKE_HOSTFILE, tmp_path, ["-s", "2", "gpu[01-02]"], SLURM_CONF=str(tmp_path / "no.conf")
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["gpu01 slots=2", "gpu02 slots=2"]
    assert "SLURM_CONF=" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_make_hostfile_refuses_default_slots_that_miss_the_jobs_gpus(tmp_path):
    """12 GPUs over 2 nodes, 8 on this one: the default slots=8 on both lines is refused in one line;
    -s N is the user's word and kept, and a total that matches writes the file as before."""
    job = {"SLURM_GPUS_ON_NODE": "8", "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    uneven = run_script(MAKE_HOSTFILE, tmp_path, SLURM_GPUS="12", **job)
    assert_refused(uneven, "SLURM_GPUS=12", "-s N", "--gpus-per-node")
    assert uneven.stdout == ""
    given = run_script(MAKE_HOSTFILE, tmp_path, ["-s", "4"], SLURM_GPUS="12", **job)
    assert given.returncode == 0 and given.stdout.splitlines() == ["n1 slots=4", "n2 slots=4"], given.stderr
    even = run_script(MAKE_HOSTFILE, tmp_path, SLURM_GPUS="h100:16", **job)
    assert even.returncode == 0 and even.stdout.splitlines() == ["n1 slots=8", "n2 slots=8"], even.stderr
