"""The sbatch scripts and what a cluster user brings to them: `sbatch -c N` and a CRLF cluster.env.

srun of SLURM 22.05 to 23.02 does not take the job's --cpus-per-task (it reads SRUN_CPUS_PER_TASK
only, as its man page says), so under `sbatch -c 10` every srun task of both scripts got one CPU:
a rank's affinity mask, by which data.num_workers=-1 sizes its loaders, was one core. A
cluster.env saved with Windows line ends and sourced as the README says left "\\r" at the end of
every value: PYTHON=.../python\\r reached srun, and every rank failed on a path that looks right.

The scripts run by hand with a 2-node job's SLURM variables; scontrol, srun and scancel are small
stand-ins on PATH (srun records its environment's SRUN_CPUS_PER_TASK and its command), so no
cluster is needed.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # every test runs a batch script with bash

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {
    "srun": ROOT / "launch" / "slurm" / "srun.sbatch",
    "deepspeed": ROOT / "launch" / "slurm" / "deepspeed.sbatch",
}
CLUSTER_ENV_EXAMPLE = ROOT / "launch" / "cluster.env.example"

SCONTROL = """#!/bin/bash
[[ "$1 $2" == "show hostnames" ]] && printf 'n1\\nn2\\n'
exit 0
"""
SRUN = """#!/bin/bash
{ printf 'SRUN_CPUS_PER_TASK=%s\\n' "${SRUN_CPUS_PER_TASK:-}"; printf '%s\\n' "$@"; } >"$SRUN_RECORD"
exit 0
"""


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("scontrol", SCONTROL), ("srun", SRUN), ("scancel", "#!/bin/bash\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch-%j"),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_TASKS_PER_NODE": "1(x2)",
        "SLURM_NTASKS": "2",
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHON": "false",  # no output_dir: the run's end markers are not checked
        "SRUN_RECORD": str(tmp_path / "srun-record"),
        **extra,
    }


def srun_record(tmp_path: Path) -> list[str]:
    record = tmp_path / "srun-record"
    return record.read_text().splitlines() if record.exists() else []


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sbatch_cpus_per_task_reaches_srun(tmp_path: Path, script: str) -> None:
    proc = subprocess.run(
        ["bash", str(SCRIPTS[script]), "x=1"],
        cwd=ROOT,
        env=job_env(tmp_path, SLURM_CPUS_PER_TASK="10"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert srun_record(tmp_path)[0] == "SRUN_CPUS_PER_TASK=10", (srun_record(tmp_path), proc.stderr)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_user_srun_cpus_per_task_and_no_cpus_per_task_are_kept(tmp_path: Path, script: str) -> None:
    for extra, expected in (
        ({"SLURM_CPUS_PER_TASK": "10", "SRUN_CPUS_PER_TASK": "4"}, "SRUN_CPUS_PER_TASK=4"),
        ({}, "SRUN_CPUS_PER_TASK="),
    ):
        proc = subprocess.run(
            ["bash", str(SCRIPTS[script]), "x=1"],
            cwd=ROOT,
            env=job_env(tmp_path, **extra),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert srun_record(tmp_path)[0] == expected, (extra, srun_record(tmp_path))


def run_with_cluster_env(tmp_path: Path, script: str, cluster_env: Path) -> subprocess.CompletedProcess:
    """The README's way: `set -a; source launch/cluster.env; set +a`, then the batch script (as sbatch
    runs it, with the submitting shell's environment). The sourcing's own complaints are dropped."""
    command = f'{{ set -a; source "{cluster_env}"; set +a; }} 2>/dev/null; exec bash "{SCRIPTS[script]}" x=1'
    return subprocess.run(
        ["bash", "-c", command],
        cwd=ROOT,
        env=job_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_crlf_cluster_env_is_one_line_before_srun(tmp_path: Path, script: str) -> None:
    text = CLUSTER_ENV_EXAMPLE.read_text()
    lf_env = tmp_path / "cluster.env"
    lf_env.write_text(text)
    proc = run_with_cluster_env(tmp_path, script, lf_env)
    assert proc.returncode == 0, proc.stderr
    assert srun_record(tmp_path), "the example, as shipped, did not reach srun"
    (tmp_path / "srun-record").unlink()

    crlf_env = tmp_path / "cluster-crlf.env"
    crlf_env.write_bytes(text.replace("\n", "\r\n").encode())
    proc = run_with_cluster_env(tmp_path, script, crlf_env)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in ("PYTHON", "NCCL_SOCKET_IFNAME", "carriage return", "cluster.env"):
        assert word in lines[0], proc.stderr
    assert not srun_record(tmp_path), "srun was started"
