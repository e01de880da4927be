"""launch/local.sh's rendezvous port between the draw and the bind; then local.sh's HOSTFILE on a GPU
machine, make_hostfile.sh's slot count and deepspeed.sbatch's HOSTFILE slots (real SLURM, loopback).

A port is free to local.sh's probe from the moment it is drawn until the ranks bind it, seconds
later (the deepspeed launcher and torch import first). A second launch in that window, drawing the
same port or given the same MASTER_PORT, was let through, and its ranks joined the first run's
rendezvous. A stand-in launcher (the PYTHON that local.sh starts it with) records its command line
and sleeps without binding, so the window stays open as long as the test needs; the port probe
itself still runs on the real interpreter.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import REPO, running_cluster

LOCAL = str(REPO / "launch" / "local.sh")


def stand_in_python(tmp_path: Path) -> Path:
    """A PYTHON for local.sh: `-c` (the port probe) runs the real interpreter; the launcher records
    its arguments to $ARGV_FILE and sleeps $LAUNCHER_SECONDS without binding anything."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'if [[ "$1" == -c ]]; then exec {sys.executable} "$@"; fi\n'
        'printf "%s\\n" "$@" > "$ARGV_FILE.tmp" && mv "$ARGV_FILE.tmp" "$ARGV_FILE"\n'
        'exec sleep "${LAUNCHER_SECONDS:-0}"\n'
    )
    fake.chmod(0o755)
    return fake


def local_env(python: Path, argv_file: Path, **env: str) -> dict[str, str]:
    full = dict(os.environ, PYTHON=str(python), ARGV_FILE=str(argv_file), NGPUS="1")
    for key in ("MASTER_PORT", "MASTER_ADDR", "HOSTFILE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        full.pop(key, None)
    full.update(env)
    return full


def wait_for_port(argv_file: Path, proc: subprocess.Popen, seconds: float = 20.0) -> int:
    """The --master_port the first launch gave its (stand-in) launcher."""
    deadline = time.monotonic() + seconds
    while not argv_file.exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the first launch never started its launcher"
        time.sleep(0.05)
    argv = argv_file.read_text().splitlines()
    return int(argv[argv.index("--master_port") + 1])


def test_master_port_drawn_by_a_starting_launch_is_refused(tmp_path):
    """While a first local.sh (MASTER_PORT unset) has started its launcher but no rank has bound
    the port it drew, a second local.sh given that port as MASTER_PORT stops with exit 2 and one
    error line naming the port and what to do, and starts no launcher (before, its probe found the
    port free and it launched onto it). Once the first launch is gone (killed with SIGKILL, no
    clean-up), the same MASTER_PORT is accepted: the reservation dies with its holder."""
    fake = stand_in_python(tmp_path)
    first_argv = tmp_path / "first.argv"
    first = subprocess.Popen(
        ["bash", LOCAL, "--config", "vutrain/configs/tiny.yaml"],
        env=local_env(fake, first_argv, LAUNCHER_SECONDS="60"),
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        port = wait_for_port(first_argv, first)
        second_argv = tmp_path / "second.argv"
        second = subprocess.run(
            ["bash", LOCAL, "--config", "vutrain/configs/tiny.yaml"],
            env=local_env(fake, second_argv, MASTER_PORT=str(port)),
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.communicate(timeout=30)
    assert second.returncode == 2, second.stderr
    errors = [line for line in second.stderr.splitlines() if "ERROR" in line]
    assert errors == [
        f"[vutrain-launch] ERROR: MASTER_PORT={port} is held by another launch/local.sh run on this host, "
        "whose ranks have not bound it yet. Set MASTER_PORT to another free port, or unset it to have a "
        "free one picked."
    ], second.stderr
    assert "Traceback" not in second.stderr
    assert not second_argv.exists(), "the second launch started its launcher on the first one's port"

    third_argv = tmp_path / "third.argv"
    third = subprocess.run(
        ["bash", LOCAL, "--config", "vutrain/configs/tiny.yaml"],
        env=local_env(fake, third_argv, MASTER_PORT=str(port)),
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert third.returncode == 0, third.stderr
    argv = third_argv.read_text().splitlines()
    assert argv[argv.index("--master_port") + 1] == str(port)


def test_make_hostfile_reads_slots_as_decimal(tmp_path):
    """`make_hostfile.sh -s 08` writes slots=8 on every host with nothing on stderr, as local.sh
    reads NGPUS=08 (before, bash read 08 as octal, printed "value too great for base" and refused
    it as "not a positive integer")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "make_hostfile.sh"), "-s", "08", "-o", str(tmp_path / "hosts"), "a,b"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert (tmp_path / "hosts").read_text() == "a slots=8\nb slots=8\n"


def test_hostfile_on_a_gpu_machine_without_cuda_visible_devices(tmp_path):
    """HOSTFILE (localhost slots=2) on a machine whose driver shows 2 GPUs (nvidia-smi; a stand-in
    here) and no CUDA_VISIBLE_DEVICES set, the usual workstation: the deepspeed launcher gets the
    hostfile and exits 0 (before, `set -u` stopped local.sh with "CUDA_VISIBLE_DEVICES: unbound
    variable", exit 1, before any launcher started)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/bash\necho "GPU 0: H100 (UUID: GPU-aa)"\necho "GPU 1: H100 (UUID: GPU-bb)"\n')
    smi.chmod(0o755)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv_file = tmp_path / "argv"
    env = local_env(stand_in_python(tmp_path), argv_file, HOSTFILE=str(hostfile))
    for key in ("NGPUS", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE"):
        env.pop(key, None)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    proc = subprocess.run(
        ["bash", LOCAL, "--config", "vutrain/configs/tiny.yaml"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "unbound variable" not in proc.stderr
    argv = argv_file.read_text().splitlines()
    assert argv[argv.index("--hostfile") + 1] == str(hostfile), argv
    assert "--num_gpus" not in argv, argv


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


@pytest.mark.slurm
@pytest.mark.parametrize(
    "line,shown",
    [("n1 slots=abc", "abc"), ("n1", "missing")],
    ids=["slots-not-a-number", "no-slots"],
)
def test_deepspeed_sbatch_hostfile_slots_must_be_a_count(cluster, tmp_path, line, shown):
    """deepspeed.sbatch with a HOSTFILE naming the job's node but no usable slot count: the job fails
    with one error line that names the file and the form 'HOST slots=N', and nothing else in the log
    (before, "slots=abc" stopped the script with bash's "abc: unbound variable", and a line without
    slots said "different slot counts per host ()")."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(line + "\n")
    log = tmp_path / "job.log"
    job = cluster.sbatch(
        "-N", "1", "-w", "n1", "-o", str(log), "launch/slurm/deepspeed.sbatch",
        "--config", "vutrain/configs/tiny.yaml", f"output_dir={tmp_path / 'run'}",
        HOSTFILE=str(hostfile), PYTHON=sys.executable, VUTRAIN_LAUNCH_DIR=str(tmp_path / "launch"),
    )  # fmt: skip
    info = cluster.wait_job(job, timeout=120)
    text = log.read_text(errors="replace") if log.exists() else "<no log>"
    assert info["JobState"] == "FAILED", f"{info}\n{text}"
    assert text.strip().splitlines() == [
        f"[vutrain-launch] ERROR: HOSTFILE={hostfile}: every line must read 'HOST slots=N' with N a "
        f"positive integer (the ranks per node), got slots '{shown}'."
    ], text
    assert not (tmp_path / "run").exists()
