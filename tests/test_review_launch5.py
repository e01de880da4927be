"""deepspeed.sbatch / ds_node.sh / srun.sbatch on the loopback SLURM cluster (tests/slurm_cluster.py):
rank counts with a leading zero, a GPUS_PER_NODE that is no number, and a MASTER_PORT that is no port.

The deepspeed launcher is a stand-in (the PYTHON the scripts start it with): it records its command
line and exits 0, so a job with 8 ranks per node costs nothing; every other use of PYTHON (the config
look-up, the port probe) runs the real interpreter.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

from slurm_cluster import running_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ARGS = ["--config", "vutrain/configs/tiny.yaml"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


def stand_in_python(tmp_path: Path) -> Path:
    """`-m deepspeed.launcher.runner ARGS` writes ARGS, one a line, to $ARGV_FILE and exits 0."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "-u -m" && "$3" == deepspeed.launcher.runner ]]; then\n'
        '    shift 3; printf "%s\\n" "$@" > "$ARGV_FILE"; exit 0\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def submit(cluster, tmp_path: Path, script: str, **env: str) -> tuple[dict[str, str], str]:
    """Run `script` on node n1 with the stand-in launcher; the job record and its log."""
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
    job = cluster.sbatch(
        "-N", "1", "-w", "n1", "-o", str(log), script, *ARGS, f"output_dir={tmp_path / 'run'}", **job_env
    )  # fmt: skip
    info = cluster.wait_job(job, timeout=120)
    return info, (log.read_text(errors="replace") if log.exists() else "<no log>")


def launcher_argv(tmp_path: Path) -> list[str]:
    argv_file = tmp_path / "argv"
    assert argv_file.exists(), "the deepspeed launcher was never started"
    return argv_file.read_text().splitlines()


@pytest.mark.parametrize(
    "env",
    [{"CPU_RANKS_PER_NODE": "08"}, {"GPUS_PER_NODE": "08"}, {"CPU_RANKS_PER_NODE": "010"}],
    ids=["cpu-ranks-08", "gpus-per-node-08", "cpu-ranks-010"],
)
def test_deepspeed_sbatch_reads_ranks_per_node_as_decimal(cluster, tmp_path, env):
    """CPU_RANKS_PER_NODE or GPUS_PER_NODE with a leading zero is that many ranks, as local.sh reads
    NGPUS: the hostfile says slots=N, the start-up line N ranks, and the launcher gets that hostfile
    (before, "08" was refused as "not a positive integer" after bash's octal error, and "010" made a
    world of 8 in the log over a hostfile of slots=10)."""
    ranks = int(next(iter(env.values())), 10)
    info, text = submit(cluster, tmp_path, "launch/slurm/deepspeed.sbatch", **env)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert "ERROR" not in text and "value too great" not in text, text
    assert f"1 nodes x {ranks} ranks = {ranks}," in text, text
    argv = launcher_argv(tmp_path)
    hostfile = Path(argv[argv.index("--hostfile") + 1])
    assert hostfile.read_text() == f"n1 slots={ranks}\n"


def test_ds_node_reads_hostfile_slots_as_decimal(cluster, tmp_path):
    """A HOSTFILE line `n1 slots=08` on a node whose CUDA_VISIBLE_DEVICES is 0..7: ds_node.sh checks
    the GPUs against 8 slots and starts the launcher (before, bash's octal error left it comparing
    against no GPUs at all, and it refused the node as a shared one)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=08\n")
    info, text = submit(
        cluster, tmp_path, "launch/slurm/deepspeed.sbatch",
        HOSTFILE=str(hostfile), CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7",
    )  # fmt: skip
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert "ERROR" not in text and "value too great" not in text, text
    argv = launcher_argv(tmp_path)
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert argv[argv.index("--node_rank") + 1] == "0"


def test_gpus_per_node_that_is_no_number_is_one_line(cluster, tmp_path):
    """GPUS_PER_NODE=eight on a node with a GPU visible: one error line naming the variable, and no
    launcher (before, bash's `set -u` stopped the script with "eight: unbound variable")."""
    info, text = submit(
        cluster, tmp_path, "launch/slurm/deepspeed.sbatch", GPUS_PER_NODE="eight", CUDA_VISIBLE_DEVICES="0"
    )
    assert info["JobState"] == "FAILED", f"{info}\n{text}"
    assert text.strip().splitlines() == [
        "[vutrain-launch] ERROR: GPUS_PER_NODE must be a positive integer (ranks per node), got 'eight'."
    ], text
    assert not (tmp_path / "argv").exists()


@pytest.mark.parametrize("script", ["launch/slurm/deepspeed.sbatch", "launch/slurm/srun.sbatch"])
def test_master_port_that_is_no_port_is_one_line(cluster, tmp_path, script):
    """An exported MASTER_PORT=29500:1 stops either sbatch script with exit 2 and one line that says
    what to do, before any launcher or rank starts (before, under deepspeed.sbatch every node's
    launcher printed DeepSpeed's argparse usage; under srun.sbatch every rank imported torch only to
    refuse it)."""
    info, text = submit(cluster, tmp_path, script, MASTER_PORT="29500:1")
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert text.strip().splitlines() == [
        "[vutrain-launch] ERROR: MASTER_PORT=29500:1 is not a TCP port (1-65535). Set MASTER_PORT to a "
        "free port number, or unset it to have a free one picked."
    ], text
    assert not (tmp_path / "argv").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name,line",
    [
        ("VUTRAIN_MAX_RESTARTS", "is not a whole number of requeues. Set it to e.g. 50, or unset it."),
        ("VUTRAIN_SRUN_WAIT", "is not a whole number of seconds. Set it to e.g. 300, or unset it."),
        (
            "VUTRAIN_PREEMPT_RESEND_S",
            "is not a number of seconds (0: never resend). Set it to e.g. 30, or unset it.",
        ),
    ],
)
def test_preemption_setting_that_is_no_number_is_one_line(cluster, tmp_path, name, line):
    """A requeue limit or wait that is no number stops the job at start-up with one line (exit 2),
    before any launcher starts. Before, VUTRAIN_MAX_RESTARTS=ten was read only at the requeue
    decision, after the checkpoint, where `set -u` stopped the script ("ten: unbound variable") and
    the job failed instead of coming back; VUTRAIN_PREEMPT_RESEND_S=ten silently ended the re-sender
    (sleep refused it); VUTRAIN_SRUN_WAIT=ten stopped srun with its own message."""
    info, text = submit(cluster, tmp_path, "launch/slurm/deepspeed.sbatch", **{name: "ten"})
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", f"{info}\n{text}"
    assert text.strip().splitlines() == [f"[vutrain-launch] ERROR: {name}=ten {line}"], text
    assert not (tmp_path / "argv").exists()


def test_max_restarts_with_a_leading_zero_is_decimal(cluster, tmp_path):
    """VUTRAIN_MAX_RESTARTS=08 and a launcher that exits 75 (preempted) on the first start: the job is
    requeued, with no arithmetic noise in the log (before, bash read 08 as octal at the requeue
    decision and printed "value too great for base"). The requeued job is cancelled at once."""
    fake = stand_in_python(tmp_path)
    text = fake.read_text().replace('> "$ARGV_FILE"; exit 0', '> "$ARGV_FILE"; exit 75')
    fake.write_text(text)
    log = tmp_path / "job.log"
    job = cluster.sbatch(
        "-N", "1", "-w", "n1", "-o", str(log), "launch/slurm/deepspeed.sbatch", *ARGS,
        f"output_dir={tmp_path / 'run'}",
        PYTHON=str(fake), ARGV_FILE=str(tmp_path / "argv"), VUTRAIN_LAUNCH_DIR=str(tmp_path / "launch"),
        MASTER_PORT=str(free_port()), VUTRAIN_MAX_RESTARTS="08", GPUS_PER_NODE="", CPU_RANKS_PER_NODE="",
        CUDA_VISIBLE_DEVICES="", HOSTFILE="", WORLD_SIZE="",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "training step exited" not in (content := log.read_text() if log.exists() else ""):
            assert time.monotonic() < deadline, content
            time.sleep(0.5)
        time.sleep(2)  # the requeue decision follows the exit line
        content = log.read_text()
    finally:
        cluster.run("scancel", str(job), check=False)
    assert "value too great" not in content, content
    assert f"requeueing job {job}" in content, content
