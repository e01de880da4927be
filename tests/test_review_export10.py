"""Review 10 of the export's paths and of ZeRO-0 resumes across precisions: a `~` the shell left in
RUN_DIR / OUT_DIR is the home folder; an OUT_DIR that cannot be created or written is one line
before the consolidation; a killed export's leftover staging folder is named with the command that
removes it (a mount point cannot be removed); a crowded OUT_DIR says how many entries it holds; a
fused-fp16 (FusedAdam) ZeRO-0 checkpoint resumed under another precision is one line, not a KeyError.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from tiny_modules import TwoLayer

from helpers_dist import run_distributed
from inprocess_trainer import train_outside_test


@pytest.fixture(scope="module")
def run_dir(tiny_shards, tmp_path_factory):
    """One tiny ZeRO-0 run of one step, shared by the tests (they only read it)."""
    path = str(tmp_path_factory.mktemp("export10_home") / "run")
    train_outside_test(
        tiny_shards, path, steps=1, one_thread=True, train__zero_stage=0, eval__every=0, data__val_shards=""
    )
    return path


def _last_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_tilde_paths_are_the_home_folder(run_dir, tmp_path, monkeypatch, capsys):
    """`OUT="~/hf"; vutrain-export "~/run" "$OUT"`: the quotes keep the `~`. Before: RUN_DIR was
    "config.yaml not found" (and OUT_DIR a folder named `~` under the current one)."""
    from transformers import CLIPModel

    from vutrain.export import main

    home = os.path.dirname(run_dir)
    monkeypatch.setenv("HOME", home)
    monkeypatch.chdir(tmp_path)
    assert main(["~/run", "~/hf"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == f"exported to {home}/hf"
    assert not os.path.exists(tmp_path / "~")
    CLIPModel.from_pretrained(os.path.join(home, "hf"))


@pytest.mark.parametrize(
    "make_out_dir, said",
    [
        (lambda tmp: (tmp / "notes.txt").write_text("x") and tmp / "notes.txt" / "hf", "is not a folder"),
        (lambda tmp: "/proc/vutrain-export10/hf", "no folder can be created in /proc"),
    ],
    ids=["parent_is_a_file", "proc"],
)
def test_unwritable_out_dir_is_refused_before_the_run_is_read(tmp_path, capsys, make_out_dir, said):
    """A parent path through a file, or a file system taking no new folders (what root meets, as a
    read-only volume does): found by the final mkdir after the whole consolidation, as "[Errno 17]
    File exists" (before). Now one line naming OUT_DIR, before RUN_DIR is even read (here it does
    not exist: its error would come first if the run were read first)."""
    from vutrain.export import main

    out = str(make_out_dir(tmp_path))
    assert main([str(tmp_path / "no_such_run"), out]) == 2
    last = _last_error_line(capsys)
    assert last.startswith(f"error: OUT_DIR {out} cannot be "), last
    assert said in last and "config.yaml" not in last, last


def test_a_killed_exports_leftover_is_named_with_the_command_that_removes_it(run_dir, tmp_path, capsys):
    """An export killed while filling an existing OUT_DIR (a mount point) leaves its staging folder
    there. Before: "remove the folder", which a mount point cannot be. Now the line gives the
    `rm -rf` of the leftover itself; done as told, the export fills the folder."""
    from vutrain.export import main

    out = tmp_path / "volume"
    leftover = out / ".export.4242.incomplete"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"partial")
    assert main([run_dir, str(out)]) == 2
    last = _last_error_line(capsys)
    assert f"rm -rf {leftover}" in last and "remove the folder" not in last, last
    command = "rm -rf " + last.split("rm -rf ", 1)[1].split(")", 1)[0]
    subprocess.run(["sh", "-c", command], check=True, timeout=60)  # as the line says
    assert main([run_dir, str(out)]) == 0
    assert "config.json" in os.listdir(out)


def test_a_crowded_out_dir_says_how_many_more_and_to_remove_them(run_dir, tmp_path, capsys):
    """Seven stale files: the line names five, says two more (before: "..."), and says that removing
    those entries will do (a mount point); nothing is changed."""
    from vutrain.export import main

    out = tmp_path / "volume"
    out.mkdir()
    names = [f"pytorch_model-{i}.bin" for i in range(7)]
    for name in names:
        (out / name).write_text("old")
    assert main([run_dir, str(out)]) == 2
    last = _last_error_line(capsys)
    assert "7 entries: " + ", ".join(names[:5]) + ", ... (2 more)" in last, last
    assert "remove those entries" in last and "remove the folder or give a new one" in last, last
    assert sorted(os.listdir(out)) == names


def _fused_fp16_layout(engine, saved: dict) -> dict:
    """The model-states file an fp16 ZeRO-0 run with a ds_config Adam (FusedAdam, GPU only) writes,
    from this fp32 run's: FP16_Optimizer.state_dict()'s keys (deepspeed/runtime/fp16/
    fused_optimizer.py), one flat fp32 master and one flat parameter's moments per group."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in engine.optimizer.param_groups]
    torch_state = saved["optimizer"]
    state, param_groups, flat, index = {}, [], [], 0
    for i, (group, settings) in enumerate(zip(groups, torch_state["param_groups"], strict=True)):
        moments = [torch_state["state"][index + j] for j in range(len(group))]
        index += len(group)
        state[i] = {"step": int(moments[0]["step"])}
        for key in ("exp_avg", "exp_avg_sq"):
            state[i][key] = torch.cat([m[key].flatten() for m in moments])
        flat.append(torch.cat([saved["module"][name].float().flatten() for name in group]))
        param_groups.append({**settings, "params": [i], "step": state[i]["step"]})
    optimizer = dict(dynamic_loss_scale=True, cur_scale=65536.0, cur_iter=1, last_overflow_iter=-1)
    optimizer.update(scale_factor=2.0, scale_window=1000, clip_grad=1.0, fp32_groups_flat=flat)
    optimizer["optimizer_state_dict"] = {"state": state, "param_groups": param_groups}
    module = {name: value.half() for name, value in saved["module"].items()}
    return {**saved, "module": module, "optimizer": optimizer}


def _resume_fused_checkpoint(rank, world, base):
    """Save a real fp32 ZeRO-0 checkpoint, rewrite its optimizer to the fused layout, and resume it
    into fp32 and bf16 engines; each outcome's error line (or what else happened)."""
    import deepspeed

    from vutrain import checkpoint as ckpt
    from vutrain.checkpoint_precision import MODEL_FILE, load_zero0
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    deepspeed.init_distributed("gloo")

    def engine(precision):
        torch.manual_seed(0)
        cfg = TrainConfig(max_steps=10, micro_batch_size=2, zero_stage=0, warmup_steps=2, precision=precision)
        return build_engine(TwoLayer(), cfg, world, torch.device("cpu"))

    saved_engine = engine("fp32")
    saved_engine.backward(saved_engine(torch.randn(2, 8)))
    saved_engine.step()
    ckpt.save_checkpoint(saved_engine, base, 1, {"step": 1, "data": {}}, rank, keep=1)
    ckpt_dir, tag = ckpt.checkpoints_dir(base), ckpt.list_tags(ckpt.checkpoints_dir(base))[-1]
    path = os.path.join(ckpt_dir, tag, MODEL_FILE)
    saved = torch.load(path, map_location="cpu", weights_only=False)
    torch.save(_fused_fp16_layout(saved_engine, saved), path)
    outcomes = {}
    for precision in ("fp32", "bf16"):
        try:
            load_zero0(engine(precision), ckpt_dir, tag)
            outcomes[precision] = "loaded"
        except Exception as exc:
            outcomes[precision] = f"{type(exc).__name__}: {exc}"
    return outcomes


def test_a_fused_fp16_zero0_checkpoint_under_another_precision_is_one_line(tmp_path):
    """Before: "KeyError: 'param_groups'" from the torch optimizer's load, after the whole start-up
    (the flat fused state read as per-parameter state). Now the ResumeShapeError's one line saying
    which optimizer wrote it and what to resume with."""
    outcomes = run_distributed(_resume_fused_checkpoint, 1, str(tmp_path), init_process_group=False)[0]
    for precision, outcome in outcomes.items():
        assert outcome.startswith("ResumeShapeError: "), (precision, outcome)
        assert "fused fp16 optimizer" in outcome and "it was written" in outcome, outcome
        assert "resume with the train.precision and train.ds_config that wrote it" in outcome
        assert "\n" not in outcome
