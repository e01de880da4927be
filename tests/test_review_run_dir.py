"""The run directory's preparation at start when train.resume names another run's checkpoint and
the model is a preset (its text embeddings use that run's BPE token ids): the resumed run's
tokenizer missing, and a damaged one refused on every rank of a 2-rank start (real in-process
training, real files, real gloo ranks)."""

from __future__ import annotations

import os
import shutil

import pytest

from vutrain import checkpoint as ckpt
from vutrain.config import ConfigError

from helpers_dist import run_distributed
from inprocess_trainer import train, train_preset_run


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A preset run of 2 steps with a complete checkpoint (run once, copied by the tests)."""
    return train_preset_run(tiny_shards, str(tmp_path_factory.mktemp("run_dir") / "first"))


def _copy_run(trained_run: str, to: str) -> str:
    shutil.copytree(trained_run, to)
    return to


def test_a_resume_whose_run_has_no_tokenizer_is_refused_in_one_line(
    trained_run, tiny_shards, tmp_path, single_process
):
    """train.resume=<a run's checkpoints> whose run has no tokenizer/ (checkpoints copied alone, the
    folder lost) into a new output_dir: the new run trained its own tokenizer on its own data and
    trained on with token ids the checkpoint's embeddings never saw, without a word. The start now
    refuses in one line that says where to copy the tokenizer, and trains nothing."""
    source_run = _copy_run(trained_run, str(tmp_path / "first"))
    shutil.rmtree(os.path.join(source_run, "tokenizer"))
    run_dir = str(tmp_path / "second")
    with pytest.raises(ConfigError) as info:
        train(
            tiny_shards,
            run_dir,
            steps=3,
            train__resume=os.path.join(source_run, "checkpoints"),
            data__tokenizer_samples=40,
            train__checkpoint_every=0,
            eval__every=0,
        )
    message = str(info.value)
    assert "\n" not in message and "tokenizer.json not found" in message, message
    assert os.path.join(run_dir, "tokenizer") in message and "Copy" in message, message
    assert not os.path.exists(os.path.join(run_dir, "tokenizer"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_a_tokenizer_put_in_place_by_hand_lets_that_resume_start(trained_run, tmp_path):
    """What the refusal asks for works: with the checkpoint's run's tokenizer copied to RUN/tokenizer
    by hand, the same resume has nothing to adopt and keeps that copy."""
    source_run = _copy_run(trained_run, str(tmp_path / "first"))
    shutil.rmtree(os.path.join(source_run, "tokenizer"))
    run_dir = str(tmp_path / "second")
    shutil.copytree(os.path.join(trained_run, "tokenizer"), os.path.join(run_dir, "tokenizer"))
    resume = os.path.join(source_run, "checkpoints", "step_00000002")
    assert ckpt.tokenizer_to_adopt(resume, run_dir) is None
    assert ckpt.adopt_tokenizer(resume, run_dir) is None
    assert sorted(os.listdir(run_dir)) == ["tokenizer"]


def _start_trainer(rank: int, world_size: int, shards: dict, run_dir: str, resume: str) -> str:
    """One rank of a 2-rank start: the ConfigError's message, or '' when the Trainer was built."""
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    from inprocess_trainer import overrides

    cfg = load_config("tiny", overrides(shards, run_dir, 2, train__resume=resume, eval__every=0))
    try:
        Trainer(cfg, resolve_dist_env())
    except ConfigError as exc:
        return str(exc)
    return ""


def test_a_damaged_resumed_tokenizer_is_refused_on_every_rank(trained_run, tiny_shards, tmp_path):
    """2 ranks, train.resume=<a run's checkpoints> whose tokenizer.json is truncated: rank 0 refused
    in adopt_tokenizer and rank 1 waited at the run directory's barrier until the launcher's
    timeout (here: a gloo error once rank 0 had left). Now both raise the same one-line error."""
    source_run = _copy_run(trained_run, str(tmp_path / "first"))
    path = os.path.join(source_run, "tokenizer", "tokenizer.json")
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) // 2])
    run_dir = str(tmp_path / "second")
    resume = os.path.join(source_run, "checkpoints")
    messages = run_distributed(_start_trainer, 2, tiny_shards, run_dir, resume, timeout_s=60)
    assert messages[0] == messages[1], messages
    assert "does not load" in messages[0] and "\n" not in messages[0], messages
    assert not os.path.exists(os.path.join(run_dir, "tokenizer"))
