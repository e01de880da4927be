"""One run per output_dir (vutrain/run_lock.py): a second run started into a directory a live run
holds is refused in one line on every rank, and touches nothing there; a killed holder, a finished
or failed in-process Trainer blocks nobody (real processes, real flock, real gloo ranks)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from vutrain import run_lock
from vutrain.config import ConfigError

from helpers_dist import run_distributed
from inprocess_trainer import DIST_ENV, overrides, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Holds RUN's lock until killed; with "fork" a forked child (a data loader worker) sleeps beside it.
HOLDER = """
import os, sys, time
from vutrain import run_lock
run_lock.acquire(sys.argv[1])
child = os.fork() if sys.argv[2] == "fork" else None
if child == 0:
    time.sleep(120)
    os._exit(0)
print(child or 0, flush=True)
time.sleep(120)
"""
TRY_LOCK = "import sys; from vutrain import run_lock; run_lock.acquire(sys.argv[1]); print('locked')"


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV and k != "SLURM_JOB_ID"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def _start_holder(run_dir: str, mode: str = "plain", **env) -> tuple[subprocess.Popen, int]:
    """A process holding run_dir's lock (and the pid of its forked child, 0 without)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, run_dir, mode], stdout=subprocess.PIPE, text=True, env=_env(**env)
    )
    child = int(holder.stdout.readline())
    return holder, child


def _lock_free_for_another_process(run_dir: str) -> bool:
    done = subprocess.run(
        [sys.executable, "-c", TRY_LOCK, run_dir], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert done.returncode == 0 or "in use by another run" in done.stderr, done.stderr
    return done.returncode == 0


def test_a_second_train_py_is_refused_in_one_line_and_touches_nothing(tiny_shards, tmp_path):
    """A second `python vutrain/train.py` into an output_dir a live run holds (here SLURM job 4242):
    it moved the first run's checkpoints and metrics aside (train.resume=never) or resumed from
    them, and both wrote into one metrics.jsonl. Now it exits 2 with one line naming the directory,
    the holder's host, pid and job, and what to do, and every file of the first run is as it was."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    holder, _ = _start_holder(str(run_dir), SLURM_JOB_ID="4242")
    try:
        before = sorted(os.listdir(run_dir))
        args = overrides(tiny_shards, str(run_dir), 2, train__resume="never", data__tokenizer_samples=40)
        done = subprocess.run(
            [sys.executable, "vutrain/train.py", "--config", "tiny", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            env=_env(),
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "in use by another run" in line]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = lines[0]
    assert f"output_dir={run_dir}" in line and f"pid {holder.pid}" in line, line
    assert "SLURM job 4242" in line and "another output_dir" in line, line
    assert sorted(os.listdir(run_dir)) == before == [".run.lock", "checkpoints", "metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_killed_holder_blocks_nobody_not_even_through_its_forked_worker(tmp_path):
    """SIGKILL of the holder (a pre-empted node, an OOM kill): the requeued run takes the lock at
    once, also while a child the holder forked (a data loader worker sharing its open lock file)
    still lives; the record then names the new holder."""
    run_dir = str(tmp_path / "run")
    holder, child = _start_holder(run_dir, "fork")
    try:
        assert child > 0
        assert not _lock_free_for_another_process(run_dir)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the forked worker still lives
        lock = run_lock.acquire(run_dir)
    finally:
        holder.kill()
        holder.wait()
        if child > 0:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        assert lock.held
        assert run_lock.read_holder(os.path.join(run_dir, run_lock.LOCK_NAME))["pid"] == os.getpid()
    finally:
        lock.release()
    assert _lock_free_for_another_process(run_dir)


def test_an_in_process_trainer_releases_the_lock_when_it_finishes_or_fails(
    tiny_shards, tmp_path, single_process
):
    """A Trainer that finished, and one whose start failed after the lock (a shard that does not
    exist), leave output_dir free for the next run, in this process or another: a notebook that
    trains twice was not refused. train.resume=never moves the old run aside but not the lock file."""
    run_dir = str(tmp_path / "run")
    train(
        tiny_shards,
        run_dir,
        steps=1,
        data__tokenizer_samples=40,
        eval__every=0,
        data__val_shards="",
        train__warmup_steps=0,
    )
    assert _lock_free_for_another_process(run_dir)
    with pytest.raises(Exception) as failed:
        train(
            tiny_shards,
            run_dir,
            steps=1,
            train__resume="never",
            data__train_shards=str(tmp_path / "missing.tar"),
            data__val_shards="",
            eval__every=0,
            train__warmup_steps=0,
        )
    assert "missing.tar" in str(failed.value), failed.value
    assert _lock_free_for_another_process(run_dir)
    names = os.listdir(run_dir)
    assert ".run.lock" in names and any(n.startswith("metrics.replaced-") for n in names), names


def _start_trainer(rank: int, world_size: int, shards: dict, run_dir: str) -> str:
    """One rank of a 2-rank start: its ConfigError's message, or '' when the Trainer was built."""
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    cfg = load_config("tiny", overrides(shards, run_dir, 2, eval__every=0, data__tokenizer_samples=40))
    try:
        Trainer(cfg, resolve_dist_env())
    except (
        ConfigError
    ) as exc:  # the type too: train.py prints a held output_dir as "error:", not "config error:"
        return f"{type(exc).__name__}: {exc}"
    return ""


def test_two_ranks_stop_together_when_rank_0_is_refused(tiny_shards, tmp_path):
    """2 gloo ranks into a held output_dir: rank 0's refusal reaches rank 1 through the run
    directory's outcome broadcast, so both raise the same one line (no hang at a barrier, no
    tokenizer trained into the other run's directory)."""
    run_dir = str(tmp_path / "run")
    holder, _ = _start_holder(run_dir)
    try:
        messages = run_distributed(_start_trainer, 2, tiny_shards, run_dir, timeout_s=60)
    finally:
        holder.kill()
        holder.wait()
    assert messages[0] == messages[1], messages
    assert messages[0].startswith("RunDirInUseError: "), messages
    assert "in use by another run" in messages[0] and f"pid {holder.pid}" in messages[0], messages
    assert "\n" not in messages[0]
    assert os.listdir(run_dir) == [".run.lock"]


def test_a_file_system_without_locks_warns_once_and_runs_unlocked(tmp_path, monkeypatch, caplog):
    """flock failing with ENOLCK/ENOSYS/EOPNOTSUPP (Lustre without -o flock): one warning naming
    the directory, and the run goes on instead of failing to start."""

    def no_locks(_fd, _op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        lock = run_lock.acquire(str(tmp_path / "run"))
    assert not lock.held
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "does not support locks" in warnings[0], warnings
    assert str(tmp_path / "run") in warnings[0]
    lock.release()


def test_the_refusal_names_what_the_lock_file_records(tmp_path):
    """The message reads the holder's record; an empty record (a holder still writing) still says
    what to do."""
    path = tmp_path / run_lock.LOCK_NAME
    path.write_text(json.dumps({"host": "node7", "pid": 12, "slurm_job_id": "99"}))
    assert run_lock.read_holder(str(path)) == {"host": "node7", "pid": 12, "slurm_job_id": "99"}
    message = run_lock.in_use_message("/runs/a", run_lock.read_holder(str(path)))
    assert "(host node7, pid 12, SLURM job 99;" in message and "another output_dir" in message
    path.write_text("")
    assert "holder not recorded" in run_lock.in_use_message("/runs/a", run_lock.read_holder(str(path)))
