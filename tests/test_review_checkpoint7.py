"""Review of checkpoints and resume, part 7 (real DeepSpeed engines on gloo ranks, real files).

- A marker without ``world_size`` (hand-made, an older vutrain) on another world size resumes
  through the reshaped loader, with every old rank's data position.
- A kill between the two renames of a universal re-conversion is finished at the next resume of
  the tag: the whole new copy moves into place and ``universal.old`` goes.
- A resume on the same world and micro batch with another ``train.grad_accum_steps`` warns that
  the global batch changes.
- The refusal of a changed global batch names ``train.global_batch_size=<saved>``, the one value
  that works where it is set.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from tiny_modules import TwoLayer

from helpers_dist import run_distributed

pytestmark = pytest.mark.slow


def _engine(stage: int, accum: int):
    """A ZeRO ``stage`` engine with micro batch 2 and ``accum`` accumulation steps."""
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    torch.manual_seed(0)
    module = TwoLayer()
    cfg = TrainConfig(
        max_steps=10, micro_batch_size=2, grad_accum_steps=accum, zero_stage=stage, warmup_steps=2, lr=1e-2
    )
    optimizer, scheduler = build_optimizer(module, cfg)
    world = torch.distributed.get_world_size()
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, world)
    )
    return engine


def _train_and_save(rank, world, run_dir, accum):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    engine = _engine(1, accum)
    torch.manual_seed(10 + rank)
    for _ in range(2 * accum):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {"rank": rank}}, rank, keep=1)


def _tag(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints", "step_00000002")


def _load(rank, world, run_dir, accum):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    return ckpt.load_checkpoint(_engine(1, accum), *ckpt.resolve_resume("auto", run_dir), rank=rank)


def test_a_marker_without_world_size_still_resumes_reshaped(tmp_path):
    """Before, load_checkpoint took a marker without world_size as written by this world: a 2-rank
    tag resumed on 1 rank went to DeepSpeed's plain loader with rank 0's data position only
    (rank 1's samples of the epoch were lost). Now world.json tells the saved world size."""
    run = str(tmp_path / "run")
    run_distributed(_train_and_save, 2, run, 1, init_process_group=False)
    marker_path = os.path.join(_tag(run), "COMPLETE.json")
    with open(marker_path, encoding="utf-8") as fh:
        marker = json.load(fh)
    del marker["world_size"]
    with open(marker_path, "w", encoding="utf-8") as fh:
        json.dump(marker, fh)
    state = run_distributed(_load, 1, run, 2, init_process_group=False)[0]
    assert state["step"] == 2
    assert state["data"] == {"ranks": [{"rank": 0}, {"rank": 1}]}


def _interrupted_replace_then_resume(rank, world, run_dir):
    """The tag converted, then left as a kill between _replace_dir's renames leaves it; resumed
    with another train.grad_accum_steps. Returns (entries of the tag, files of universal/ before
    and after, warnings logged)."""
    from vutrain.checkpoint_reshape import _universal_problem, main

    _train_and_save(rank, world, run_dir, 1)
    tag = _tag(run_dir)
    assert main([tag]) == 0
    universal = os.path.join(tag, "universal")
    shutil.copytree(universal, universal + ".old")
    os.replace(universal, universal + ".tmp")
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("vutrain").addHandler(handler)
    from vutrain import checkpoint as ckpt

    state = ckpt.load_checkpoint(_engine(1, 2), *ckpt.resolve_resume("auto", run_dir), rank=rank)
    return sorted(os.listdir(tag)), _universal_problem(universal), warnings, state


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("interrupted") / "run")
    return run_distributed(_interrupted_replace_then_resume, 1, run, init_process_group=False)[0]


def test_a_kill_between_the_renames_of_a_reconversion_is_finished_at_the_next_resume(interrupted):
    """Before, universal.old (a full copy of the fp32 weights and moments) stayed on disk until the
    next conversion of the tag, and the whole new copy sat unused in universal.tmp."""
    entries, problem, _, state = interrupted
    assert "universal.old" not in entries and "universal.tmp" not in entries
    assert "universal" in entries and problem is None
    assert state["step"] == 2 and state["data"] == {"rank": 0}


def test_another_grad_accum_steps_on_the_same_world_warns_of_the_new_global_batch(interrupted):
    """Before, train.grad_accum_steps 1 -> 2 on the same world and micro batch doubled the global
    batch without a word, while every other change of it on resume is refused."""
    warnings = interrupted[2]
    changed = [w for w in warnings if "changes the global batch" in w]
    assert len(changed) == 1, warnings
    assert "train.grad_accum_steps 1 -> 2 changes the global batch 2 -> 4" in changed[0]
    assert "set train.grad_accum_steps=1" in changed[0]


def test_the_refused_global_batch_names_the_global_batch_size_that_keeps_it():
    """Before, with train.global_batch_size set, the hint offered train.grad_accum_steps=N (refused
    beside it) or train.micro_batch_size=M (which still derives the new batch). The value named
    now gives the saved batch on the new world size."""
    import dataclasses

    from vutrain.checkpoint_reshape import ResumeShapeError, check_global_batch
    from vutrain.config import RunConfig
    from vutrain.global_batch import with_global_batch

    saved = {"micro_batch_size": 4, "grad_accum_steps": 2, "world_size": 2}  # global batch 16
    with pytest.raises(ResumeShapeError) as err:
        check_global_batch(saved, micro=4, accum=4, world=4)  # train.global_batch_size=64 on 4 ranks
    message = str(err.value)
    assert "\n" not in message
    assert "train.global_batch_size=16" in message
    assert "train.resume=never" in message
    cfg = RunConfig()
    train = dataclasses.replace(cfg.train, micro_batch_size=4, global_batch_size=16)
    cfg = dataclasses.replace(cfg, train=train)
    derived = with_global_batch(cfg, 4).train
    check_global_batch(saved, derived.micro_batch_size, derived.grad_accum_steps, 4)  # keeps 16
