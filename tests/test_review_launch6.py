"""deepspeed.sbatch / srun.sbatch on the loopback SLURM cluster (tests/slurm_cluster.py): the
preemption switches written another way (VUTRAIN_REQUEUE=false, VUTRAIN_PREEMPT_RESEND_S=00), and
trainer arguments with spaces and quotes passed through with the training's exit code.

The deepspeed launcher (deepspeed.sbatch) and the trainer (srun.sbatch) are a stand-in: the PYTHON
the scripts start them with records its command line, sleeps $STAND_IN_SLEEP seconds with SIGUSR1
ignored as ds_node.sh leaves it, and exits $STAND_IN_EXIT; every other use of PYTHON (the config
look-up, the port probe) runs the real interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

from slurm_cluster import running_cluster

pytestmark = [pytest.mark.slow]

ARGS = ["--config", "vutrain/configs/tiny.yaml"]
DEEPSPEED = "launch/slurm/deepspeed.sbatch"
SRUN = "launch/slurm/srun.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def stand_in_python(tmp_path: Path) -> Path:
    """The launcher (`-m deepspeed.launcher.runner ARGS`) or trainer (`-u vutrain/train.py ARGS`):
    writes ARGS, one a line, to $ARGV_FILE, sleeps, exits $STAND_IN_EXIT."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2 $3" == "-u -m deepspeed.launcher.runner" || "$1 $2" == "-u "*/train.py ]]; then\n'
        '    [[ "$2" == -m ]] && shift 3 || shift 1\n'
        '    printf "%s\\n" "$@" > "$ARGV_FILE"\n'
        '    sleep "${STAND_IN_SLEEP:-0}"; exit "${STAND_IN_EXIT:-0}"\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def submit(cluster, tmp_path: Path, script: str, args: list[str], **env: str) -> tuple[int, Path]:
    """Start `script` on node n1 with the stand-in; the job id and its log file."""
    log = tmp_path / "job.log"
    job_env = {
        "PYTHON": str(stand_in_python(tmp_path)),
        "ARGV_FILE": str(tmp_path / "argv"),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch"),
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    for name in ("GPUS_PER_NODE", "CPU_RANKS_PER_NODE", "CUDA_VISIBLE_DEVICES", "HOSTFILE", "WORLD_SIZE"):
        job_env.setdefault(name, "")
    for name in ("VUTRAIN_REQUEUE", "VUTRAIN_PREEMPT_RESEND_S", "VUTRAIN_MAX_RESTARTS"):
        job_env.setdefault(name, "")
    job = cluster.sbatch("-N", "1", "-w", "n1", "-o", str(log), script, *args, **job_env)
    return job, log


def log_text(log: Path) -> str:
    return log.read_text(errors="replace") if log.exists() else "<no log>"


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def wait_ended_or_requeued(cluster, job: int, timeout: float = 60.0) -> dict[str, str]:
    """The job's record once it has ended, or been requeued (it is PENDING again, Restarts=1)."""
    info: dict[str, str] = {}

    def settled() -> bool:
        info.update(cluster.job(job))
        return info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") or info.get("Restarts") != "0"

    wait_for(settled, f"job {job} to end or be requeued", timeout)
    return info


def preempted_job_not_requeued(cluster, tmp_path: Path, script: str, args: list[str], **env: str) -> str:
    """Run `script` with a training that exits 75 (preempted) under settings `env` that forbid a
    requeue: the job ends FAILED with 75 and was not restarted. Its log text."""
    job, log = submit(cluster, tmp_path, script, args, STAND_IN_EXIT="75", **env)
    try:
        info = wait_ended_or_requeued(cluster, job)
    finally:
        cluster.run("scancel", str(job), check=False)
    text = log_text(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "75:0", f"{info}\n{text}"
    assert info["Restarts"] == "0", f"{info}\n{text}"
    return text


@pytest.mark.slurm
@pytest.mark.parametrize("value", ["false", "no", "OFF"])
def test_requeue_off_spelled_as_a_word_does_not_requeue(cluster, tmp_path, value):
    """VUTRAIN_REQUEUE=false (no, OFF) and a training that exits 75 (preempted): the job ends with 75
    and is not requeued (before, only "0" meant off: the job was requeued and came back)."""
    text = preempted_job_not_requeued(
        cluster, tmp_path, DEEPSPEED, [*ARGS, f"output_dir={tmp_path / 'run'}"], VUTRAIN_REQUEUE=value
    )
    assert f"VUTRAIN_REQUEUE={value} so not requeueing" in text, text
    assert "requeueing job" not in text, text


@pytest.mark.slurm
def test_requeue_value_that_is_no_switch_is_one_line(cluster, tmp_path):
    """VUTRAIN_REQUEUE=maybe stops the job at start-up with one line and exit 2, before the launcher
    starts (before, it was read only after a preemption, as "requeue")."""
    job, log = submit(
        cluster, tmp_path, DEEPSPEED, [*ARGS, f"output_dir={tmp_path / 'run'}"], VUTRAIN_REQUEUE="maybe"
    )
    info = cluster.wait_job(job, timeout=60)
    text = log_text(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert text.strip().splitlines() == [
        "[vutrain-launch] ERROR: VUTRAIN_REQUEUE=maybe is neither on nor off. "
        "Set it to 0 (or false, no, off) to not requeue a preempted job, or unset it to requeue."
    ], text
    assert not (tmp_path / "argv").exists()


@pytest.mark.slurm
@pytest.mark.parametrize("resend", ["00", "0.0"])
def test_resend_interval_of_zero_written_otherwise_never_resends(cluster, tmp_path, resend):
    """VUTRAIN_PREEMPT_RESEND_S=00 (or 0.0) means never resend, as 0 does: after a USR1 to the batch
    shell the steps get one SIGUSR1 and no re-sends while they run on for 3 s (before, the re-sender
    ran `sleep 00` in a loop: SIGUSR1 again and again without a pause, hundreds of times)."""
    job, log = submit(
        cluster, tmp_path, DEEPSPEED, [*ARGS, f"output_dir={tmp_path / 'run'}"],
        VUTRAIN_PREEMPT_RESEND_S=resend, VUTRAIN_REQUEUE="0", STAND_IN_SLEEP="3", STAND_IN_EXIT="75",
    )  # fmt: skip
    try:
        wait_for(lambda: (tmp_path / "argv").exists(), "the launcher to start")
        cluster.run("scancel", "--signal=USR1", "--batch", str(job))
        info = cluster.wait_job(job, timeout=60)
    finally:
        cluster.run("scancel", str(job), check=False)
    text = log_text(log)
    assert "batch script got SIGUSR1" in text, text
    assert info["ExitCode"] == "75:0", f"{info}\n{text}"
    assert "sending SIGUSR1 again" not in text, text


ODD_ARGS = ["name=run with spaces", 'note=it\'s "quoted"', "tags=a  b", "*", "$HOME"]


@pytest.mark.slurm
@pytest.mark.parametrize("script", [DEEPSPEED, SRUN])
def test_odd_arguments_and_exit_code_pass_through(cluster, tmp_path, script):
    """An output_dir with a space and arguments with quotes, double spaces, a glob and a `$` reach the
    launcher (or the trainer) unchanged, one argument each, and the training's exit code 3 is the
    job's."""
    out_dir = tmp_path / "my run's dir"
    args = [*ARGS, f"output_dir={out_dir}", *ODD_ARGS]
    job, log = submit(cluster, tmp_path, script, args, STAND_IN_EXIT="3")
    info = cluster.wait_job(job, timeout=60)
    text = log_text(log)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", f"{info}\n{text}"
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[-len(args) :] == args, argv


REPO = Path(__file__).resolve().parent.parent


def test_local_sh_counts_no_gpu_behind_cuda_visible_devices_minus_one(tmp_path):
    """CUDA_VISIBLE_DEVICES=-1 (the usual way to force a CPU run) shows no GPU: NGPUS=2 starts two CPU
    ranks (before, "-1" counted as one GPU and local.sh refused: "NGPUS=2 but only 1 GPUs are
    visible")."""
    env = {
        **os.environ, "PYTHON": str(stand_in_python(tmp_path)), "ARGV_FILE": str(tmp_path / "argv"),
        "CUDA_VISIBLE_DEVICES": "-1", "NGPUS": "2",
    }  # fmt: skip
    for name in ("HOSTFILE", "MASTER_PORT", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run(
        ["bash", str(REPO / "launch/local.sh"), *ARGS], env=env, cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "no GPU visible: 2 CPU rank(s)" in proc.stderr, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[:2] == ["--num_gpus", "2"], argv


@pytest.mark.parametrize("visible,slots", [("0,-1,1", 1), ("NoDevFiles", 1), ("0,1,2", 3)])
def test_make_hostfile_counts_gpus_up_to_the_first_invalid_entry(tmp_path, visible, slots):
    """The default slots are the GPUs CUDA shows: it stops at the first entry that is no index or
    UUID, so "0,-1,1" is one GPU (before, three entries made slots=3, two ranks on hidden GPUs)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": visible}
    env.pop("SLURM_GPUS_ON_NODE", None)
    proc = subprocess.run(
        ["bash", str(REPO / "launch/make_hostfile.sh"), "a,b"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"a slots={slots}", f"b slots={slots}"], proc.stdout
