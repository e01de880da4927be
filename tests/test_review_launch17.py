"""launch/local.sh and launch/slurm/ds_node.sh when DeepSpeed's launch.py is killed right after it
started, before either launcher's runner watcher (`wait_for_runner` in launch/common.sh, polling
every 0.1 s) saw it.

DeepSpeed's runner exits 0 when its launch.py dies of a signal. The watcher told that apart from a
launcher that never starts a launch.py only by seeing one among the runner's children; a launch.py
killed within a poll of its start (the OOM killer on a full node, a kill meant for another pid) was
never seen, and both scripts exited 0: a run reported done that trained nothing. Here launch.py kills
itself with SIGKILL as its interpreter starts (a `sitecustomize` module on PYTHONPATH that acts only
in a process running `-m deepspeed.launcher.launch`), milliseconds after the runner started it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from worker_ports import free_port

ROOT = Path(__file__).resolve().parents[1]
LOCAL_SH = ROOT / "launch" / "local.sh"
DS_NODE = ROOT / "launch" / "slurm" / "ds_node.sh"
CONFIG = str(ROOT / "vutrain" / "configs" / "tiny.yaml")

KILL_LAUNCH_PY = """\
import os, signal
with open("/proc/self/cmdline", "rb") as f:
    if b"\\0deepspeed.launcher.launch\\0" in f.read():
        os.kill(os.getpid(), signal.SIGKILL)
"""


def env_killing_launch_py(tmp_path: Path) -> dict[str, str]:
    """One CPU rank with the real interpreter, whose launch.py processes SIGKILL themselves at start."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_LAUNCH_PY)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM")}
    for name in ("MASTER_PORT", "HOSTFILE", "WORLD_SIZE", "NGPUS"):
        env.pop(name, None)
    env.update(
        PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", VUTRAIN_LEFTOVER_WAIT="30",
        PYTHONPATH=f"{hooks}:{ROOT}", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    return env


def run_launcher(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    # The runner did start a launch.py, which died at once: no rank, no config.yaml.
    assert "deepspeed.launcher.launch" in result.stdout + result.stderr, result.stderr
    return result


@pytest.mark.slow
def test_local_sh_launch_py_killed_at_start_is_no_success(tmp_path):
    """local.sh: a launch.py SIGKILLed as it starts makes the runner exit 0; local.sh exits 1 with
    the line saying launch.py died before the trainer started (it exited 0)."""
    out = tmp_path / "run"
    result = run_launcher(
        ["bash", str(LOCAL_SH), "--config", CONFIG, f"output_dir={out}"],
        {**env_killing_launch_py(tmp_path), "NGPUS": "1"}, tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "launch.py died before the trainer started" in result.stderr, result.stderr
    assert not (out / "config.yaml").exists()


@pytest.mark.slow
def test_ds_node_launch_py_killed_at_start_is_no_success(tmp_path):
    """ds_node.sh on a one-node job: the same kill; it exits 1 saying this node started no rank."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("n1 slots=1\n")
    env_file = tmp_path / ".deepspeed_env"
    env_file.write_text("")
    env = {
        **env_killing_launch_py(tmp_path), "SLURM_JOB_ID": "7", "SLURMD_NODENAME": "n1",
        "MASTER_ADDR": "127.0.0.1",
    }  # fmt: skip
    out = tmp_path / "run"
    command = ["bash", str(DS_NODE), str(hostfile), str(env_file), "--config", CONFIG, f"output_dir={out}"]
    result = run_launcher(command, env, ROOT)
    assert not (out / "config.yaml").exists()
    assert result.returncode == 1, result.stderr
    assert "this node started no rank" in result.stderr, result.stderr
