"""Review of the export's arguments as users pass them: an OUT_DIR that is a fresh volume (only
lost+found) or a cloned, model-less hub repo (git files and a model card) is filled and keeps those
entries as they were (both were refused as "not empty"); one that holds model files is still
refused; an empty RUN_DIR (an unset variable) and `--tag ..` are one line saying so."""

from __future__ import annotations

import os

import pytest

from inprocess_trainer import train_outside_test

CARD = "---\nlicense: mit\n---\n# my-clip\n"
GITATTRIBUTES = "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """One tiny ZeRO-0 run of one step, shared by the tests (they only read it)."""
    path = str(tmp_path_factory.mktemp("export9_run") / "run")
    train_outside_test(
        tiny_shards, path, steps=1, one_thread=True, train__zero_stage=0, eval__every=0, data__val_shards=""
    )
    return path


def _last_error_line(capsys) -> tuple[str, str]:
    err = capsys.readouterr().err
    return err, err.strip().splitlines()[-1]


def _fresh_volume(out) -> None:
    (out / "lost+found").mkdir(parents=True)


def _cloned_hub_repo(out) -> None:
    (out / ".git" / "objects").mkdir(parents=True)
    (out / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (out / ".gitattributes").write_text(GITATTRIBUTES)
    (out / "README.md").write_text(CARD)


def _tree(folder) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for a folder)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder)] = None
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                found[os.path.relpath(path, folder)] = fh.read()
    return found


@pytest.mark.parametrize("prepare", [_fresh_volume, _cloned_hub_repo], ids=["lost_found", "hub_repo"])
def test_export_fills_a_fresh_volume_or_a_cloned_hub_repo_and_keeps_its_files(run_dir, tmp_path, prepare):
    """The model lands beside lost+found or the repo's git files and card, which stay byte for byte,
    and loads with transformers; no staging folder is left (before: "OUT_DIR ... is not empty")."""
    from transformers import CLIPModel

    from vutrain.export import main

    out = tmp_path / "hf"
    prepare(out)
    before = _tree(out)
    assert main([run_dir, str(out)]) == 0
    after = _tree(out)
    assert {path: after[path] for path in before} == before
    assert "config.json" in after and "model.safetensors" in after and "tokenizer.json" in after
    assert not [name for name in os.listdir(out) if name.endswith(".incomplete")]
    CLIPModel.from_pretrained(out)


def test_a_hub_repo_filled_during_the_export_is_refused_and_keeps_its_files(
    run_dir, tmp_path, capsys, monkeypatch
):
    """Another export (or a user) writes a model file into the repo while this export writes its
    own: one line naming that file; the repo's files and the other file stay, none of this
    export's does. A card edited meanwhile is no model file and is not named."""
    import vutrain.export as export_module

    out = tmp_path / "hf"
    _cloned_hub_repo(out)
    real_save = export_module.save_hf_files

    def save_while_another_writes(folder, *args):
        real_save(folder, *args)
        (out / "adapter_config.json").write_text("{}\n")
        (out / "README.md").write_text(CARD + "edited\n")

    monkeypatch.setattr(export_module, "save_hf_files", save_while_another_writes)
    assert export_module.main([run_dir, str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err, err
    assert last.startswith(f"error: OUT_DIR {out} was filled during the export (adapter_config.json): ")
    assert sorted(os.listdir(out)) == [".git", ".gitattributes", "README.md", "adapter_config.json"]
    assert (out / ".gitattributes").read_text() == GITATTRIBUTES


def test_a_cloned_hub_repo_holding_a_model_is_still_refused(run_dir, tmp_path, capsys):
    """A repo that holds an earlier model's files: one `error:` line naming them (not the git files),
    nothing changed."""
    from vutrain.export import main

    out = tmp_path / "hf"
    _cloned_hub_repo(out)
    (out / "config.json").write_text("{}\n")
    before = _tree(out)
    assert main([run_dir, str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err, err
    assert last.startswith(f"error: OUT_DIR {out} is not empty (1 entries: config.json)"), last
    assert _tree(out) == before


def test_an_empty_run_dir_is_one_line_saying_so(run_dir, tmp_path, monkeypatch, capsys):
    """`vutrain-export "$RUN" OUT` with RUN unset, run from inside a run folder: that run was exported
    without a word (before). Now one line, and nothing is written."""
    from vutrain.export import main

    monkeypatch.chdir(run_dir)
    out = tmp_path / "hf"
    assert main(["", str(out)]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and last.startswith("error: RUN_DIR is empty"), err
    assert not out.exists()


def test_tag_naming_the_run_folder_is_no_such_checkpoint(run_dir, tmp_path, capsys):
    """`--tag ..` names the run folder, which holds no COMPLETE.json: it was reported as an
    interrupted save (before); now as no such checkpoint, listing the complete ones."""
    from vutrain.export import main

    out = tmp_path / "hf"
    assert main([run_dir, str(out), "--tag", ".."]) == 2
    err, last = _last_error_line(capsys)
    assert "Traceback" not in err and "no such checkpoint" in last and "interrupted" not in last, err
    assert "step_00000001" in last
    assert not out.exists()
