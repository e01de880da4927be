"""launch/local.sh's rendezvous port: two runs on one machine at once, and a MASTER_PORT given by hand.

Without MASTER_PORT local.sh used 29500, so a second run beside a first (two experiments on a
workstation, a test beside a real run) stopped at the rendezvous with EADDRINUSE. Runtime on 2 cores:
about 45 s for the two concurrent 1-rank runs, a second for the rest.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from worker_ports import free_port

from slurm_cluster import REPO

LOCAL = str(REPO / "launch" / "local.sh")


def launch_env(**env: str) -> dict[str, str]:
    """The caller's environment without MASTER_PORT (or any launcher variable), plus `env`."""
    full_env = dict(
        os.environ,
        PYTHON=sys.executable,
        NO_ALBUMENTATIONS_UPDATE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    for key in ("MASTER_PORT", "MASTER_ADDR", "NGPUS", "HOSTFILE", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        full_env.pop(key, None)
    full_env.update(env)
    return full_env


def start_local(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", LOCAL, *args], env=launch_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, cwd=REPO,
    )  # fmt: skip


def run_local(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", LOCAL, *args], env=launch_env(**env), capture_output=True, text=True, cwd=REPO, timeout=300
    )


def make_shards(tmp_path: Path) -> Path:
    shards = tmp_path / "shards"
    subprocess.run(
        [sys.executable, "-m", "vutrain.data.synthetic", "--out", str(shards), "--num-samples", "16",
         "--shard-size", "8"],
        check=True, cwd=REPO, capture_output=True,
    )  # fmt: skip
    return shards


def tiny_run_args(out: Path, shards: Path) -> list[str]:
    return [
        "--config", "vutrain/configs/tiny.yaml", f"output_dir={out}",
        f"data.train_shards={shards}/train/{{00000..00001}}.tar", "data.val_shards=", "eval.every=0",
        "train.max_steps=2", "train.micro_batch_size=4", "train.checkpoint_every=0", "data.num_workers=0",
        "train.progress_bar=false",
    ]  # fmt: skip


def rendezvous_port(log: str) -> int:
    """The port local.sh's start-up line names."""
    match = re.search(r"rendezvous at 127\.0\.0\.1:(\d+) \(free port", log)
    assert match, log[-3000:]
    return int(match.group(1))


@pytest.mark.slow
def test_two_runs_without_master_port_both_train(tmp_path):
    """Two local.sh runs started together without MASTER_PORT (1 CPU rank each): both finish their 2
    steps, each on its own free port of 20000-32767 that the start-up line names and the deepspeed
    launcher is given. Before, both took 29500 and the second stopped with "port 29500 is taken"."""
    shards = make_shards(tmp_path)
    runs = {name: tmp_path / name for name in ("first", "second")}
    procs = {name: start_local(tiny_run_args(out, shards), NGPUS="1") for name, out in runs.items()}
    logs = {name: proc.communicate(timeout=300)[0] for name, proc in procs.items()}
    ports = set()
    for name, out in runs.items():
        assert procs[name].returncode == 0, logs[name][-4000:]
        assert json.loads((out / "done.json").read_text())["step"] == 2
        port = rendezvous_port(logs[name])
        assert 20000 <= port <= 32767
        assert f"--master_port={port}" in logs[name], logs[name][-4000:]
        ports.add(port)
    assert len(ports) == 2, ports


def test_taken_master_port_is_refused_before_the_ranks_start(tmp_path):
    """MASTER_PORT given and already listened on: one error line naming it and what to do, exit 2,
    and no deepspeed launcher started (before, the ranks imported torch and then failed the
    rendezvous, exit 1, amid the launcher's output)."""
    shards = make_shards(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        port = listener.getsockname()[1]
        proc = run_local(tiny_run_args(tmp_path / "run", shards), NGPUS="1", MASTER_PORT=str(port))
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line or "rror:" in line]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert errors == [
        f"[vutrain-launch] ERROR: MASTER_PORT={port} is taken on this host (another run?). Set MASTER_PORT "
        "to a free port, or unset it to have a free one picked."
    ], proc.stderr[-3000:]
    assert "deepspeed" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["29500:1", "70000", "0"])
def test_master_port_not_a_port_is_one_line(value):
    """MASTER_PORT that is no TCP port: one line naming it (before, DeepSpeed's runner printed its
    whole usage text and "invalid int value", or took 70000 and failed later)."""
    proc = run_local(["--config", "vutrain/configs/tiny.yaml"], MASTER_PORT=value)
    assert proc.returncode == 2
    assert f"ERROR: MASTER_PORT={value} is not a TCP port (1-65535)" in proc.stderr, proc.stderr[-3000:]
    assert "usage:" not in proc.stderr


def test_free_master_port_is_kept_as_given(tmp_path):
    """A free MASTER_PORT given by hand goes to the deepspeed launcher unchanged and the start-up line
    says where it came from (a fake PYTHON records the launcher's command line)."""
    record = tmp_path / "argv"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\nprintf "%s\\n" "$@" > {record}\n')
    fake.chmod(0o755)
    port = free_port()
    proc = run_local(["--config", "vutrain/configs/tiny.yaml"], PYTHON=str(fake), MASTER_PORT=str(port))
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().splitlines()
    assert argv[argv.index("--master_port") + 1] == str(port), argv
    assert f"rendezvous at 127.0.0.1:{port} (MASTER_PORT)" in proc.stderr
