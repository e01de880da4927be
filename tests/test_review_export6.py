"""Review of two user-facing inaccuracies.

The training benchmark's table printed "grad ckpt" as `false` but "compile" as `False` (its JSON
rows held grad_ckpt as the text "false" beside compile's bool), and its "peak mem GiB" column did
not say it is the process's peak RSS on a CPU and the allocator's peak on a GPU.

`python -m vutrain.export RUN OUT --tag TAG` for a tag with no folder said its COMPLETE.json was
missing "(save interrupted...)", sending the user after a save that never happened.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import pytest

from inprocess_trainer import train

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def sweep_args(**extra) -> argparse.Namespace:
    """The defaults of `python -m vutrain.bench` with ``extra`` set (sweep_specs' input)."""
    values = dict(
        preset="tiny", precision="fp32", zero_stage=2, grad_ckpt="both", steps=1, warmup=0, workers=0,
        loss_backend="torch", compile=False, compile_backend="inductor", compile_mode="default",
        hidden_act="",
    )  # fmt: skip
    values.update(extra)
    return argparse.Namespace(**values)


def test_bench_sweep_specs_hold_grad_ckpt_as_a_bool_like_compile(tmp_path):
    from vutrain import bench

    specs = bench.sweep_specs(sweep_args(), [4], "shards.tar", str(tmp_path))
    assert [s["grad_ckpt"] for s in specs] == [False, True]
    assert all(isinstance(s["compile"], bool) for s in specs)
    # The overrides still reach the config as its own text, bools or the text profile_step gives.
    for spec, expected in zip(specs, ("false", "true")):
        assert f"model.gradient_checkpointing={expected}" in bench.spec_overrides(spec)
    assert "model.gradient_checkpointing=false" in bench.spec_overrides(dict(specs[1], grad_ckpt="false"))


@pytest.mark.parametrize("compile_", [False, True])
def test_bench_table_writes_grad_ckpt_and_compile_alike(tmp_path, compile_):
    from vutrain import bench

    (spec,) = bench.sweep_specs(sweep_args(grad_ckpt="off", compile=compile_), [4], "s.tar", str(tmp_path))
    cells = [c.strip() for c in bench.table([dict(spec, error="ValueError: x")]).splitlines()[-1].split("|")]
    assert cells[5:7] == ["false", str(compile_).lower()], cells


def test_bench_table_header_says_which_peak_memory():
    from vutrain import bench

    measured = dict(
        preset="tiny", precision="fp32", zero_stage=2, batch_size=4, grad_ckpt=False, compile=False,
        samples_per_s=1.0, wall_samples_per_s=1.0, step_time_s=1.0,
        **{f"{p}_s": 0.1 for p in bench.PHASES},
    )  # fmt: skip
    head = bench.table([dict(measured, peak_rss_gib=0.5)]).splitlines()[0]
    assert head.endswith("| peak mem GiB (process RSS) |"), head
    head = bench.table([dict(measured, peak_memory_gib=0.5)]).splitlines()[0]
    assert head.endswith("| peak mem GiB (GPU allocated) |"), head


@pytest.mark.slow
def test_bench_cli_rows_say_booleans_and_the_peak_memory_kind(tmp_path):
    """The README's command, for real: one configuration on the CPU (about 25 s)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "vutrain.bench", "--batch-sizes", "4", "--steps", "1", "--warmup", "0"]
    cmd += ["--workers", "0", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["grad_ckpt"] is False and row["compile"] is False, row
    assert row["peak_mem_kind"] == "process RSS" and row["peak_rss_gib"] > 0, row
    lines = proc.stdout.splitlines()
    head = next(line for line in lines if line.startswith("| preset |"))
    assert "| peak mem GiB (process RSS) |" in head, head
    last = next(line for line in reversed(lines) if line.startswith("| tiny |"))
    assert [c.strip() for c in last.split("|")][5:7] == ["false", "false"], last


def test_export_of_a_tag_with_no_folder_says_no_such_checkpoint(
    tiny_shards, tmp_path, single_process, capsys
):
    from vutrain.export import main

    run_dir = tmp_path / "run"
    train(tiny_shards, str(run_dir), steps=1, eval__every=0, data__val_shards="")
    assert (run_dir / "checkpoints" / "step_00000001" / "COMPLETE.json").is_file()
    out = tmp_path / "hf"

    assert main([str(run_dir), str(out), "--tag", "step_00000100"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    said = "error: --tag step_00000100 cannot be exported: step_00000100/COMPLETE.json and its folder"
    said += " do not exist"
    assert err.startswith(said + ": no such checkpoint in "), err
    assert "interrupted" not in err and err.endswith("complete checkpoints there: step_00000001"), err

    # A folder without its marker is still an interrupted save, said so.
    (run_dir / "checkpoints" / "step_00000002").mkdir()
    assert main([str(run_dir), str(out), "--tag", "step_00000002"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step_00000002/COMPLETE.json is missing (save interrupted" in err, err
    assert "complete checkpoints in" in err and err.endswith("step_00000001"), err
    assert not out.exists()
