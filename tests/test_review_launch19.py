"""make_hostfile.sh given an empty slot count or output name; local.sh given a hostfile line
without "slots=".

`make_hostfile.sh -s "$GPUS"` with GPUS unset wrote the default slots (1 on a login node without
GPUs) without a word: the job then ran one rank per node. local.sh took `localhost 2` for two
slots, and DeepSpeed's runner, given that hostfile, stopped with a ValueError traceback. Both are
now refused in one line before anything starts (the real scripts; PYTHON is a stand-in that
records being run).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from slurm_cluster import REPO

MAKE_HOSTFILE = REPO / "launch" / "make_hostfile.sh"
LOCAL = REPO / "launch" / "local.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("NGPUS", "HOSTFILE", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return {**env, "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", *map(str, args)], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=120
    )


def test_make_hostfile_refuses_an_empty_slot_count(tmp_path: Path) -> None:
    out = tmp_path / "hostfile"
    proc = _run([MAKE_HOSTFILE, "-s", "", "-o", out, "a,b"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "slots must be a positive integer, got ''" in proc.stderr and "pass -s N" in proc.stderr
    assert not out.exists()
    # Without -s the default still applies: no GPU visible here, one CPU rank per node.
    proc = _run([MAKE_HOSTFILE, "a,b"], tmp_path)
    assert proc.returncode == 0 and proc.stdout == "a slots=1\nb slots=1\n", proc.stderr


def test_make_hostfile_refuses_an_empty_output_name(tmp_path: Path) -> None:
    """`-o "$HF"` with HF unset printed the hostfile to stdout and wrote no file, without a word."""
    proc = _run([MAKE_HOSTFILE, "-s", "2", "-o", "", "a,b"], tmp_path)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "-o needs a file name" in proc.stderr, proc.stderr


def test_local_refuses_a_hostfile_line_without_slots(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# this machine\nlocalhost 2\n")
    marker = tmp_path / "python-ran"
    python = tmp_path / "python"
    python.write_text(f'#!/bin/bash\ntouch "{marker}"\nexit 1\n')
    python.chmod(0o755)
    proc = _run([LOCAL, "x=1"], tmp_path, HOSTFILE=str(hostfile), PYTHON=str(python))
    assert proc.returncode == 2, proc.stderr
    assert f"HOSTFILE={hostfile}: expected one 'HOST slots=N' line, got slots ''" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not marker.exists()
