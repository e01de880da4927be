"""Checkpoint leftovers and the data position across changed settings: real files, a real Trainer
(world 1, tests/inprocess_trainer.py) and real streams over real JPEG shards."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch
from transformers import CLIPImageProcessor

from vutrain import checkpoint as ckpt
from vutrain.data import TrainStream, make_preprocess
from vutrain.data.epoch_remainder import StreamStateError
from vutrain.data.synthetic import write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, make_tokenize, train_bpe_tokenizer

from inprocess_trainer import train

IMAGE = 16


class Killed(BaseException):
    """The process dying at this point (not an Exception anything handles)."""


def _save_files(ckpt_dir: str, step: int, payload: bytes) -> str:
    """A checkpoint as `save_checkpoint` leaves it, files written by hand instead of DeepSpeed."""
    tmp = os.path.join(ckpt_dir, ckpt.tag_for(step) + ckpt.TMP_SUFFIX)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "mp_rank_00_model_states.pt"), "wb") as fh:
        fh.write(payload)
    ckpt._complete(ckpt_dir, ckpt.tag_for(step), step)
    return os.path.join(ckpt_dir, ckpt.tag_for(step))


def _resave_killed_while_deleting_the_old_copy(ckpt_dir: str, monkeypatch) -> str:
    """Save step 4 again (a requeued run's final eval does) and die half-way through deleting
    the old copy, the slow part for a real model."""
    rmtree = shutil.rmtree

    def dies_half_way(path, *args, **kwargs):
        if str(path).endswith(".replaced.tmp") and os.path.isdir(path):
            os.remove(os.path.join(path, os.listdir(path)[0]))
            raise Killed
        return rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", dies_half_way)
    with pytest.raises(Killed):
        _save_files(ckpt_dir, 4, b"new" * 100)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    leftover = os.path.join(ckpt_dir, "step_00000004.replaced.tmp")
    assert os.path.isdir(leftover)
    return leftover


def test_the_old_copy_of_a_resaved_checkpoint_left_by_a_kill_is_removed_at_resume_and_save(
    tmp_path, monkeypatch
):
    """A kill while the old copy of a re-saved tag is deleted left `step_X.replaced.tmp` (a whole
    checkpoint's disk) that nothing removed. The resume (step_X complete: the new copy is there)
    and the next save's prune remove it; the new step_X stays complete and is the one resumed."""
    ckpt_dir = ckpt.checkpoints_dir(str(tmp_path))
    os.makedirs(ckpt_dir)
    _save_files(ckpt_dir, 2, b"a" * 100)
    _save_files(ckpt_dir, 4, b"old" * 100)
    leftover = _resave_killed_while_deleting_the_old_copy(ckpt_dir, monkeypatch)

    assert ckpt.resolve_resume("auto", str(tmp_path), verbose=False) == (ckpt_dir, "step_00000004")
    assert not os.path.exists(leftover)
    tag_dir = os.path.join(ckpt_dir, "step_00000004")
    assert ckpt.verify_tag(tag_dir) is None
    with open(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), "rb") as fh:
        assert fh.read() == b"new" * 100

    leftover = _resave_killed_while_deleting_the_old_copy(ckpt_dir, monkeypatch)
    _save_files(ckpt_dir, 6, b"b" * 100)
    assert "step_00000004.replaced.tmp" in ckpt.prune(ckpt_dir, keep=5)
    assert not os.path.exists(leftover)
    assert [t for t in ckpt.list_tags(ckpt_dir) if ckpt.verify_tag(os.path.join(ckpt_dir, t))] == []


def test_the_only_copy_of_a_step_is_kept_when_the_kill_came_between_the_renames(tmp_path):
    """Killed after the old step_X moved aside and before the new one took its name: the resume
    does not delete the old copy (it is the step's only one under any name it looks at)."""
    ckpt_dir = ckpt.checkpoints_dir(str(tmp_path))
    os.makedirs(ckpt_dir)
    _save_files(ckpt_dir, 2, b"a" * 100)
    tag_dir = _save_files(ckpt_dir, 4, b"old" * 100)
    os.rename(tag_dir, tag_dir + ".replaced.tmp")
    assert ckpt.resolve_resume("auto", str(tmp_path), verbose=False) == (ckpt_dir, "step_00000002")
    assert ckpt.verify_tag(tag_dir + ".replaced.tmp") is None


def _sample_keys(prefix: str) -> list[str]:
    keys = []
    for path in sorted(glob.glob(prefix + ".*")):
        with open(path, encoding="utf-8") as fh:
            keys += fh.read().split()
    return keys


def test_a_resume_with_another_micro_batch_and_the_same_global_batch_continues_the_epoch(
    tiny_shards, tmp_path, single_process, monkeypatch
):
    """train.micro_batch_size 16 -> 8 with train.grad_accum_steps 1 -> 2 on the same world size
    stopped with "resume with the saved values, or start the data stream fresh" (no setting
    does that). It now continues the epoch: the 48 samples after the resume are all new in the
    epoch (none of the 48 drawn before, none twice). A change of the global batch is refused in
    one line naming the keys that keep it."""
    from vutrain.checkpoint_reshape import ResumeShapeError

    run_dir = str(tmp_path / "run")
    log = str(tmp_path / "samples")
    monkeypatch.setenv("VUTRAIN_SAMPLE_LOG", log)
    train(tiny_shards, run_dir, 3, eval__every=0, data__val_shards="", train__checkpoint_every=0)
    before = _sample_keys(log)
    assert len(before) == 48
    for path in glob.glob(log + ".*"):
        os.remove(path)

    with pytest.raises(ResumeShapeError) as refused:
        train(tiny_shards, run_dir, 6, eval__every=0, data__val_shards="", train__micro_batch_size=8)
    message = str(refused.value)
    assert "\n" not in message and "global batch 16 -> 8" in message
    assert "train.grad_accum_steps=2" in message
    assert not glob.glob(log + ".*")  # refused before any batch

    train(
        tiny_shards,
        run_dir,
        6,
        eval__every=0,
        data__val_shards="",
        train__checkpoint_every=0,
        train__micro_batch_size=8,
        train__grad_accum_steps=2,
    )
    after = _sample_keys(log)
    assert len(after) == 48
    assert len(set(after)) == 48
    assert not set(after) & set(before)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume2")
    info = write_synthetic(str(root / "syn"), 96, 16, image_size=IMAGE, seed=3, val_samples=0)
    tok = train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), str(root / "tok"), 300, 16)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    train_dir = root / "syn" / "train"
    shards = sorted(str(p) for p in train_dir.glob("*.tar"))
    # The same list in another folder (moved data), and one shard swapped for a new one.
    moved = root / "moved"
    shutil.copytree(train_dir, moved)
    swapped = root / "swapped"
    shutil.copytree(train_dir, swapped)
    os.rename(swapped / os.path.basename(shards[-1]), swapped / "00099.tar")

    def make(spec: str, world_size: int = 1, rank: int = 0) -> TrainStream:
        return TrainStream(
            spec,
            preprocess=make_preprocess(processor),
            tokenize=make_tokenize(tok, 16),
            batch_size=4,
            rank=rank,
            world_size=world_size,
            num_workers=0,
            seed=0,
            shuffle_buffer=8,
            num_samples=96,
        )

    return {
        "make": make,
        "spec": "::".join(shards),
        "moved": "::".join(sorted(str(p) for p in moved.glob("*.tar"))),
        "swapped": "::".join(sorted(str(p) for p in swapped.glob("*.tar"))),
    }


def test_a_data_position_over_another_shard_list_of_the_same_length_is_refused(streams):
    """One shard replaced by another keeps the shard count, and the position resumed over the new
    list without a word (other samples than the saved position's). It is now one line naming
    data.train_shards, for a rank's own state and for every rank's ({"ranks": ...}) alike; the
    same shards in another folder still resume exactly."""
    make = streams["make"]
    with make(streams["spec"]) as stream:
        for _ in range(5):
            next(stream)
        state = stream.state_dict()
        want = next(stream)

    for saved in (state, {"ranks": [state]}):
        with make(streams["swapped"]) as other, pytest.raises(StreamStateError) as refused:
            other.load_state_dict(saved)
        message = str(refused.value)
        assert "\n" not in message and "data.train_shards" in message and "train.resume=never" in message

    with make(streams["moved"]) as moved:
        moved.load_state_dict(state)
        got = next(moved)
    assert torch.equal(got["pixel_values"], want["pixel_values"])
    assert torch.equal(got["input_ids"], want["input_ids"])
