"""Shared pieces of the tests that SIGKILL DeepSpeed's launch.py under a real launcher (local.sh,
ds_node.sh): a tiny one-rank training run's arguments and its start under local.sh, the run's live
processes, and the kill."""

from __future__ import annotations

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


def has_rank(procs: dict[int, str]) -> bool:
    return any("--local_rank" in cmd and "train.py" in cmd for cmd in procs.values())


def endless_tiny_run_args(tmp_path: Path) -> tuple[list[str], Path]:
    """Trainer arguments of a tiny run that trains until stopped (32 synthetic samples, no eval, no
    periodic checkpoint, a metrics row every step), and its output folder."""
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
    return args, out


def start_tiny_run(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """local.sh on an endless one-rank CPU run, in a process group of its own."""
    args, out = endless_tiny_run_args(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE")}
    env.update(
        NGPUS="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
        PYTHON=sys.executable, MASTER_PORT=str(free_port()), VUTRAIN_LEFTOVER_WAIT="60",
    )  # fmt: skip
    launch = subprocess.Popen(
        ["bash", str(LOCAL_SH), *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    return launch, out


def kill_launch_py_once(
    launcher: subprocess.Popen, out: Path, ready: Callable[[dict[int, str]], bool], name: str
) -> str:
    """SIGKILL the run's launch.py as soon as `ready(its processes)`; the launcher's stderr once it
    exits. Whatever of the run still runs then is killed (and the test fails on it)."""
    stderr = ""
    try:
        deadline = time.monotonic() + 120
        while not ready(procs := processes_with(str(out))):
            assert launcher.poll() is None, launcher.communicate()
            assert time.monotonic() < deadline, f"not ready within 120 s: {procs}"
            time.sleep(0.05)
        launch_py = [pid for pid, cmd in procs.items() if "deepspeed.launcher.launch" in cmd]
        assert len(launch_py) == 1, procs
        os.kill(launch_py[0], signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        left = processes_with(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the run outlived {name}: {left}\n{stderr}"
    return stderr
