"""The run-directory lock (vutrain/run_lock.py) under a SLURM requeue on NFS, and the benchmark
harnesses that build Trainers without train(): a requeued run waits a bounded time for a crashed
node's lock and takes it, a live holder here is refused at once, a holder that stays is refused in
one line after the wait; bench.run_one and bench_compare's TrainerStep free their run directory
(real processes, real flock, real Trainers)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from vutrain import run_lock
from vutrain.config import ConfigError

from inprocess_trainer import DIST_ENV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Holds RUN's lock until killed; with a host in argv[2] its record names that host (the node that
# crashed, whose lock an NFS server keeps until its lease ends) and the SLURM job in argv[3].
HOLDER = """
import json, os, sys, time
from vutrain import run_lock
run_lock.acquire(sys.argv[1])
if sys.argv[2]:
    with open(os.path.join(sys.argv[1], run_lock.LOCK_NAME), "w") as fh:
        fh.write(json.dumps({"host": sys.argv[2], "pid": 4, "slurm_job_id": sys.argv[3]}) + "\\n")
print("held", flush=True)
time.sleep(120)
"""
TRY_LOCK = """
import logging, sys
from vutrain import run_lock
logging.basicConfig(format="%(message)s")
try:
    run_lock.acquire(sys.argv[1])
except run_lock.RunDirInUseError as exc:
    print(f"refused: {exc}", file=sys.stderr, flush=True)
    sys.exit(2)
print("locked", flush=True)
"""
WAIT_ENV = "VUTRAIN_RUN_LOCK_WAIT_S"


def _env(**extra) -> dict:
    drop = {*DIST_ENV, "SLURM_JOB_ID", "SLURM_RESTART_COUNT", WAIT_ENV}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _start_holder(run_dir: str, host: str = "", job: str = "", **env) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_dir, host, job], stdout=subprocess.PIPE, text=True, env=_env(**env)
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def _start_waiter(run_dir: str, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRY_LOCK, run_dir],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(**env),
    )


def _stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_a_requeued_run_waits_for_a_crashed_nodes_lock_and_takes_it(tmp_path):
    """SLURM requeues job 555 after its node crashed; NFS still holds the dead node's lock. The
    requeued rank 0 was refused at once (exit 2, and SLURM does not requeue that again): now it logs
    one line naming the holder, waits, and takes the lock once the server lets go."""
    run_dir = str(tmp_path / "run")
    holder = _start_holder(run_dir, host="crashed-node", job="555")
    waiter = _start_waiter(run_dir, SLURM_JOB_ID="555", SLURM_RESTART_COUNT="1", **{WAIT_ENV: "60"})
    try:
        first = waiter.stderr.readline()
        assert "waiting up to 60 s" in first and "host crashed-node" in first, first
        assert "SLURM job 555" in first and WAIT_ENV in first, first
        _stop(holder)  # the lease ends
        out, err = waiter.communicate(timeout=60)
    finally:
        _stop(holder)
        _stop(waiter)
    assert waiter.returncode == 0 and out.strip() == "locked", err
    record = run_lock.read_holder(os.path.join(run_dir, run_lock.LOCK_NAME))
    assert record["slurm_job_id"] == "555" and record["pid"] == waiter.pid, record


def test_a_holder_that_stays_is_refused_in_one_line_after_the_wait(tmp_path):
    """Our own job's record on another host that never lets go: refused after the bounded wait,
    in one line that says it waited and which setting makes the wait longer."""
    run_dir = str(tmp_path / "run")
    holder = _start_holder(run_dir, host="crashed-node", job="556")
    try:
        done = subprocess.run(
            [sys.executable, "-c", TRY_LOCK, run_dir],
            capture_output=True,
            text=True,
            env=_env(SLURM_JOB_ID="556", **{WAIT_ENV: "1.5"}),
            timeout=60,
        )
    finally:
        _stop(holder)
    assert done.returncode == 2, done.stderr
    refusals = [line for line in done.stderr.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "still held after waiting 2 s" in refusals[0] and WAIT_ENV in refusals[0], refusals
    assert "host crashed-node" in refusals[0] and "SLURM job 556" in refusals[0], refusals


def test_a_live_holder_on_this_host_is_refused_at_once_even_in_a_requeue(tmp_path):
    """Two steps of one job into one output_dir on this host: the holder lives, so no wait."""
    run_dir = str(tmp_path / "run")
    holder = _start_holder(run_dir, SLURM_JOB_ID="557")
    try:
        done = subprocess.run(
            [sys.executable, "-c", TRY_LOCK, run_dir],
            capture_output=True,
            text=True,
            env=_env(SLURM_JOB_ID="557", SLURM_RESTART_COUNT="2", **{WAIT_ENV: "300"}),
            timeout=60,
        )
    finally:
        _stop(holder)
    assert done.returncode == 2 and "waiting" not in done.stderr, done.stderr
    assert f"pid {holder.pid}" in done.stderr and "still held after" not in done.stderr, done.stderr


def test_the_wait_applies_only_to_a_holder_that_is_probably_gone(monkeypatch):
    """The default wait (120 s) covers a requeue or our own job; another host only on request."""
    for key in ("SLURM_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(key, raising=False)
    elsewhere = {"host": "crashed-node", "pid": 4, "slurm_job_id": "9"}
    assert run_lock.wait_budget(elsewhere, None) == 0.0
    assert run_lock.wait_budget(elsewhere, 30.0) == 30.0
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert run_lock.wait_budget(elsewhere, None) == run_lock.REQUEUE_WAIT_S == 120.0
    monkeypatch.setenv("SLURM_JOB_ID", "10")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert run_lock.wait_budget(elsewhere, None) == 120.0
    assert run_lock.wait_budget(elsewhere, 0.0) == 0.0


@pytest.mark.parametrize("value", ["soon", "-5", "nan", "inf"])
def test_a_bad_wait_setting_is_one_line(tmp_path, monkeypatch, value):
    monkeypatch.setenv(WAIT_ENV, value)
    with pytest.raises(ConfigError) as refused:
        run_lock.acquire(str(tmp_path / "run"))
    assert WAIT_ENV in str(refused.value) and "\n" not in str(refused.value)


def _lock_free_for_another_process(run_dir: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, run_dir], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert done.returncode in (0, 2), done.stderr
    return done.returncode == 0


def test_bench_run_one_frees_its_run_directory(tiny_shards, tmp_path, single_process):
    """`python -m vutrain.bench` measures with Trainers that never call train(): the run
    directory stayed locked until the process exited."""
    from vutrain import bench

    run_dir = str(tmp_path / "run")
    spec = dict(
        run_dir=run_dir,
        train_shards=tiny_shards["train_shards"],
        preset="tiny",
        precision="fp32",
        zero_stage=0,
        batch_size=4,
        grad_ckpt="false",
        warmup=0,
        steps=1,
        workers=0,
        loss_backend="torch",
    )
    row = bench.run_one(spec)
    assert row["step_time_s"] > 0
    assert _lock_free_for_another_process(run_dir)


def test_compare_trainer_step_close_frees_its_run_directory(tiny_shards, tmp_path, single_process):
    """bench_compare builds one Trainer per configuration into one run directory; close() frees it."""
    from vutrain.bench_compare import TrainerStep, Variant
    from vutrain.distributed import init_distributed, resolve_dist_env

    info = resolve_dist_env()
    init_distributed(info)
    args = argparse.Namespace(
        preset="tiny",
        hidden_act="",
        precision="fp32",
        pool_batch=4,
        compile_backend="inductor",
        compile_scope="layers",
        compile_mode="default",
    )
    run_dir = str(tmp_path / "run")
    variant = Variant("vutrain", False, 0, "torch")
    runner = TrainerStep(variant, args, info, run_dir, tiny_shards["train_shards"])
    assert not _lock_free_for_another_process(run_dir)
    runner.close()
    assert _lock_free_for_another_process(run_dir)


def test_count_step_ops_leaves_no_lock_file_open(tmp_path):
    """tools/count_step_ops.py, run from Python (as tests/test_step_ops.py runs it): its Trainer
    never trains, so its lock file stayed open, on a run folder the tool had already deleted."""
    code = (
        f"import os, sys; sys.path.insert(0, {os.path.join(REPO, 'tools')!r})\n"
        "import count_step_ops\n"
        "assert count_step_ops.main(['--preset', 'tiny', '--precision', 'fp32', '--zero-stage', '0']) == 0\n"
        "def target(fd):\n"
        "    try:\n"
        "        return os.readlink(f'/proc/self/fd/{fd}')\n"
        "    except OSError:\n"  # listdir's own fd, closed by now; a deleted file: ' (deleted)'
        "        return ''\n"
        "open_locks = [t for t in map(target, os.listdir('/proc/self/fd')) if '.run.lock' in t]\n"
        "print('open locks:', open_locks)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
        env=_env(VUTRAIN_DEVICE="cpu"),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.splitlines()[-1] == "open locks: []", done.stdout[-3000:]
