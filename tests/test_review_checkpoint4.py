"""Which tokenizer goes with which checkpoint, and which checkpoint the export takes: a resume
from checkpoints that train.resume=never moved aside (their tokenizer moved with them), the one
suffix move_aside gives everything it moves, and the export of a save killed after its marker
(real in-process training, real files, the export CLI's main)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vutrain import checkpoint as ckpt
from vutrain.config import ConfigError

from inprocess_trainer import train, train_preset_run

TAG = "step_00000002"


def _tokenizer_json(tok_dir: str) -> bytes:
    with open(os.path.join(tok_dir, "tokenizer.json"), "rb") as fh:
        return fh.read()


def _aside(run_dir: str, stem: str) -> list[str]:
    return sorted(n for n in os.listdir(run_dir) if n.startswith(f"{stem}.replaced-"))


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A preset run of 2 steps with a complete checkpoint (run once, copied by the tests)."""
    return train_preset_run(tiny_shards, str(tmp_path_factory.mktemp("checkpoint4") / "first"))


def test_resume_from_checkpoints_moved_aside_uses_their_tokenizer(
    trained_run, tiny_shards, tmp_path, single_process
):
    """After train.resume=never (a new tokenizer trained into RUN/tokenizer), train.resume=
    RUN/checkpoints.replaced-S/step_X into RUN trained on with the new run's tokenizer, other
    token ids under the checkpoint's embeddings, without a word; it now refuses in one line. Into
    a new output_dir it copied RUN/tokenizer (the new one); it now takes RUN/tokenizer.replaced-S."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    old_tokenizer = _tokenizer_json(os.path.join(run_dir, "tokenizer"))
    train(tiny_shards, run_dir, steps=2, train__resume="never", data__tokenizer_samples=40, eval__every=0)
    assert _tokenizer_json(os.path.join(run_dir, "tokenizer")) != old_tokenizer
    [aside] = _aside(run_dir, "checkpoints")
    assert _aside(run_dir, "tokenizer") == ["tokenizer" + aside[len("checkpoints") :]]
    resume = os.path.join(run_dir, aside, TAG)

    with pytest.raises(ConfigError) as info:
        train(tiny_shards, run_dir, steps=3, train__resume=resume, train__checkpoint_every=0, eval__every=0)
    message = str(info.value)
    assert "\n" not in message and "tokenizer.replaced-" in message and "new output_dir" in message, message
    assert ckpt.latest_tag(os.path.join(run_dir, "checkpoints")) == TAG  # nothing trained, nothing moved

    other = str(tmp_path / "other")
    os.makedirs(other)
    assert ckpt.adopt_tokenizer(resume, other) == os.path.join(other, "tokenizer")
    assert _tokenizer_json(os.path.join(other, "tokenizer")) == old_tokenizer


def test_move_aside_gives_checkpoints_and_tokenizer_one_suffix(trained_run, tmp_path, monkeypatch):
    """A run whose checkpoints.replaced-S was taken in the same second (set_aside_later of a
    roll-back, or an earlier fresh start without a preset tokenizer): train.resume=never moved the
    checkpoints to checkpoints.replaced-S-1 but the tokenizer to tokenizer.replaced-S, so the
    tokenizer sat beside other checkpoints than its own. Both now take the same free suffix."""
    monkeypatch.setattr(ckpt.time, "strftime", lambda fmt, t=None: "20260101T000000Z")
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints.replaced-20260101T000000Z", "step_00000004"))
    moved = ckpt.move_aside(run_dir)
    suffixes = {os.path.basename(p).split(".", 1)[1].removesuffix(".jsonl") for p in moved}
    assert suffixes == {"replaced-20260101T000000Z-1"}, moved
    assert not os.path.exists(os.path.join(run_dir, "tokenizer.replaced-20260101T000000Z"))


def test_export_takes_a_save_killed_after_its_marker(trained_run, tmp_path, capsys):
    """A save killed between COMPLETE.json and its rename is complete as step_X.tmp (the next
    training start publishes it): the export took the checkpoint before it (here: none, "no
    checkpoint"), and --tag step_X said the marker was missing. Both now export it, the same
    weights as the published checkpoint, and leave the run directory as it was."""
    from vutrain.export import main

    assert main([trained_run, str(tmp_path / "published")]) == 0
    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    checkpoints = os.path.join(run_dir, "checkpoints")
    os.rename(os.path.join(checkpoints, TAG), os.path.join(checkpoints, TAG + ckpt.TMP_SUFFIX))
    before = sorted(os.listdir(checkpoints))
    expected = load_file(str(tmp_path / "published" / "model.safetensors"))
    for name, args in (("newest", []), ("tagged", ["--tag", TAG])):
        code = main([run_dir, str(tmp_path / name), *args])
        assert code == 0, capsys.readouterr().err
        got = load_file(str(tmp_path / name / "model.safetensors"))
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert sorted(os.listdir(checkpoints)) == before
