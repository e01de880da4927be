"""In-process smoke tests of the trainer (as open_clip's tests/test_training_simple.py).

A world-1 process group in this test process, the tiny preset, real DeepSpeed engines, real JPEG
shards, a few steps: what the launcher tests cover in subprocesses (60-100 s each), here in seconds,
so `make test-fast` covers the training loop, eval, checkpoints, resume and the entry point.
Whether the model learns is checked by `.ci/run` (`python -m vutrain.demo` with a bar), not here.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest

from vutrain.config import load_config
from vutrain.metrics import read_metrics

from inprocess_trainer import overrides, train

REQUIRED_TRAIN = {"train/loss", "train/lr", "train/samples_per_s"}
REQUIRED_EVAL = {"eval/i2t_r1", "eval/t2i_r1", "eval/i2t_r5", "eval/t2i_r5", "eval/zeroshot_top1"}


def test_shipped_configs_are_found_by_name_from_any_directory(tiny_shards, tmp_path, monkeypatch):
    from vutrain.config import ConfigError, shipped_configs

    monkeypatch.chdir(tmp_path)
    assert {"tiny", "vit-b-32", "vit-b-32-lora"} <= set(shipped_configs())
    data = [
        f"data.train_shards={tiny_shards['train_shards']}",
        f"data.val_shards={tiny_shards['val_shards']}",
    ]
    for name in shipped_configs():
        assert load_config(name, data).output_dir
    assert load_config("tiny.yaml", data).model.preset == "tiny"
    with pytest.raises(ConfigError, match="vit-b-32-lora"):  # the message lists what exists
        load_config("tinny")
    with pytest.raises(ConfigError, match="not found: ./tiny"):  # a path is a path, not a name
        load_config("./tiny")


def test_trains_evaluates_checkpoints_and_resumes(tiny_shards, tmp_path, single_process):
    run_dir = str(tmp_path / "run")
    last_eval = train(tiny_shards, run_dir, steps=4)
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    assert all(REQUIRED_TRAIN <= r.keys() for r in train_rows)
    assert all(r["train/loss"] == r["train/loss"] and r["train/loss"] > 0 for r in train_rows)  # finite
    # Each row's LR is the one its step used (schedule index s - 1 at step s), not the next step's.
    from vutrain.optim import lr_lambda

    cfg = load_config("tiny", overrides(tiny_shards, run_dir, 4))
    assert [r["train/lr"] for r in train_rows] == pytest.approx(
        [cfg.train.lr * lr_lambda(s, cfg.train) for s in range(4)]
    )
    evals = [r for r in rows if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert REQUIRED_EVAL <= evals[-1].keys() and REQUIRED_EVAL <= last_eval.keys()
    assert evals[-1]["eval/num_samples"] == 48  # every held-out sample scored once
    # Multi-label retrieval over the validation tags (the synthetic data tags colour, shape, fillers).
    assert evals[-1]["eval/tags_vocab"] > 1
    assert 0 < evals[-1]["eval/tags_map"] <= 1 and 0 < evals[-1]["eval/tags_r5"] <= 1
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step_00000004"))
    assert json.load(open(os.path.join(run_dir, "done.json")))["step"] == 4
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))

    # Resume: the same run directory and a higher max_steps continue at step 5, each step logged once.
    train(tiny_shards, run_dir, steps=6)
    steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.load(open(os.path.join(run_dir, "done.json")))["step"] == 6


def test_train_main_in_process(tiny_shards, tmp_path, single_process, capsys, monkeypatch):
    """`vutrain/train.py` main() itself: the entry point a launcher starts, here in this process.

    From another directory, with the shipped run file given by name (`--config tiny`).
    """
    from vutrain.train import main

    run_dir = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    children = set(multiprocessing.active_children())
    assert (
        main(
            [
                "--config",
                "tiny",
                # one loader worker: the test is that it ends with the run
                *overrides(tiny_shards, run_dir, 2, train__zero_stage=3, eval__every=0, data__num_workers=1),
            ]
        )
        == 0
    )
    # The process goes on after the run: the run's loader workers have ended, and its signal
    # handlers are gone (left installed, SIGTERM no longer ended the process, and they held the
    # Trainer, so its workers lived until the process exited).
    assert set(multiprocessing.active_children()) <= children
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == [1, 2]
    assert json.load(open(os.path.join(run_dir, "done.json")))["step"] == 2
    # A bad key fails before any process group starts, with exit code 2 and the valid keys named.
    assert main(["--config", "tiny", "train.max_stepz=3"]) == 2
    assert "train.max_steps" in capsys.readouterr().err


@pytest.mark.parametrize("stage, lora", [(2, "false"), (3, "true")])
def test_amp_bf16_keeps_fp32_weights_and_runs_the_forward_under_autocast(
    stage, lora, tiny_shards, tmp_path, single_process
):
    """train.precision=amp_bf16 (open_clip's): fp32 weights and gradients, matmuls in bf16 under
    DeepSpeed's torch_autocast, in training and in eval; bf16 (DeepSpeed's) casts the weights."""
    import torch

    from vutrain.ds_config import build_ds_config

    extra = dict(train__zero_stage=stage, model__lora__enabled=lora)
    for precision, autocast in (("amp_bf16", True), ("bf16", False)):
        cfg = load_config("tiny", overrides(tiny_shards, "unused", 2, train__precision=precision, **extra))
        ds = build_ds_config(cfg.train, world_size=1)
        assert ds["bf16"]["enabled"] == (not autocast)
        assert ds.get("torch_autocast") == ({"enabled": True, "dtype": "bfloat16"} if autocast else None)

    seen, modules = [], []

    def hook(trainer):
        modules.append(trainer.engine.module)
        linear = next(m for m in modules[0].modules() if isinstance(m, torch.nn.Linear))
        linear.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))

    run_dir = str(tmp_path / "run")
    last_eval = train(tiny_shards, run_dir, 2, on_trainer=hook, train__precision="amp_bf16", **extra)
    module = modules[0]
    assert {dtype for _, dtype in seen} == {torch.bfloat16}
    assert {grad for grad, _ in seen} == {True, False}  # training forwards and eval forwards
    assert all(p.dtype == torch.float32 for p in module.parameters())
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2] and all(0 < r["train/loss"] < 100 for r in rows)
    assert 0 <= last_eval["eval/zeroshot_top1"] <= 1


def test_a_cpu_run_on_a_gpu_machine_pins_no_batches(tiny_shards, tmp_path, single_process, monkeypatch):
    """Pinning follows the run's device: a CPU run where CUDA is available (VUTRAIN_DEVICE=cpu)
    must not open a CUDA context per rank to pin batches no GPU reads."""
    import torch

    class Built(Exception):
        pass

    pinned = []

    def hook(trainer):
        pinned.append(trainer.stream.pin_memory)
        raise Built  # the question is answered once the stream exists: no need to train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(Built):
        train(tiny_shards, str(tmp_path / "run"), 1, on_trainer=hook)
    assert pinned == [False]
