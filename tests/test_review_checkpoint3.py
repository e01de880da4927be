"""Checkpoint review 3: a save killed after its marker (between the marker and the rename, or between
the two renames of a step saved again) resumes from that save, not the one before; a run directory
rank 0 cannot prepare stops every rank with the same one line (real DeepSpeed engines on gloo, real
files, real gloo ranks)."""

from __future__ import annotations

import os
import shutil

import torch
from tiny_modules import TwoLayer

from helpers_dist import run_distributed


def _engine():
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    torch.manual_seed(0)
    module = TwoLayer()
    cfg = TrainConfig(max_steps=10, micro_batch_size=2, zero_stage=1, warmup_steps=2, lr=1e-2)
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, 1)
    )
    return engine


def _prepare_run_dir(shards: dict, run_dir: str) -> None:
    """The Trainer's own `_prepare_run_dir`, without building the model, data and engine first."""
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    from inprocess_trainer import overrides

    trainer = Trainer.__new__(Trainer)
    trainer.cfg = load_config("tiny", overrides(shards, run_dir, 2))
    trainer.info, trainer.run_dir, trainer.device = resolve_dist_env(), run_dir, torch.device("cpu")
    trainer._prepare_run_dir()


def _kill_after_marker(ckpt_dir: str, resaved: bool) -> None:
    """The files a SIGKILL leaves after step 2's marker: `step_00000002.tmp` complete, and for a
    step saved again (a resume over that tag) the old copy already renamed to `.replaced.tmp`."""
    final = os.path.join(ckpt_dir, "step_00000002")
    if resaved:
        os.rename(final, final + ".replaced.tmp")
        shutil.copytree(final + ".replaced.tmp", final + ".tmp")
    else:
        os.rename(final, final + ".tmp")


def _save_kill_and_resume(rank, world, shards, root):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    resumed = {}
    for resaved in (False, True):
        run_dir = os.path.join(root, f"resaved_{resaved}")
        engine = _engine()
        for step in (1, 2):
            engine.backward(engine(torch.randn(2, 8)))
            engine.step()
            ckpt.save_checkpoint(engine, run_dir, step, {"step": step, "data": {}}, rank, keep=3)
        _kill_after_marker(ckpt.checkpoints_dir(run_dir), resaved)
        _prepare_run_dir(shards, run_dir)
        target = ckpt.resolve_resume("auto", run_dir, verbose=False)
        state = ckpt.load_checkpoint(_engine(), *target, rank=rank)
        with open(os.path.join(ckpt.checkpoints_dir(run_dir), "latest"), encoding="utf-8") as fh:
            latest = fh.read()
        names = [n for n in sorted(os.listdir(ckpt.checkpoints_dir(run_dir))) if not n.endswith(".py")]
        resumed[resaved] = (target[1], state["step"], latest, names)  # DeepSpeed's scripts aside
    return resumed


def test_a_save_killed_after_its_marker_is_resumed_from(tiny_shards, tmp_path):
    """A kill after COMPLETE.json but before the rename (a new step), or between the two renames of
    a step saved again, left the complete save as `step_00000002.tmp`: train.resume=auto called it
    interrupted and went back to step 1, one checkpoint interval of training lost. The start now
    renames it into place (and points `latest` at it) and the resume loads step 2."""
    resumed = run_distributed(_save_kill_and_resume, 1, tiny_shards, str(tmp_path), timeout_s=120)[0]
    for resaved in (False, True):
        tag, step, latest, names = resumed[resaved]
        assert (tag, step, latest) == ("step_00000002", 2, "step_00000002"), (resaved, resumed)
        assert names == ["latest", "step_00000001", "step_00000002"], (resaved, names)


def _start_trainer(rank: int, world_size: int, shards: dict, run_dir: str) -> tuple[str, str]:
    """One rank of a 2-rank start: (exception type, its message), or ('', '') when it was built."""
    from vutrain.config import load_config
    from vutrain.distributed import resolve_dist_env
    from vutrain.trainer import Trainer

    from inprocess_trainer import overrides

    cfg = load_config("tiny", overrides(shards, run_dir, 2, eval__every=0))
    try:
        Trainer(cfg, resolve_dist_env())
    except Exception as exc:
        return type(exc).__name__, str(exc)
    return "", ""


def test_a_run_dir_rank_0_cannot_create_stops_every_rank_with_one_line(tiny_shards, tmp_path):
    """2 ranks, output_dir under an existing file (`runs/b32/run` where `runs/b32` is a file): rank 0
    died in os.makedirs with a NotADirectoryError traceback while rank 1 waited at the run
    directory's barrier (here a gloo error once rank 0 had left; under NCCL, until the group's
    30-minute timeout). Now every rank raises the same one-line ConfigError that names output_dir
    and what to do."""
    blocker = tmp_path / "b32"
    blocker.write_text("not a folder\n")
    run_dir = str(blocker / "run")
    outcomes = run_distributed(_start_trainer, 2, tiny_shards, run_dir, timeout_s=60)
    assert outcomes[0] == outcomes[1], outcomes
    kind, message = outcomes[0]
    assert kind == "ConfigError" and "\n" not in message, outcomes
    assert f"output_dir={run_dir}" in message and "NotADirectoryError" in message, message
    assert blocker.read_text() == "not a folder\n"
