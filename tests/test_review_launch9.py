"""launch/local.sh when DeepSpeed's launch.py dies of a signal (kill -9, the OOM killer).

DeepSpeed's runner passes on only positive exit codes of launch.py, so it exits 0 then, and the
ranks launch.py had started train on, orphaned. local.sh now knows launch.py came up (the runner's
--save_pid file) and finds the ranks by a VUTRAIN_LAUNCH_ID in their environment: a launch.py killed
before its trainer started is not a success, and orphaned ranks are stopped (SIGTERM: they
checkpoint) instead of left running. Real runner, launch.py and trainer, one CPU rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
CONFIG = str(ROOT / "vutrain" / "configs" / "tiny.yaml")


def processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of the live processes whose command line holds `marker`."""
    found = {}
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and (proc_dir / "stat").read_text().split(") ")[-1][0] != "Z":
                cmdline = (proc_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if marker in cmdline:
                    found[int(proc_dir.name)] = cmdline
        except OSError:  # gone meanwhile
            pass
    return found


def launch_tiny_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(shards), "--num-samples", "32",
         "--shard-size", "8"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    out = tmp_path / "run"
    args = [
        "--config", CONFIG, f"output_dir={out}", f"data.train_shards={shards}/train/{{00000..00003}}.tar",
        "data.val_shards=", "eval.every=0", "train.max_steps=100000", "train.checkpoint_every=0",
        "train.micro_batch_size=4", "data.num_workers=0", "train.log_every=1",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE")}
    env.update(
        NGPUS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        PYTHON=sys.executable, MASTER_PORT=str(free_port()), VUTRAIN_LEFTOVER_WAIT="60",
    )  # fmt: skip
    launch = subprocess.Popen(
        ["bash", str(LOCAL_SH), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    return launch, out


def kill_launch_py_once(launch: subprocess.Popen, out: Path, ready: Callable[[dict[int, str]], bool]) -> str:
    """SIGKILL the run's launch.py as soon as `ready(its processes)`; local.sh's stderr once it exits.
    Whatever of the run still runs then is killed (and the test fails on it)."""
    try:
        deadline = time.monotonic() + 120
        while not ready(procs := processes_with(str(out))):
            assert launch.poll() is None, launch.communicate()
            assert time.monotonic() < deadline, f"not ready within 120 s: {procs}"
            time.sleep(0.05)
        launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        assert len(launch_py) == 1, procs
        os.kill(launch_py[0], signal.SIGKILL)
        _, stderr = launch.communicate(timeout=120)
    finally:
        if launch.poll() is None:
            launch.kill()
        left = processes_with(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived local.sh: {left}\n{stderr}"
    return stderr


def has_rank(procs: dict[int, str]) -> bool:
    return any("--local_rank" in cmd and "train.py" in cmd for cmd in procs.values())


def test_launch_py_killed_before_its_trainer_started_is_no_success(tmp_path):
    """launch.py killed while its rank still imports torch (no config.yaml yet): the runner exits 0;
    local.sh must stop the orphaned rank and exit 1 with one line (it exited 0, the rank trained on)."""
    launch, out = launch_tiny_run(tmp_path)
    config = out / "config.yaml"
    stderr = kill_launch_py_once(launch, out, lambda procs: has_rank(procs) and not config.exists())
    assert launch.returncode == 1, stderr
    assert "launch.py died" in stderr, stderr
    assert "Traceback" not in stderr.split("outlived its launcher")[-1], stderr


def test_ranks_of_a_killed_launch_py_are_stopped_with_a_checkpoint(tmp_path):
    """launch.py killed while its rank trains: local.sh sends the orphaned rank SIGTERM, the rank
    writes its preemption checkpoint, and local.sh exits 75 (resume with the same command); no
    process of the run is left (the rank trained on, orphaned, and local.sh exited 1)."""
    launch, out = launch_tiny_run(tmp_path)
    metrics = out / "metrics.jsonl"
    stderr = kill_launch_py_once(launch, out, lambda procs: metrics.exists() and metrics.stat().st_size > 0)
    assert launch.returncode == 75, stderr
    assert "outlived its launcher" in stderr, stderr
    assert json.loads((out / "preempted.json").read_text())["step"] > 0
    assert list((out / "checkpoints").glob("step_*")), stderr
