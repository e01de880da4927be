"""launch/local.sh, common.sh's run_preemptible (deepspeed.sbatch, srun.sbatch) and write_deepspeed_env:
an exit 0 of DeepSpeed's runner for a run that did not end, and environment values .deepspeed_env
cannot carry.

DeepSpeed's runner passes on only positive exit codes of its launch.py: a launch.py killed by a
signal (kill -9, the OOM killer) made it exit 0, and the scripts reported a run that died as done.
The first test kills the real launch.py (and its rank) of a real 1-rank CPU run; the others use a
stand-in launcher (the PYTHON the scripts start it with) that does what the trainer does to its
output_dir (config.yaml at the start, done.json or preempted.json at the end), so each case costs no
torch import. No SLURM needed: run_preemptible is called from a shell that sources common.sh.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
COMMON_SH = ROOT / "launch" / "common.sh"
CONFIG = str(ROOT / "vutrain" / "configs" / "tiny.yaml")
NO_END_MARKER = "left neither done.json nor preempted.json"


def base_env(**env: str) -> dict[str, str]:
    full = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE")}
    full.update(NGPUS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    full.update(env)
    return full


def processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of the processes whose command line holds `marker`."""
    found = {}
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit():
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if marker in cmdline:
                    found[int(proc_dir.name)] = cmdline
        except OSError:  # gone meanwhile
            pass
    return found


def make_shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(shards), "--num-samples", "32",
         "--shard-size", "8"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return shards


def test_local_run_whose_launch_py_is_killed_is_not_reported_as_done(tmp_path):
    """The real runner, launch.py and trainer (1 CPU rank): once the trainer has started (its
    config.yaml), launch.py and then the rank are killed with SIGKILL. The runner exits 0 (it checks
    `returncode > 0`); local.sh must exit 1 with one line saying the run did not end (it exited 0)."""
    shards = make_shards(tmp_path)
    out = tmp_path / "run"
    args = [
        "--config", CONFIG, f"output_dir={out}", f"data.train_shards={shards}/train/{{00000..00003}}.tar",
        "data.val_shards=", "eval.every=0", "train.max_steps=100000", "train.checkpoint_every=0",
        "train.micro_batch_size=4", "data.num_workers=0",
    ]  # fmt: skip
    env = base_env(PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    launch = subprocess.Popen(
        ["bash", str(LOCAL_SH), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.yaml").exists():
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline, "the trainer did not start within 120 s"
            time.sleep(0.2)
        procs = processes_with(str(out))
        launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        ranks = [pid for pid, cmd in procs.items() if "--local_rank" in cmd and "train.py" in cmd]
        assert len(launch_py) == 1 and len(ranks) == 1, procs
        os.kill(launch_py[0], signal.SIGKILL)  # first: a rank's death would be reported (exit 247)
        time.sleep(0.5)
        os.kill(ranks[0], signal.SIGKILL)
        _, stderr = launch.communicate(timeout=60)
    finally:
        if launch.poll() is None:
            launch.kill()
        for pid in processes_with(str(out)):
            os.kill(pid, signal.SIGKILL)
    assert launch.returncode == 1, stderr
    assert NO_END_MARKER in stderr and str(out) in stderr, stderr


def stand_in_python(tmp_path: Path) -> Path:
    """`-u -m deepspeed.launcher.runner ...` does to $RUN_DIR what the trainer does (config.yaml at
    the start, then the files named in $END_FILES) unless $STARTS is 0, and exits $STAND_IN_EXIT;
    every other call (the config look-up, the port probe) runs the real interpreter."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        'if [[ "$1 $2 $3" == "-u -m deepspeed.launcher.runner" ]]; then\n'
        '    if [[ "$STARTS" == 1 ]]; then\n'
        '        mkdir -p "$RUN_DIR"; sleep 0.02; echo "seed: 0" > "$RUN_DIR/config.yaml"\n'
        '        rm -f "$RUN_DIR/done.json" "$RUN_DIR/preempted.json"\n'
        "    fi\n"
        '    for f in $END_FILES; do echo "{}" > "$RUN_DIR/$f"; done\n'
        '    exit "$STAND_IN_EXIT"\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize(
    "starts,end_files,launcher_exit,want",
    [
        ("1", "", "0", 1),  # started, no marker: what a launch.py killed by a signal leaves
        ("1", "done.json", "0", 0),
        ("1", "preempted.json", "0", 75),  # the ranks checkpointed before launch.py died
        ("1", "preempted.json", "75", 75),
        ("1", "", "3", 3),
        ("0", "", "0", 0),  # the trainer never started in this launch (a stand-in): taken at its word
        ("0", "done.json", "0", 0),  # a finished run's old done.json, nothing started
    ],
    ids=["no-marker", "done", "preempted-exit-0", "preempted-exit-75", "failure", "no-start", "old-run"],
)
def test_local_exit_status_follows_the_runs_end_markers(tmp_path, starts, end_files, launcher_exit, want):
    """local.sh's status when the launcher returns: a 0 stands only for a run that started and left
    done.json; preempted.json is 75; neither is 1 with one line; other codes are passed on."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("seed: 0\n")  # an earlier start's, as a resumed run has
    env = base_env(
        PYTHON=str(stand_in_python(tmp_path)), RUN_DIR=str(out), STARTS=starts, END_FILES=end_files,
        STAND_IN_EXIT=launcher_exit,
    )  # fmt: skip
    if starts == "0" and end_files:
        (out / "done.json").write_text("{}")
    proc = subprocess.run(
        ["bash", str(LOCAL_SH), "--config", CONFIG, f"output_dir={out}"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == want, proc.stderr
    assert (NO_END_MARKER in proc.stderr) == (want == 1), proc.stderr


def run_preemptible(tmp_path: Path, step: str) -> subprocess.CompletedProcess:
    """common.sh's run_preemptible (deepspeed.sbatch's and srun.sbatch's) on the command `step`,
    the run directory tmp_path/run; VUTRAIN_REQUEUE=0, so a preemption returns 75 without scontrol."""
    script = f'source "{COMMON_SH}"; run_preemptible "$1" bash -c "$2"; echo "status $?"'
    return subprocess.run(
        ["bash", "-c", script, "sbatch", str(tmp_path / "run"), step],
        env=base_env(SLURM_JOB_ID="7", VUTRAIN_REQUEUE="0"), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    "end_file,want",
    [("", "status 1"), ("done.json", "status 0"), ("preempted.json", "status 75")],
    ids=["no-marker", "done", "preempted"],
)
def test_sbatch_step_exit_0_follows_the_runs_end_markers(tmp_path, end_file, want):
    """A job step (srun of ds_node.sh's launcher) that exits 0 after its trainer started: done.json
    keeps 0, preempted.json is a preemption (75, requeued unless VUTRAIN_REQUEUE=0), neither is 1
    with one line (the job was COMPLETED, and never requeued)."""
    run = tmp_path / "run"
    end = f'echo {{}} > "{run}/{end_file}"; ' if end_file else ""
    step = f'mkdir -p "{run}"; sleep 0.02; echo seed: 0 > "{run}/config.yaml"; {end}exit 0'
    proc = run_preemptible(tmp_path, step)
    assert proc.stdout.strip().splitlines()[-1] == want, proc.stderr
    assert (NO_END_MARKER in proc.stderr) == (want == "status 1"), proc.stderr


def test_sbatch_step_that_started_no_trainer_keeps_its_status(tmp_path):
    """A step that never writes config.yaml (a stand-in, a run refused at start-up) keeps its 0."""
    proc = run_preemptible(tmp_path, "exit 0")
    assert proc.stdout.strip().splitlines()[-1] == "status 0", proc.stderr


def test_deepspeed_env_names_a_value_it_cannot_carry(tmp_path):
    """A variable whose value holds a newline is left out of .deepspeed_env with a line naming it
    (it was dropped without a word); the others are written."""
    env_file = tmp_path / ".deepspeed_env"
    env = base_env(NCCL_SOCKET_IFNAME="eth0\nib0", NCCL_DEBUG="INFO")
    proc = subprocess.run(
        ["bash", "-c", f'source "{COMMON_SH}"; write_deepspeed_env "$1"', "sbatch", str(env_file)],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = env_file.read_text().splitlines()
    assert "NCCL_DEBUG=INFO" in lines and not any(line.startswith("NCCL_SOCKET_IFNAME") for line in lines)
    assert "NCCL_SOCKET_IFNAME" in proc.stderr and "newline" in proc.stderr, proc.stderr
    assert len([line for line in proc.stderr.splitlines() if "NCCL_SOCKET_IFNAME" in line]) == 1
