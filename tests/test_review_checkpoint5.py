"""Which tokenizer a checkpoint's token ids belong to: each checkpoint records its preset
tokenizer's vocabulary (sha256) in COMPLETE.json, and a resume finds that tokenizer or refuses in
one line; a damaged local tokenizer that adoption replaces is moved aside, not deleted (a real
in-process training run, real files, real tokenizers trained here)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pytest
from transformers import AutoTokenizer

from vutrain import checkpoint as ckpt
from vutrain.config import ConfigError
from vutrain.data.tokenizer import train_bpe_tokenizer

from inprocess_trainer import train, train_preset_run

OTHER_TEXTS = ["zebra quartz violin", "jumbo kayak yodel", "fjord wyvern oxbow"] * 10


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A preset run of 2 steps with a complete checkpoint (run once, copied by the tests)."""
    return train_preset_run(tiny_shards, str(tmp_path_factory.mktemp("checkpoint5") / "first"))


def _copy(trained_run: str, to: str) -> str:
    shutil.copytree(trained_run, to)
    return to


def _marker(tag_dir: str) -> dict:
    with open(os.path.join(tag_dir, ckpt.MARKER), encoding="utf-8") as fh:
        return json.load(fh)


def _retrain_tokenizer(run_dir: str) -> None:
    """RUN/tokenizer trained again on other texts (a fresh start with other data or vocab size)."""
    train_bpe_tokenizer(OTHER_TEXTS, os.path.join(run_dir, "tokenizer"), vocab_size=300)


def test_a_checkpoint_records_its_tokenizer(trained_run):
    """COMPLETE.json names the vocabulary of the tokenizer the run trained with: no checkpoint said
    which tokenizer its embeddings' token ids belong to."""
    marker = _marker(os.path.join(trained_run, "checkpoints", "step_00000002"))
    expected = ckpt.tokenizer_fingerprint(os.path.join(trained_run, "tokenizer"))
    assert expected and marker.get(ckpt.TOKENIZER_KEY) == expected


def test_rolled_back_checkpoints_find_their_tokenizer_after_a_fresh_start(trained_run, tmp_path):
    """Checkpoints a roll-back set aside alone (no tokenizer of their suffix), then
    train.resume=never (the tokenizer moved aside with another suffix) and a retrained
    RUN/tokenizer: a resume from the set-aside checkpoints took the retrained tokenizer, other
    token ids without a word. It now takes the set-aside tokenizer that the checkpoint records,
    and in the same run directory refuses in one line."""
    run_dir = _copy(trained_run, str(tmp_path / "run"))
    original = ckpt.tokenizer_fingerprint(os.path.join(run_dir, "tokenizer"))
    ckpt.set_aside_later(run_dir, os.path.join(run_dir, "nothing-loaded"), 0)
    (aside_tag,) = glob.glob(os.path.join(run_dir, "checkpoints.replaced-*", "step_00000002"))
    ckpt.move_aside(run_dir)
    _retrain_tokenizer(run_dir)
    assert ckpt.tokenizer_fingerprint(os.path.join(run_dir, "tokenizer")) != original

    new_dir = str(tmp_path / "new")
    adopted = ckpt.adopt_tokenizer(aside_tag, new_dir)
    assert adopted and ckpt.tokenizer_fingerprint(adopted) == original

    with pytest.raises(ConfigError) as info:
        ckpt.tokenizer_to_adopt(aside_tag, run_dir)
    assert "\n" not in str(info.value) and "new output_dir" in str(info.value), info.value


def test_auto_resume_over_another_tokenizer_is_refused_in_one_line(
    trained_run, tiny_shards, tmp_path, single_process
):
    """RUN/tokenizer replaced by another tokenizer that loads (a wrong copy restored by hand):
    train.resume=auto trained on under other token ids. The start now refuses in one line that
    names the folder to restore, before anything in the run directory changes."""
    run_dir = _copy(trained_run, str(tmp_path / "run"))
    aside = os.path.join(run_dir, "tokenizer.replaced-20260101T000000Z")
    shutil.copytree(os.path.join(run_dir, "tokenizer"), aside)
    _retrain_tokenizer(run_dir)
    with pytest.raises(ConfigError) as info:
        train(tiny_shards, run_dir, steps=3, eval__every=0)
    message = str(info.value)
    assert "\n" not in message and aside in message and "another tokenizer" in message, message


def test_checkpoints_without_a_record_keep_resuming(trained_run, tmp_path):
    """Checkpoints of older runs have no tokenizer record: adoption and auto resume go on as before."""
    run_dir = _copy(trained_run, str(tmp_path / "run"))
    tag_dir = os.path.join(run_dir, "checkpoints", "step_00000002")
    marker = _marker(tag_dir)
    del marker[ckpt.TOKENIZER_KEY]
    with open(os.path.join(tag_dir, ckpt.MARKER), "w", encoding="utf-8") as fh:
        json.dump(marker, fh)
    assert ckpt.verify_tag(tag_dir) is None
    assert ckpt.tokenizer_to_adopt("auto", run_dir) is None
    adopted = ckpt.adopt_tokenizer(tag_dir, str(tmp_path / "new"))
    assert adopted and ckpt.tokenizer_fingerprint(adopted) == ckpt.tokenizer_fingerprint(
        os.path.join(run_dir, "tokenizer")
    )


def test_a_tokenizer_saved_again_keeps_its_fingerprint(trained_run, tmp_path):
    """The advised restore from an export: the same tokenizer loaded, used with truncation and
    saved again (other bytes in tokenizer.json) is accepted as the checkpoint's."""
    tok = AutoTokenizer.from_pretrained(os.path.join(trained_run, "tokenizer"))
    tok(["a video about cats"], truncation=True, max_length=8, padding="max_length")
    tok.save_pretrained(str(tmp_path / "export"))
    assert ckpt.tokenizer_fingerprint(str(tmp_path / "export")) == ckpt.tokenizer_fingerprint(
        os.path.join(trained_run, "tokenizer")
    )


def test_a_damaged_local_tokenizer_is_moved_aside_not_deleted(trained_run, tmp_path, caplog):
    """Adoption over a local tokenizer that does not load deleted that folder, the user's files
    with it. It is now moved aside, with one warning naming where."""
    run_dir = str(tmp_path / "second")
    local = os.path.join(run_dir, "tokenizer")
    os.makedirs(local)
    with open(os.path.join(local, "tokenizer.json"), "w", encoding="utf-8") as fh:
        fh.write('{"truncated": ')
    with open(os.path.join(local, "notes.txt"), "w", encoding="utf-8") as fh:
        fh.write("my notes")
    with caplog.at_level(logging.WARNING, logger="vutrain.checkpoint"):
        ckpt.adopt_tokenizer(os.path.join(trained_run, "checkpoints"), run_dir)
    assert ckpt.tokenizer_load_error(local) is None
    (kept,) = glob.glob(os.path.join(run_dir, "tokenizer.damaged-*"))
    with open(os.path.join(kept, "notes.txt"), encoding="utf-8") as fh:
        assert fh.read() == "my notes"
    assert [r for r in caplog.records if kept in r.getMessage() and "\n" not in r.getMessage()]
