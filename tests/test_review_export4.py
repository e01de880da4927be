"""Review of `python -m vutrain.export`: an existing empty OUT_DIR that no rename can replace (a symlink
to a folder; a mount point or a folder in a read-only parent alike) receives the export, with nothing
left behind when it fails, and a run's config.yaml that does not parse is one `error:` line."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from test_review_export import _last_error_line

from inprocess_trainer import train_outside_test

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """One tiny ZeRO-0 run of one step, shared by the tests (they only read it). The launcher
    variables are handled as conftest's `single_process` does, for the whole module."""
    path = str(tmp_path_factory.mktemp("export4_run") / "run")
    train_outside_test(
        tiny_shards, path, steps=1, one_thread=True, train__zero_stage=0, eval__every=0, data__val_shards=""
    )
    return path


def test_export_into_a_symlink_to_an_empty_folder(run_dir, tmp_path, capsys):
    """OUT_DIR is a symlink to an empty folder (as `models/current -> /scratch/...`). Before: the model
    was written beside it and the final rename onto the link failed ("error: [Errno 20] Not a
    directory"), as it fails onto a mount point (EBUSY) or beside a folder in a read-only parent.
    Now the export fills the folder the link points to, the link stays, and nothing else is left."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from vutrain.export import load_trained_module, main, to_hf_clip

    target, link = tmp_path / "scratch", tmp_path / "current"
    target.mkdir()
    link.symlink_to(target, target_is_directory=True)
    assert main([run_dir, str(link)]) == 0, capsys.readouterr().err
    assert link.is_symlink() and sorted(os.listdir(tmp_path)) == ["current", "scratch"]
    held = sorted(os.listdir(target))
    assert not [n for n in held if n.startswith(".")], held
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(held)
    exported = CLIPModel.from_pretrained(link).state_dict()
    AutoTokenizer.from_pretrained(link)
    CLIPImageProcessor.from_pretrained(link)
    with torch.no_grad():
        trained = to_hf_clip(load_trained_module(run_dir)[0]).state_dict()
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_a_dangling_symlink_out_dir_is_refused_before_the_model_is_built(run_dir, tmp_path, capsys):
    """OUT_DIR is a symlink whose folder is gone (a scratch volume not mounted). Before: the whole model
    was consolidated and written beside it, then the rename failed with "[Errno 20] Not a directory".
    Now one line naming the link's target, before any work, and nothing is written."""
    from vutrain.export import main

    link = tmp_path / "current"
    link.symlink_to(tmp_path / "scratch" / "gone", target_is_directory=True)
    assert main([run_dir, str(link)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and "is a symlink to" in last and "does not exist" in last, err
    assert sorted(os.listdir(tmp_path)) == ["current"]


def test_failed_move_into_an_existing_folder_leaves_it_empty(run_dir, tmp_path, capsys, monkeypatch):
    """The disk fills while the files move into an existing empty OUT_DIR: it is left empty (no
    staging folder, no model files), so neither a half model nor a refusal of the next export."""
    from vutrain.export import main

    out = tmp_path / "hf"
    out.mkdir()
    real_replace = os.replace

    def fail_on_config(src, dst):
        if os.path.basename(dst) == "config.json":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_config)
    assert main([run_dir, str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and last == "error: [Errno 28] No space left on device", err
    assert os.listdir(out) == []
    assert os.listdir(tmp_path) == ["hf"]


@pytest.mark.parametrize(
    "text",
    [b"model: [unclosed\n", b"model:\n  preset: tiny\n: : :\n", b"\xff\xfe\x00 not utf-8"],
    ids=["unclosed-list", "stray-colon", "not-utf8"],
)
def test_a_config_yaml_that_does_not_parse_is_one_line(tmp_path, capsys, text):
    """A run whose config.yaml was edited by hand with a typo, or cut short: before, a YAML parser
    (or UnicodeDecodeError) traceback from the export's own pre-read. Now the one `error:` line the
    trainer gives for the same file, exit 2, and no OUT_DIR."""
    from vutrain.export import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_bytes(text)
    assert main([str(run), str(tmp_path / "hf")]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and last.startswith(f"error: {run / 'config.yaml'} "), err
    assert "YAML" in last
    assert not (tmp_path / "hf").exists()


def test_a_valid_config_yaml_still_exports_past_the_pre_read(tmp_path, capsys):
    """The shipped tiny.yaml parses: the export goes on to look for checkpoints (none here)."""
    from vutrain.export import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(REPO / "vutrain" / "configs" / "tiny.yaml", run / "config.yaml")
    assert main([str(run), str(tmp_path / "hf")]) == 2
    assert "no checkpoint in" in _last_error_line(capsys)[1]
