"""launch/local.sh, make_hostfile.sh, deepspeed.sbatch and ds_node.sh: a second run into a running
run's output_dir, node lists that name a host twice, and hostfiles with Windows line ends.

The deepspeed launcher is a stand-in (the PYTHON local.sh starts it with): it marks that it started
and waits for a release file, so "the first run is still training" costs no torch import; every
other use of PYTHON (the config look-up, the port probe) runs the real interpreter. The
deepspeed.sbatch test runs on the loopback SLURM cluster of tests/slurm_cluster.py.
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

ROOT = Path(__file__).resolve().parents[1]
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"
LOCAL_SH = ROOT / "launch" / "local.sh"
MAKE_HOSTFILE = ROOT / "launch" / "make_hostfile.sh"
CONFIG = str(ROOT / "vutrain" / "configs" / "tiny.yaml")


def stand_in_python(tmp_path: Path) -> Path:
    """`-m deepspeed.launcher.runner ...` touches $STARTED_FILE, then exits 0 once $RELEASE_FILE exists."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "-u -m" && "$3" == deepspeed.launcher.runner ]]; then\n'
        '    : > "$STARTED_FILE"\n'
        '    for _ in $(seq 600); do [[ -e "$RELEASE_FILE" ]] && exit 0; sleep 0.05; done\n'
        "    exit 1\n"
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def local_env(tmp_path: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE")}
    env.update(
        PYTHON=str(stand_in_python(tmp_path)),
        NGPUS="1",
        CUDA_VISIBLE_DEVICES="",
        STARTED_FILE=str(tmp_path / f"started-{name}"),
        RELEASE_FILE=str(tmp_path / "release"),
    )
    return env


def start_local(tmp_path: Path, name: str, output_dir: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(LOCAL_SH), "--config", CONFIG, f"output_dir={output_dir}"],
        cwd=tmp_path,
        env=local_env(tmp_path, name),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_started(tmp_path: Path, name: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not (tmp_path / f"started-{name}").exists():
        assert proc.poll() is None, f"local.sh {name} exited {proc.returncode}: {proc.communicate()[1]}"
        assert time.monotonic() < deadline, f"local.sh {name} never started its launcher"
        time.sleep(0.05)


def test_second_local_run_into_a_running_runs_output_dir_is_refused(tmp_path):
    """While one local.sh run trains into output_dir, a second start into the same directory, spelled
    relative to where it is typed, waits 10 s for it, then stops in one line (exit 2) naming the
    directory, without starting its launcher; a run into another output_dir starts beside it, and
    once the first run has ended the same output_dir is free again (before, both trained into one
    checkpoints/ and resumed from each other's checkpoints without a word)."""
    first = start_local(tmp_path, "first", str(tmp_path / "run"))
    try:
        wait_started(tmp_path, "first", first)
        second = start_local(tmp_path, "second", "run")
        _, err = second.communicate(timeout=60)
        assert second.returncode == 2, err
        assert not (tmp_path / "started-second").exists()
        error_lines = [line for line in err.splitlines() if "ERROR" in line]
        assert len(error_lines) == 1 and "Traceback" not in err, err
        assert f"output_dir {tmp_path / 'run'} is in use by another launch/local.sh run" in error_lines[0]

        other = start_local(tmp_path, "other", "run_b")
        wait_started(tmp_path, "other", other)
    finally:
        (tmp_path / "release").touch()
        first.communicate(timeout=60)
    assert first.returncode == 0
    other.communicate(timeout=60)
    assert other.returncode == 0

    again = start_local(tmp_path, "again", "run")
    _, err = again.communicate(timeout=60)
    assert again.returncode == 0 and (tmp_path / "started-again").exists(), err


def test_make_hostfile_refuses_a_node_named_twice(tmp_path):
    """A node list that names a host twice, plainly or through a range, is one line naming the host
    (exit 2) and writes no hostfile: the file had the host on two lines, which every deepspeed
    launcher given it refused with a ValueError traceback. Distinct hosts still make one line each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for nodelist, repeated in [("gpu01,gpu02,gpu01", "gpu01"), ("n[1-2],n2,n[1-3]", "n1,n2")]:
        out = tmp_path / "hostfile"
        proc = subprocess.run(
            ["bash", str(MAKE_HOSTFILE), "-s", "2", "-o", str(out), nodelist],
            env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and f"names {repeated} more than once" in proc.stderr
        assert not out.exists()
    proc = subprocess.run(
        ["bash", str(MAKE_HOSTFILE), "-s", "2", "n[1-2],n3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "n1 slots=2\nn2 slots=2\nn3 slots=2\n"


def recording_python(tmp_path: Path) -> Path:
    """`-m deepspeed.launcher.runner ARGS` writes ARGS, one a line, to $ARGV_FILE and exits 0."""
    fake = tmp_path / "python-rec"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2" == "-u -m" && "$3" == deepspeed.launcher.runner ]]; then\n'
        '    shift 3; printf "%s\\n" "$@" > "$ARGV_FILE"; exit 0\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


def test_local_sh_reads_a_hostfile_with_windows_line_ends(tmp_path):
    """A one-host HOSTFILE saved with CRLF line ends (DeepSpeed's reader accepts it), blank CRLF line
    included, starts the launcher with that hostfile (before: refused as "got slots '2\\r'", and the
    blank line counted as a second host)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"# one box\r\nlocalhost slots=2\r\n\r\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "NGPUS", "WORLD_SIZE")}
    env.update(
        PYTHON=str(recording_python(tmp_path)),
        ARGV_FILE=str(tmp_path / "argv"),
        CUDA_VISIBLE_DEVICES="",
        HOSTFILE=str(hostfile),
    )
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), "--config", CONFIG, f"output_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)


def test_ds_node_reads_a_hostfile_with_windows_line_ends(tmp_path):
    """ds_node.sh on the second node of a CRLF hostfile with a blank CRLF line between the nodes
    starts its launcher as node rank 1, DeepSpeed's numbering, and reads its slots as 2 for the GPU
    check (before: the blank line counted as a node, giving rank 2 of 2 nodes, and the check refused
    slots '2\\r')."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"n1 slots=2\r\n\r\nn2 slots=2\r\n")
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    env.update(
        PYTHON=str(recording_python(tmp_path)),
        ARGV_FILE=str(tmp_path / "argv"),
        SLURMD_NODENAME="n2",
        CUDA_VISIBLE_DEVICES="0,1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT="29512",
    )
    proc = subprocess.run(
        ["bash", str(DS_NODE), str(hostfile), str(env_file), "--config", CONFIG],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("--node_rank") + 1] == "1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from running_cluster(tmp_path_factory)


@pytest.mark.slurm
def test_deepspeed_sbatch_takes_a_hostfile_with_windows_line_ends(cluster, tmp_path):
    """deepspeed.sbatch given a CRLF HOSTFILE (a comment and a blank line included) for its one node
    starts that node's launcher with the file, as node rank 0 (before: refused as "every line must
    read 'HOST slots=N' ..., got slots '2\\r'")."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_bytes(b"# the job's node\r\n\r\nn1 slots=2\r\n")
    log = tmp_path / "job.log"
    job_env = {
        "PYTHON": str(recording_python(tmp_path)),
        "ARGV_FILE": str(tmp_path / "argv"),
        "VUTRAIN_LAUNCH_DIR": str(tmp_path / "launch"),
        "MASTER_PORT": str(free_port()),
        "HOSTFILE": str(hostfile),
        "CUDA_VISIBLE_DEVICES": "0,1",
        **{name: "" for name in ("GPUS_PER_NODE", "CPU_RANKS_PER_NODE", "WORLD_SIZE")},
    }
    job = cluster.sbatch(
        "-N", "1", "-w", "n1", "-o", str(log), "launch/slurm/deepspeed.sbatch",
        "--config", CONFIG, f"output_dir={tmp_path / 'run'}", **job_env,
    )  # fmt: skip
    info = cluster.wait_job(job, timeout=120)
    text = log.read_text(errors="replace") if log.exists() else "<no log>"
    assert info["JobState"] == "COMPLETED", f"{info}\n{text}"
    assert "ERROR" not in text, text
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    assert argv[argv.index("--node_rank") + 1] == "0"
