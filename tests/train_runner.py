"""Start real training runs from tests: the deepspeed launcher, torchrun or plain python."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(REPO, "vutrain", "train.py")
TINY = os.path.join(REPO, "vutrain", "configs", "tiny.yaml")
BIN = os.path.dirname(sys.executable)

from worker_ports import free_port  # noqa: E402


def base_overrides(shards: dict, run_dir: str, steps: int, **extra) -> list[str]:
    """A tiny, fast run: small batches, few steps, no progress bar."""
    values = {
        "output_dir": run_dir,
        "data.train_shards": shards["train_shards"],
        "data.val_shards": shards["val_shards"],
        "data.num_workers": 1,
        "data.shuffle_buffer": 64,
        "train.max_steps": steps,
        "train.micro_batch_size": 16,
        "train.progress_bar": "false",
        "train.warmup_steps": 2,
        "eval.every": 0,
        "eval.batch_size": 48,
        "model.vocab_size": 512,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"{k}={v}" for k, v in values.items()]


def command(launcher: str, overrides: list[str], ranks: int = 2) -> list[str]:
    if launcher == "deepspeed":
        return [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            TRAIN,
            "--config",
            TINY,
            *overrides,
        ]
    if launcher == "torchrun":
        return [
            os.path.join(BIN, "torchrun"),
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(free_port()),
            TRAIN,
            "--config",
            TINY,
            *overrides,
        ]
    assert launcher == "python"
    return [sys.executable, TRAIN, "--config", TINY, *overrides]


def env() -> dict:
    # The repository first, then what was there: the GPU host's packages live on PYTHONPATH
    # (shared/gpu/setup.sh puts them in /tmp/site), and a launched rank needs them too.
    e = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        NO_ALBUMENTATIONS_UPDATE="1",
    )
    e.pop("MASTER_PORT", None)
    return e


def run(
    launcher: str, overrides: list[str], ranks: int = 2, timeout: int = 600, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        command(launcher, overrides, ranks),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(env(), **(extra_env or {})),
        cwd=REPO,
    )
    return proc


def run_module(module: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m module args...` from the repository root, in the tests' environment."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env(),
        cwd=REPO,
    )


def start(
    launcher: str, overrides: list[str], ranks: int = 2, log_path: str | None = None
) -> subprocess.Popen:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        command(launcher, overrides, ranks),
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env(),
        cwd=REPO,
        start_new_session=True,
    )


def metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                pass
    return rows


def losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in metrics(run_dir) if "train/loss" in r}


def wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float = 400) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if max(losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited with {proc.returncode} before step {step}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def kill_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def describe(proc: subprocess.CompletedProcess) -> str:
    out, err = proc.stdout[-6000:], proc.stderr[-6000:]
    return f"exit {proc.returncode}\n--- stdout ---\n{out}\n--- stderr ---\n{err}"
