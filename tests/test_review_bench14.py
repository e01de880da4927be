"""Review 14 of the benchmarks: the cores a figure names, arguments refused up front, table cells
that keep their columns, and the one line a missing or too old dependency gets.

Real components: `vutrain.bench.device_name` and `tools/profile_step.py`'s own `main` (its real
Trainer, one rank, gloo) in this process pinned to one CPU, as taskset or SLURM pin a run; the real
argument parser of the comparison; the real kernel-benchmark table; the installed open_clip's
modules and model config files; `dataset_tools.bench.main` with img2dataset made unimportable the
way an environment without it is (its name resolves to nothing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest
import torch
from test_kernels_bench import _good_rows
from test_review_bench12 import _with_error
from test_review_bench13 import one_cpu  # noqa: F401  (a fixture)
from usage_lines import usage_error_line

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_cpu_of_the_machine() -> str:
    cpus = os.cpu_count()
    return "CPU (1 cores, " if cpus == 1 else f"CPU (1 of {cpus} cores usable, "


def test_train_bench_names_the_cores_the_run_could_use(one_cpu):  # noqa: F811
    """The row's device named the machine's cores (os.cpu_count()): a figure measured on the 8 CPUs
    a SLURM task was given read as one of the whole 128-core node."""
    from vutrain.bench import device_name

    assert device_name(torch.device("cpu")).startswith(_one_cpu_of_the_machine())


def test_profile_step_names_the_cores_the_run_could_use(single_process, monkeypatch, capsys, one_cpu):  # noqa: F811
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import profile_step

    monkeypatch.setenv("VUTRAIN_DEVICE", "cpu")
    argv = ["--warmup", "0", "--steps", "1", "--batch-size", "4", "--workers", "0"]
    assert profile_step.main(argv) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["device"].startswith(_one_cpu_of_the_machine()), record["device"]


def test_compare_refuses_a_zero_stage_deepspeed_lacks_in_one_line(capsys):
    """--zero-stages 4 ran the whole comparison, open_clip's import and shards included, and
    recorded a failed row per configuration of that stage."""
    from vutrain.bench_compare import parse_args

    line = usage_error_line(capsys, lambda: parse_args(["--compare", "open_clip", "--zero-stages", "1,4"]))
    assert "--zero-stages 1,4: 4 is above 3" in line


def test_a_kernel_bench_error_with_a_pipe_or_newline_keeps_the_table_columns():
    from kernels.bench import markdown_table

    measured = [dict(r, ms_p20=r["ms"], ms_p80=r["ms"]) for r in _good_rows()]  # as measure() gives
    error = "CompilationError: at 3:4\n  x = a | b\n      ^"
    table = markdown_table(_with_error(measured, "ours", error))
    lines = table.splitlines()
    assert len(lines) == 2 + len(measured)  # no row split by the newline
    columns = {line.replace("\\|", "").count("|") for line in lines}
    assert columns == {10}, table  # every row has the header's nine cells
    assert "a \\| b" in table


def _open_clip():
    from vutrain.bench_openclip import load_open_clip

    try:
        return load_open_clip()
    except ImportError as exc:
        pytest.fail(f"open_clip_torch is a test dependency (make test installs it): {exc}")


def test_open_clip_config_whose_embed_dim_differs_from_the_preset_is_refused(tmp_path):
    """Every tower shape was checked against the built-in config but embed_dim, which the config
    kept from open_clip's file: a preset projecting to another size was compared with a different
    open_clip model, silently."""
    from vutrain.bench_openclip import model_config

    modules = _open_clip()
    configs = tmp_path / "open_clip" / "model_configs"
    configs.mkdir(parents=True)
    with open(os.path.join(modules.package_dir, "model_configs", "ViT-B-32.json"), encoding="utf-8") as fh:
        builtin = json.load(fh)
    assert model_config("vit-b-32", 224, 1000, 32, modules)["embed_dim"] == builtin["embed_dim"]
    (configs / "ViT-B-32.json").write_text(json.dumps(dict(builtin, embed_dim=2 * builtin["embed_dim"])))
    elsewhere = dataclasses.replace(modules, package_dir=str(tmp_path / "open_clip"))
    with pytest.raises(ValueError, match=r"ViT-B-32 embed_dim=\d+ differs from the vutrain preset's"):
        model_config("vit-b-32", 224, 1000, 32, elsewhere)


@pytest.fixture
def no_open_clip_train(monkeypatch):
    """An open_clip_torch that installs no open_clip_train (older releases)."""
    _open_clip()  # its modules loaded while the training package still imports
    monkeypatch.setitem(sys.modules, "open_clip_train", None)
    monkeypatch.setitem(sys.modules, "open_clip_train.scheduler", None)


def test_open_clip_without_its_training_package_says_what_to_install(no_open_clip_train):
    """It was a bare "No module named 'open_clip_train'"."""
    import importlib.metadata

    from vutrain.bench_openclip import load_open_clip

    with pytest.raises(ImportError) as refused:
        load_open_clip()
    message = str(refused.value)
    version = importlib.metadata.version("open_clip_torch")
    assert f"open_clip_torch {version} installs no open_clip_train" in message
    assert "open_clip_torch>=3.0" in message and "-c .venv/torch-constraint.txt --no-deps" in message


def test_compare_with_an_open_clip_too_old_is_one_line_before_any_shard(
    no_open_clip_train, tmp_path, monkeypatch, capsys
):
    from vutrain.bench_compare import main

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # TMPDIR is read again
    out = tmp_path / "out" / "compare.json"
    assert main(["--compare", "open_clip", "--preset", "tiny", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "installs no open_clip_train" in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("vutrain-compare-")]


def test_dataset_tools_bench_without_img2dataset_is_one_line(monkeypatch, capsys):
    """It was a ModuleNotFoundError traceback, after the fake host had rendered every thumbnail."""
    import dataset_tools.bench as bench

    monkeypatch.setitem(sys.modules, "img2dataset", None)
    with pytest.raises(SystemExit) as stop:
        bench.main(["-n", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "img2dataset is not installed" in err[0] and "pip install" in err[0], err


def test_dataset_tools_bench_refuses_an_out_folder_it_cannot_make_before_downloading(tmp_path, capsys):
    """--out was opened only after both sides had downloaded everything: a folder that did not
    exist, or could not, ended the run in a traceback (the figures only on stdout)."""
    import dataset_tools.bench as bench

    blocker = tmp_path / "a file"
    blocker.write_text("")
    out = blocker / "r.json"
    line = usage_error_line(capsys, lambda: bench.main(["-n", "2", "--out", str(out)]))
    assert f"--out {out}: its folder cannot be created" in line
