"""Which tokenizer `python -m vutrain.export` writes beside a preset run's weights: the one the
checkpoint's COMPLETE.json records (RUN/tokenizer, or a folder train.resume=never moved aside), or
one `error:` line when no folder of the run holds it (a real in-process training run, real files,
real tokenizers, the export CLI's main)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from vutrain import checkpoint as ckpt

from inprocess_trainer import train_preset_run

TAG = "step_00000002"


@pytest.fixture(scope="module")
def trained_run(tiny_shards, tmp_path_factory):
    """A preset run of 2 steps with a complete checkpoint (run once, copied by the tests)."""
    return train_preset_run(tiny_shards, str(tmp_path_factory.mktemp("export2") / "first"))


def _copy(trained_run: str, to: str) -> str:
    shutil.copytree(trained_run, to)
    return to


def _swap_two_tokens(tok_dir: str) -> None:
    """Another tokenizer of the same size (a wrong copy restored by hand): two words trade ids, so
    the checkpoint's embeddings fit it and would read each word as the other."""
    path = os.path.join(tok_dir, "tokenizer.json")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    vocab = data["model"]["vocab"]
    first, second = sorted(vocab, key=vocab.get)[-2:]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh)


def _recorded(run_dir: str) -> str:
    return ckpt.read_marker(os.path.join(run_dir, "checkpoints", TAG))[ckpt.TOKENIZER_KEY]


def test_export_takes_the_moved_aside_tokenizer_the_checkpoint_records(trained_run, tmp_path):
    """RUN/tokenizer replaced by another tokenizer of the same size, the run's own kept as
    tokenizer.replaced-S: the export wrote RUN/tokenizer beside the weights (other words under the
    embeddings' token ids, no word said). It now writes the one the checkpoint records."""
    from vutrain.export import main

    run_dir = _copy(trained_run, str(tmp_path / "run"))
    shutil.copytree(
        os.path.join(run_dir, "tokenizer"), os.path.join(run_dir, "tokenizer.replaced-20260101T000000Z")
    )
    _swap_two_tokens(os.path.join(run_dir, "tokenizer"))
    assert ckpt.tokenizer_fingerprint(os.path.join(run_dir, "tokenizer")) != _recorded(run_dir)

    out = tmp_path / "hf"
    assert main([run_dir, str(out)]) == 0
    assert ckpt.tokenizer_fingerprint(str(out)) == _recorded(run_dir)


def test_export_over_another_tokenizer_is_refused_in_one_line(trained_run, tmp_path, capsys):
    """The same replaced RUN/tokenizer with no folder of the run holding the recorded one: the
    export succeeded with the wrong vocabulary; now one `error:` line, exit 2, nothing written."""
    from vutrain.export import main

    run_dir = _copy(trained_run, str(tmp_path / "run"))
    _swap_two_tokens(os.path.join(run_dir, "tokenizer"))

    out = tmp_path / "hf"
    assert main([run_dir, str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: "), err
    assert "another tokenizer" in last and _recorded(run_dir)[:12] in last, last
    assert not out.exists()


def test_checkpoints_without_a_record_export_with_the_run_tokenizer(trained_run, tmp_path):
    """A checkpoint saved before the record existed exports with RUN/tokenizer as before."""
    from vutrain.export import main

    run_dir = _copy(trained_run, str(tmp_path / "run"))
    marker_path = os.path.join(run_dir, "checkpoints", TAG, ckpt.MARKER)
    with open(marker_path, encoding="utf-8") as fh:
        marker = json.load(fh)
    del marker[ckpt.TOKENIZER_KEY]
    with open(marker_path, "w", encoding="utf-8") as fh:
        json.dump(marker, fh)
    _swap_two_tokens(os.path.join(run_dir, "tokenizer"))

    out = tmp_path / "hf"
    assert main([run_dir, str(out)]) == 0
    assert ckpt.tokenizer_fingerprint(str(out)) == ckpt.tokenizer_fingerprint(
        os.path.join(run_dir, "tokenizer")
    )


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_checkpoint_damaged_at_its_listed_sizes_is_one_line(trained_run, tmp_path, capsys, name):
    """A checkpoint file zeroed at the size its marker lists (what a machine crash or a bad disk
    leaves; the marker checks sizes only): the export died with a torch.load traceback. Now one
    `error:` line, exit 2, naming the checkpoint and saying to export another with --tag."""
    from vutrain.export import main

    run_dir = _copy(trained_run, str(tmp_path / "run"))
    path = os.path.join(run_dir, "checkpoints", TAG, name)
    with open(path, "r+b") as fh:
        fh.write(b"\0" * os.path.getsize(path))
    assert ckpt.verify_tag(os.path.dirname(path)) is None

    out = tmp_path / "hf"
    assert main([run_dir, str(out)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err and last.startswith(f"error: checkpoint {TAG} "), err
    assert "does not load" in last and "--tag" in last, last
    assert not out.exists()
