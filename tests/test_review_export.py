"""Review of `python -m vutrain.export`'s output folder: an OUT_DIR that already holds files is refused
in one line (an earlier peft adapter there was loaded on top of the export), a write that fails part
way leaves no folder that looks like a complete model, and the files are readable by other users."""

from __future__ import annotations

import os

import pytest
import torch

from inprocess_trainer import train_outside_test


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """One tiny ZeRO-1 + LoRA run of one step, shared by the tests (they only read it). The launcher
    variables are handled as conftest's `single_process` does, for the whole module."""
    path = str(tmp_path_factory.mktemp("export_run") / "run")
    train_outside_test(
        tiny_shards,
        path,
        steps=1,
        one_thread=True,
        train__zero_stage=1,
        train__lr=0.01,
        eval__every=0,
        data__val_shards="",
        model__lora__enabled="true",
    )
    return path


def _last_error_line(capsys) -> tuple[str, str]:
    err = capsys.readouterr().err
    return err, err.strip().splitlines()[-1]


def test_export_into_a_folder_holding_an_adapter_is_refused(run_dir, tmp_path, capsys):
    """A folder that held a peft adapter (adapter_config.json + weights): the export added its files,
    and CLIPModel.from_pretrained applied the stale adapter on top (before: other embeddings, no
    word). Now one `error:` line names the folder and its files, and nothing there changes."""
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPModel

    from vutrain.export import load_trained_module, main, to_hf_clip

    clean = tmp_path / "clean"
    to_hf_clip(load_trained_module(run_dir)[0]).save_pretrained(clean)
    adapter = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    out = tmp_path / "hf"
    get_peft_model(CLIPModel.from_pretrained(clean), adapter).save_pretrained(out)
    before = sorted(os.listdir(out))
    assert "adapter_config.json" in before

    assert main([run_dir, str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and last.startswith(f"error: OUT_DIR {out} is not empty"), err
    assert "adapter_config.json" in last and "remove the folder or give a new one" in last
    assert sorted(os.listdir(out)) == before


def test_export_into_the_run_dir_is_refused(run_dir, capsys):
    """OUT_DIR = RUN_DIR: the HF files landed beside config.yaml and checkpoints/ (before)."""
    from vutrain.export import main

    before = sorted(os.listdir(run_dir))
    assert main([run_dir, run_dir]) == 2
    _, last = _last_error_line(capsys)
    assert last.startswith(f"error: OUT_DIR {run_dir} is not empty")
    assert sorted(os.listdir(run_dir)) == before


def test_export_into_an_empty_folder_loads_with_transformers(run_dir, tmp_path):
    """An existing empty folder is fine: it ends up holding the model, tokenizer and processor,
    with no hidden partial folder left beside it."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    from vutrain.export import main

    out = tmp_path / "hf"
    out.mkdir()
    assert main([run_dir, str(out)]) == 0
    CLIPModel.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    CLIPImageProcessor.from_pretrained(out)
    assert os.listdir(tmp_path) == ["hf"]


def test_failed_write_leaves_no_model_folder(run_dir, tmp_path, capsys, monkeypatch):
    """The disk fills while the image processor is written (the last of the three saves). Before:
    OUT_DIR kept config.json, the weights and the tokenizer, which CLIPModel.from_pretrained loads
    as a complete export. Now the files go to a hidden sibling renamed at the end: OUT_DIR does not
    exist, the sibling is removed, and the error is one line."""
    from transformers import CLIPImageProcessor

    from vutrain.export import main

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(CLIPImageProcessor, "save_pretrained", disk_full)
    out = tmp_path / "hf"
    assert main([run_dir, str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and last == "error: [Errno 28] No space left on device", err
    assert not out.exists()
    assert os.listdir(tmp_path) == []


def test_exported_files_are_readable_by_other_users(run_dir, tmp_path):
    """safetensors writes model.safetensors with mode 0600 whatever the umask: on a shared machine
    another user (a teammate, the serving account) got PermissionError loading the export (before).
    Now every exported file has the mode the umask gives new files: 0644 under umask 022."""
    import stat

    from vutrain.export import main

    out = tmp_path / "hf"
    umask = os.umask(0o022)
    try:
        assert main([run_dir, str(out)]) == 0
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert "model.safetensors" in modes and "tokenizer.json" in modes
    assert modes == dict.fromkeys(modes, 0o644), modes
