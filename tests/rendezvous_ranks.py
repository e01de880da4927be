"""Real CPU ranks started as subprocesses at one rendezvous on 127.0.0.1, for the start-up tests:
each rank's environment as a launcher sets it, and each rank's exit code and output once all have
stopped or a common deadline has passed."""

from __future__ import annotations

import os
import subprocess
import time


def rank_env(rank: int, world: int, port: int, **extra: str) -> dict[str, str]:
    """This environment with rank `rank` of `world` (one rank a node) at MASTER_PORT `port`; a
    group timeout or agent store from the environment pytest runs in is dropped."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", LOCAL_SIZE="1")
    env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    env.pop("VUTRAIN_DIST_TIMEOUT_MIN", None)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONWARNINGS="ignore", **extra)
    return env


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`cmd` with its stdout and stderr together in one pipe."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(
    procs: list[subprocess.Popen], wait_s: float, stderr: bool = False
) -> list[tuple[int | None, str]]:
    """(exit code, or None when still running `wait_s` after this call, then killed; output) of each
    process: its stdout, or with `stderr` its stderr (stdout captured apart)."""
    deadline = time.monotonic() + wait_s
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            results.append((proc.returncode, err if stderr else out))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            results.append((None, err if stderr else out))
    return results
