"""A run's saved preset tokenizer when it does not load, on the paths model.check_saved_tokenizer
does not cover: train.resume=<another run's checkpoint> into a run directory whose own tokenizer is
damaged (or whose source run's is), and `python -m vutrain.export` of a run whose tokenizer is
damaged (real in-process training, real files, the export CLI's main)."""

from __future__ import annotations

import logging
import os
import shutil

import pytest

from vutrain import checkpoint as ckpt
from vutrain.config import ConfigError

from inprocess_trainer import train, train_preset_run


def _tokenizer_json(run_dir: str) -> bytes:
    with open(os.path.join(run_dir, "tokenizer", "tokenizer.json"), "rb") as fh:
        return fh.read()


def _truncate_tokenizer(run_dir: str) -> bytes:
    """Half of RUN/tokenizer/tokenizer.json, as an older version killed mid-save left it."""
    data = _tokenizer_json(run_dir)
    with open(os.path.join(run_dir, "tokenizer", "tokenizer.json"), "wb") as fh:
        fh.write(data[: len(data) // 2])
    return data[: len(data) // 2]


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A preset run of 2 steps with a complete checkpoint (run once, copied by the tests)."""
    return train_preset_run(tiny_shards, str(tmp_path_factory.mktemp("tokenizer2") / "first"))


def test_resume_into_a_run_whose_tokenizer_is_damaged_adopts_the_checkpoints_one(
    trained_run, tiny_shards, tmp_path, single_process, caplog
):
    """train.resume=<another run's checkpoints> into an output_dir holding a truncated tokenizer
    (an earlier start killed mid-save): adoption returned early on the folder, and the start then
    retrained a tokenizer from this run's settings (here fewer data.tokenizer_samples), other
    token ids under the checkpoint's embeddings. It is now replaced by the checkpoint's run's
    tokenizer, with a warning."""
    second_dir = str(tmp_path / "second")
    shutil.copytree(os.path.join(trained_run, "tokenizer"), os.path.join(second_dir, "tokenizer"))
    _truncate_tokenizer(second_dir)
    with caplog.at_level(logging.WARNING, logger="vutrain.checkpoint"):
        train(
            tiny_shards,
            second_dir,
            steps=3,
            train__resume=os.path.join(trained_run, "checkpoints"),
            data__tokenizer_samples=40,
            train__checkpoint_every=0,
            eval__every=0,
        )
    assert _tokenizer_json(second_dir) == _tokenizer_json(trained_run)
    assert [r for r in caplog.records if "does not load" in r.message and "replacing" in r.message]
    assert not os.path.exists(os.path.join(second_dir, "tokenizer.tmp"))


def test_a_local_tokenizer_that_loads_is_kept(trained_run, tmp_path):
    """Only a damaged local tokenizer is replaced: one that loads (adopted by an earlier start of
    this run) stays as it is."""
    run_dir = str(tmp_path / "second")
    os.makedirs(os.path.join(run_dir, "tokenizer"))
    shutil.copy(os.path.join(trained_run, "tokenizer", "tokenizer.json"), os.path.join(run_dir, "tokenizer"))
    kept = _tokenizer_json(run_dir)
    assert ckpt.adopt_tokenizer(os.path.join(trained_run, "checkpoints"), run_dir) is None
    assert _tokenizer_json(run_dir) == kept
    assert os.listdir(os.path.join(run_dir, "tokenizer")) == ["tokenizer.json"]


def test_a_resumed_runs_damaged_tokenizer_is_refused_in_one_line(trained_run, tmp_path):
    """The checkpoint's run's own tokenizer truncated: it was copied, found damaged in a run with
    no checkpoint of its own, and retrained from this run's data (other token ids, one warning
    saying no checkpoint used it). The start now refuses in one line and copies nothing."""
    source_run = str(tmp_path / "first")
    shutil.copytree(trained_run, source_run)
    _truncate_tokenizer(source_run)
    run_dir = str(tmp_path / "second")
    os.makedirs(run_dir)
    with pytest.raises(ConfigError) as info:
        ckpt.adopt_tokenizer(os.path.join(source_run, "checkpoints"), run_dir)
    message = str(info.value)
    assert "\n" not in message and "does not load" in message and "Restore" in message, message
    assert os.listdir(run_dir) == []


def test_export_of_a_run_whose_tokenizer_is_damaged_is_one_line(trained_run, tmp_path, capsys):
    """`python -m vutrain.export` of a run whose RUN/tokenizer/tokenizer.json is truncated (or
    gone): a JSONDecodeError traceback before; now one `error:` line, exit 2, saying the run's
    tokenizer does not load and to restore it from a copy."""
    from vutrain.export import main

    run_dir = str(tmp_path / "run")
    shutil.copytree(trained_run, run_dir)
    _truncate_tokenizer(run_dir)
    for _ in ("truncated", "gone"):
        assert main([run_dir, str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err and last.startswith("error: "), err
        assert "tokenizer" in last and "restore the folder from a copy" in last, last
        assert not (tmp_path / "hf").exists()
        shutil.rmtree(os.path.join(run_dir, "tokenizer"), ignore_errors=True)
