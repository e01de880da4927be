"""Faults around checkpoints and metrics (issue 11): nothing lost, no duplicate rows, one clear line.

Fast tests drive vutrain/checkpoint.py and vutrain/metrics.py on real files; the slow ones train
for real (DeepSpeed ZeRO-2 through tests/train_runner.py) and break the run directory the way a
crash, a full disk or a careless `rm` does.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import numpy as np
import pytest
import torch

from vutrain import checkpoint as ckpt
from vutrain.metrics import MetricsWriter, read_metrics

import train_runner as tr


def _fake_tag(ckpt_dir: str, step: int, payload: bytes = b"x" * 100) -> str:
    """A checkpoint made by the real completion code over stand-in DeepSpeed files."""
    tag = ckpt.tag_for(step)
    tmp = os.path.join(ckpt_dir, tag + ".tmp")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(payload)
    ckpt.save_trainer_state(tmp, 0, {"step": step, "data": {}, "rng": ckpt.rng_state()})
    ckpt._complete(ckpt_dir, tag, step)
    return os.path.join(ckpt_dir, tag)


def test_resume_takes_newest_complete_and_says_why(tmp_path, caplog):
    ckpt_dir = str(tmp_path / "checkpoints")
    os.makedirs(ckpt_dir)
    _fake_tag(ckpt_dir, 2)
    four = _fake_tag(ckpt_dir, 4)
    six = _fake_tag(ckpt_dir, 6)
    os.makedirs(os.path.join(ckpt_dir, "step_00000008.tmp"))  # a save killed mid-write
    with open(os.path.join(six, "mp_rank_00_model_states.pt"), "r+b") as fh:
        fh.truncate(10)
    os.remove(os.path.join(four, ckpt.MARKER))
    os.remove(os.path.join(ckpt_dir, "latest"))
    with caplog.at_level("WARNING", logger="vutrain.checkpoint"):
        assert ckpt.resolve_resume("auto", str(tmp_path)) == (ckpt_dir, "step_00000002")
    text = caplog.text
    assert "step_00000008.tmp: save interrupted" in text
    assert "step_00000006/mp_rank_00_model_states.pt has 10 bytes, the marker says 100" in text
    assert "step_00000004/COMPLETE.json is missing" in text
    assert "the 'latest' file is missing" in text
    # Retention counts complete checkpoints only: the last good one survives keep=1.
    assert ckpt.prune(ckpt_dir, keep=1) == ["step_00000008.tmp"]
    assert sorted(os.listdir(ckpt_dir)) == ["step_00000002", "step_00000004", "step_00000006"]


def test_no_usable_checkpoint_is_one_line_error_naming_files(tmp_path):
    ckpt_dir = str(tmp_path / "checkpoints")
    os.makedirs(ckpt_dir)
    tag = _fake_tag(ckpt_dir, 2)
    os.remove(os.path.join(tag, "trainer_state_rank0.json"))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.resolve_resume("auto", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    assert "step_00000002/trainer_state_rank0.json is missing" in message and "train.resume=never" in message
    assert ckpt.resolve_resume("never", str(tmp_path)) is None
    assert ckpt.resolve_resume("auto", str(tmp_path / "fresh")) is None  # nothing there: start afresh
    shutil.rmtree(tag)  # every checkpoint deleted, `latest` still names one: not a fresh run either
    with pytest.raises(ckpt.CheckpointError, match="'latest' names step_00000002, which is gone"):
        ckpt.resolve_resume("auto", str(tmp_path))
    os.remove(os.path.join(ckpt_dir, "latest"))
    os.makedirs(os.path.join(ckpt_dir, "step_00000002.tmp"))  # killed during the very first save
    assert ckpt.resolve_resume("auto", str(tmp_path)) is None


def test_resume_never_moves_the_old_run_aside(tmp_path):
    ckpt_dir = str(tmp_path / "checkpoints")
    os.makedirs(ckpt_dir)
    _fake_tag(ckpt_dir, 2)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    # the old run's discarded rows too (they stayed and mixed with the new run's until 2026-12-07)
    (tmp_path / "metrics.discarded.jsonl").write_text('{"step": 2, "discarded_at_resume_from": 1}\n')
    moved = ckpt.move_aside(str(tmp_path))
    names = sorted(os.path.basename(m).split("-")[0] for m in moved)
    assert names == ["checkpoints.replaced", "metrics.discarded.replaced", "metrics.replaced"]
    assert not os.path.exists(ckpt_dir) and not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "metrics.discarded.jsonl").exists()
    assert os.path.isfile(os.path.join(moved[0], "step_00000002", ckpt.MARKER))  # kept, not deleted


def test_trainer_state_is_json_and_tensors_without_pickle(tmp_path, monkeypatch):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    state = {"step": 7, "data": {"next_batch": 7, "workers": {"0": {"epoch": 0}}}, "rng": ckpt.rng_state()}
    expected = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.save_trainer_state(str(tmp_path), 1, state)
    assert json.load(open(tmp_path / "trainer_state_rank1.json"))["step"] == 7
    assert (tmp_path / "trainer_state_rank1.safetensors").is_file()

    def no_pickle(*args, **kwargs):
        raise AssertionError("the trainer state must load without unpickling")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr("pickle.loads", no_pickle)
    loaded = ckpt.load_trainer_state(str(tmp_path), 1)
    assert loaded["data"] == state["data"]
    ckpt.set_rng_state(loaded["rng"])
    assert (random.random(), np.random.rand()) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def test_resume_on_a_process_that_sees_fewer_gpus_restores_the_ones_it_has(tmp_path, monkeypatch):
    """Saved by a process that saw 8 GPUs (the deepspeed launcher shows each rank the whole node),
    resumed by one that sees 2 (one GPU per task, a smaller node): before, all 8 CUDA RNG states
    went to `set_rng_state_all`, which fails on the first device that does not exist. CUDA's RNG
    calls are stood in for here (this machine has no GPU); the checkpoint round trip is real."""
    saved = [torch.full((16,), i, dtype=torch.uint8) for i in range(8)]
    state = {"step": 1, "rng": dict(ckpt.rng_state(), cuda=saved)}
    ckpt.save_trainer_state(str(tmp_path), 0, state)
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.extend(states))
    ckpt.set_rng_state(ckpt.load_trainer_state(str(tmp_path), 0)["rng"])
    assert [int(s[0]) for s in restored] == [0, 1]


def test_metrics_truncate_moves_lost_rows_and_torn_line(tmp_path):
    writer = MetricsWriter(str(tmp_path), enabled=True)
    for step in range(1, 6):
        writer.write(step, {"train/loss": 1.0 / step})
    with open(writer.path, "a") as fh:
        fh.write("null\n[5]\n")  # JSON, but not rows (a TypeError stopped the resume)
        fh.write('{"step": 6, "train/lo')  # killed mid-write
    assert writer.truncate_after(3) == 5
    writer.write(4, {"train/loss": 0.5})
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]
    discarded = [json.loads(line) for line in open(tmp_path / "metrics.discarded.jsonl")]
    assert [r.get("step") for r in discarded] == [4, 5, None, None, None]
    assert [r.get("torn_line") for r in discarded[2:4]] == ["null", "[5]"]
    assert discarded[-1]["torn_line"].startswith('{"step": 6')
    assert discarded[0]["discarded_at_resume_from"] == 3


def _train_rows(run_dir: str) -> list[int]:
    return [r["step"] for r in tr.metrics(run_dir) if "train/loss" in r]


@pytest.mark.slow
def test_resume_after_deleted_and_truncated_checkpoints(synthetic_shards, tmp_path):
    """Newest checkpoint and `latest` deleted, the next one truncated: resume from the one before,
    each step once in metrics.jsonl; then every checkpoint broken: one line, no traceback."""
    run_dir = str(tmp_path / "run")
    over = tr.base_overrides(
        synthetic_shards, run_dir, 6, train__checkpoint_every=2, train__keep_checkpoints=3
    )
    first = tr.run("python", over)
    assert first.returncode == 0, tr.describe(first)
    cdir = os.path.join(run_dir, "checkpoints")
    assert sorted(ckpt.list_tags(cdir)) == ["step_00000002", "step_00000004", "step_00000006"]
    shutil.rmtree(os.path.join(cdir, "step_00000006"))
    os.remove(os.path.join(cdir, "latest"))
    optim = next(f for f in os.listdir(os.path.join(cdir, "step_00000004")) if "optim_states" in f)
    with open(os.path.join(cdir, "step_00000004", optim), "r+b") as fh:
        fh.truncate(1000)

    again = tr.run(
        "python",
        tr.base_overrides(synthetic_shards, run_dir, 8, train__checkpoint_every=2, train__keep_checkpoints=3),
    )
    out = again.stdout + again.stderr
    assert again.returncode == 0, tr.describe(again)
    assert "resuming at step 2" in out and f"step_00000004/{optim} has 1000 bytes" in out
    assert _train_rows(run_dir) == list(range(1, 9))  # the lost segment's rows replaced, not doubled
    assert [
        json.loads(line)["step"]
        for line in open(os.path.join(run_dir, "metrics.discarded.jsonl"))
        if "train/loss" in line
    ] == [3, 4, 5, 6]
    assert ckpt.list_tags(cdir) == ["step_00000004", "step_00000006", "step_00000008"]
    assert open(os.path.join(cdir, "latest")).read() == "step_00000008"

    for tag in ckpt.list_tags(cdir):
        with open(os.path.join(cdir, tag, "trainer_state_rank0.json"), "a") as fh:
            fh.write(" ")
    broken = tr.run("python", over)
    out = broken.stdout + broken.stderr
    assert broken.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out[-3000:]
    assert "none is complete" in errors[0] and "step_00000008/trainer_state_rank0.json has" in errors[0]
    assert "train.resume=never" in errors[0] and "Traceback" not in out


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_one_rank_fails_to_load(synthetic_shards, tmp_path, monkeypatch):
    """Two ranks. SIGKILL while step 4 is being saved: the resume takes step 2 and skips the
    half-written save. Then one rank's state file is damaged (same size): the run stops within
    seconds with that rank's message on one line, printed once, and no traceback."""
    run_dir = str(tmp_path / "run")
    over = tr.base_overrides(synthetic_shards, run_dir, 6, train__checkpoint_every=2)
    monkeypatch.setenv("VUTRAIN_FAULT_SLEEP_BEFORE_MARKER", "4")
    proc = tr.start("deepspeed", over, log_path=str(tmp_path / "first.log"))
    pending = os.path.join(run_dir, "checkpoints", "step_00000004.tmp")
    deadline = time.time() + 400
    while not (os.path.isdir(pending) and len(os.listdir(pending)) >= 7):  # both ranks' files written
        assert proc.poll() is None and time.time() < deadline, open(tmp_path / "first.log").read()[-3000:]
        time.sleep(0.05)
    tr.kill_group(proc, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "step_00000004"))
    monkeypatch.delenv("VUTRAIN_FAULT_SLEEP_BEFORE_MARKER")

    again = tr.run("deepspeed", over)
    out = again.stdout + again.stderr
    assert again.returncode == 0, tr.describe(again)
    assert "step_00000004.tmp: save interrupted" in out and "resuming at step 2" in out
    assert _train_rows(run_dir) == list(range(1, 7))
    cdir = os.path.join(run_dir, "checkpoints")
    assert ckpt.list_tags(cdir) == ["step_00000004", "step_00000006"]  # keep_checkpoints=2
    assert not [n for n in os.listdir(cdir) if n.endswith(".tmp")]  # the stale save was cleaned up

    state = os.path.join(cdir, "step_00000006", "trainer_state_rank1.json")
    size = os.path.getsize(state)
    with open(state, "w") as fh:
        fh.write("{" + "x" * (size - 1))
    started = time.time()
    failed = tr.run(
        "deepspeed", tr.base_overrides(synthetic_shards, run_dir, 8, train__checkpoint_every=2), timeout=300
    )
    elapsed = time.time() - started
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0
    errors = [line for line in out.splitlines() if "error:" in line and "trainer_state_rank1.json" in line]
    assert len(errors) == 1, out[-4000:]
    assert "cannot read" in errors[0] and "train.resume=" in errors[0]
    assert "Traceback" not in out and "Connection closed" not in out, out[-4000:]
    assert os.path.isfile(os.path.join(run_dir, "logs", "error_rank1.log"))
    print(f"failed run stopped after {elapsed:.1f} s")


def test_every_file_is_flushed_to_disk_before_the_marker(tmp_path, monkeypatch):
    """A crashed machine (not a killed process) loses what is still in the page cache: the marker
    could survive while a file it lists came back as zeros at the listed size, which the size
    check cannot see. Every file of the tag must be fsynced before the marker is, and the
    renames' directories after them."""

    class Engine:  # what save_checkpoint asks of DeepSpeed's engine
        module = torch.nn.Linear(2, 2)  # world.json lists its parameters

        def train_micro_batch_size_per_gpu(self):
            return 2

        def gradient_accumulation_steps(self):
            return 1

        def zero_optimization_stage(self):
            return 2

        def save_checkpoint(self, save_dir, tag, client_state, save_latest):
            os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
            with open(os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"), "wb") as fh:
                fh.write(b"w" * 1000)

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    run_dir = str(tmp_path / "run")
    tag = ckpt.save_checkpoint(Engine(), run_dir, 3, {"step": 3, "data": {}}, rank=0, keep=2)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    marker_at = next(i for i, p in enumerate(synced) if p.endswith(ckpt.MARKER + ".tmp"))
    listed = json.loads(open(os.path.join(ckpt_dir, tag, ckpt.MARKER)).read())["files"]
    before_marker = {os.path.basename(p) for p in synced[:marker_at]}
    assert set(listed) <= before_marker, set(listed) - before_marker
    assert os.path.realpath(ckpt_dir) in synced[marker_at:]  # the directory after the rename


def train_on_a_full_disk(synthetic_shards, run_dir: str, **extra):
    """4 steps on 2 ranks through the deepspeed launcher, checkpoint at step 2, on a "full disk": a
    per-file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past 1 MB fail as on a full disk)."""
    import resource
    import subprocess

    def file_size_cap():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    overrides = tr.base_overrides(
        synthetic_shards, run_dir, 4, eval__every=0, train__checkpoint_every=2, **extra
    )
    return subprocess.run(
        tr.command("deepspeed", overrides, 2),
        capture_output=True,
        text=True,
        timeout=300,
        env=tr.env(),
        cwd=tr.REPO,
        preexec_fn=file_size_cap,
    )


@pytest.mark.slow
def test_a_checkpoint_the_disk_refuses_is_one_line_per_rank(synthetic_shards, tmp_path):
    """A full disk, made here with a per-file size limit (RLIMIT_FSIZE, SIGXFSZ ignored: writes past
    1 MB fail as they do on a full disk). Before: on each rank a DeepSpeed traceback ending in
    torch.save's "unexpected pos 74560 vs 74464", no word of disk space or of what to do next."""
    proc = train_on_a_full_disk(synthetic_shards, str(tmp_path / "run"))
    assert proc.returncode != 0, tr.describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: rank ")]
    # Both ranks' writes fail; the launcher stops the other rank as soon as one exits, so on a
    # loaded machine the slower one may be gone before it prints (seen once in three runs), or may
    # report that its peer stopped first.
    written = [line for line in errors if "checkpoint step_00000002 could not be written to " in line]
    assert 1 <= len(errors) <= 2 and written and "Traceback" not in proc.stderr, tr.describe(proc)
    for line in written:
        assert "GiB free there): free space" in line and "rerun with train.resume=auto" in line, line
    for line in set(errors) - set(written):
        assert "another rank stopped during the save" in line, line


def test_only_write_failures_get_the_disk_space_advice():
    """A CUDA out-of-memory in ZeRO-3's gather during a save keeps its own error ("free space"
    would be the wrong advice); torch.save's writer failing and an OSError get the one line."""
    assert ckpt.is_write_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7"))
    assert ckpt.is_write_failure(OSError(28, "No space left on device"))
    assert not ckpt.is_write_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
