"""Checkpoints review 10: ZeRO-3 with an empty parameter; fp32 <-> fp16 and train.grad_clip on resume.

Real DeepSpeed engines on CPU gloo ranks and real checkpoints. This CPU has no fp16 kernels, so
DeepSpeed refuses to build an fp16 engine here; the fp16 engines below are built after telling
DeepSpeed's CPU accelerator that fp16 is supported (they are built, saved and loaded, never stepped).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers_dist import run_distributed


class _WithEmpty(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return self.a(x).pow(2).mean() + self.empty.sum()


class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 5)

    def forward(self, x):
        return self.a(x).pow(2).mean()


def _cfg(stage: int, precision: str = "fp32", grad_clip: float = 1.0):
    from vutrain.config import TrainConfig

    return TrainConfig(
        max_steps=10, micro_batch_size=2, zero_stage=stage, warmup_steps=2, lr=1e-2,
        precision=precision, grad_clip=grad_clip,
    )  # fmt: skip


def _build(stage: int, precision: str = "fp32", grad_clip: float = 1.0):
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    return build_engine(_Small(), _cfg(stage, precision, grad_clip), 2, torch.device("cpu"))


def _allow_fp16_on_cpu():
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True


def _empty_parameter_at_zero3(rank, world):
    import deepspeed

    from vutrain.config import ConfigError
    from vutrain.engine import build_engine

    deepspeed.init_distributed("gloo")
    try:
        engine = build_engine(_WithEmpty(), _cfg(3), world, torch.device("cpu"))
        engine.backward(engine(torch.randn(2, 4)))
        engine.step()
    except ConfigError as exc:
        return f"ConfigError: {exc}"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return "trained"


@pytest.mark.slow
def test_zero3_refuses_an_empty_parameter_in_one_line_naming_it():
    """Before, the first forward failed inside DeepSpeed with "AssertionError: {'id': 0, 'status':
    'NOT_AVAILABLE', ...}" (nothing named the parameter or what to do)."""
    for got in run_distributed(_empty_parameter_at_zero3, 2, init_process_group=False, timeout_s=120):
        assert got.startswith("ConfigError: parameter empty has no elements"), got
        assert "train.zero_stage 0, 1 or 2" in got and "\n" not in got


SWITCHES = [
    (stage, saved, resumed) for stage in (1, 3) for saved, resumed in (("fp32", "fp16"), ("fp16", "fp32"))
]


def _switch_precision(rank, world, run_dir):
    """Each switch of SWITCHES: (loss scaler of the fresh engine, after the load), and the
    clip_grad of a ZeRO-1 fp32 run resumed with train.grad_clip=0.25 from one saved with 1.0."""
    import os

    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    _allow_fp16_on_cpu()
    scalers = []
    for stage, saved, resumed in SWITCHES:
        case_dir = os.path.join(run_dir, f"z{stage}_{saved}")
        ckpt.save_checkpoint(_build(stage, saved), case_dir, 2, {"step": 2, "data": {}}, rank, keep=1)
        engine = _build(stage, resumed)
        fresh = engine.optimizer.loss_scaler
        fresh = (type(fresh).__name__, fresh.dynamic, float(fresh.cur_scale))
        ckpt.load_checkpoint(engine, ckpt.checkpoints_dir(case_dir), ckpt.tag_for(2), rank)
        loaded = engine.optimizer.loss_scaler
        loaded = (type(loaded).__name__, loaded.dynamic, float(loaded.cur_scale))
        scalers.append((fresh, loaded, engine.optimizer.dynamic_loss_scale))
    case_dir = os.path.join(run_dir, "clip")
    engine = _build(1, grad_clip=1.0)
    engine.backward(engine(torch.randn(2, 7)))
    engine.step()
    ckpt.save_checkpoint(engine, case_dir, 1, {"step": 1, "data": {}}, rank, keep=1)
    engine = _build(1, grad_clip=0.25)
    ckpt.load_checkpoint(engine, ckpt.checkpoints_dir(case_dir), ckpt.tag_for(1), rank)
    clip_grad = engine.optimizer.clip_grad
    stages = []
    for saved, resumed in ((1, 3), (3, 1), (0, 1)):  # tags of an older vutrain: no world.json
        case_dir = os.path.join(run_dir, f"stage{saved}")
        ckpt.save_checkpoint(_build(saved), case_dir, 2, {"step": 2, "data": {}}, rank, keep=1)
        tag_dir = os.path.join(ckpt.checkpoints_dir(case_dir), ckpt.tag_for(2))
        torch.distributed.barrier()
        if rank == 0:
            _forget_world_json(tag_dir)
        torch.distributed.barrier()
        try:
            ckpt.load_checkpoint(_build(resumed), ckpt.checkpoints_dir(case_dir), ckpt.tag_for(2), rank)
            stages.append("loaded")
        except Exception as exc:
            stages.append(f"{type(exc).__name__}: {exc}")
    return {"scalers": scalers, "clip_grad": clip_grad, "stages": stages}


def _forget_world_json(tag_dir: str) -> None:
    """Make the tag one of a vutrain from before world.json: the file gone, its marker without it."""
    import json
    import os

    os.remove(os.path.join(tag_dir, "world.json"))
    with open(os.path.join(tag_dir, "COMPLETE.json"), encoding="utf-8") as fh:
        marker = json.load(fh)
    del marker["files"]["world.json"]
    with open(os.path.join(tag_dir, "COMPLETE.json"), "w", encoding="utf-8") as fh:
        json.dump(marker, fh)


@pytest.fixture(scope="module")
def switched(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("switch"))
    return run_distributed(_switch_precision, 2, run_dir, init_process_group=False, timeout_s=180)


@pytest.mark.slow
@pytest.mark.parametrize("case", range(len(SWITCHES)), ids=[f"zero{s}-{a}-to-{b}" for s, a, b in SWITCHES])
def test_a_precision_switch_between_fp32_and_fp16_keeps_this_runs_loss_scaler(switched, case):
    """Before, fp32 -> fp16 resumed with fp32's static scale of 1 (fp16 gradients underflow) and
    fp16 -> fp32 with fp16's dynamic scale of 2**16 in fp32 (DeepSpeed asserts that never happens)."""
    want_dynamic = SWITCHES[case][2] == "fp16"
    for got in switched:
        fresh, loaded, flag = got["scalers"][case]
        assert fresh[1:] == (want_dynamic, 2.0**16 if want_dynamic else 1.0)
        assert loaded == fresh
        assert flag is want_dynamic


@pytest.mark.slow
def test_a_resume_clips_with_this_runs_grad_clip(switched):
    """Before, ZeRO-1/2 took the saved train.grad_clip back from the checkpoint (1.0 here) although
    this run's config said 0.25."""
    assert [got["clip_grad"] for got in switched] == [0.25, 0.25]


@pytest.mark.slow
def test_a_tag_without_world_json_on_another_stage_is_one_line_naming_the_stage(switched):
    """Before: "DeepSpeed could not load ...: AssertionError: ; point train.resume at an older
    checkpoint" (ZeRO-1 <-> 3) or a FileNotFoundError of an optimizer file (ZeRO-0 -> 1)."""
    for got in switched:
        for message, want in zip(got["stages"], ("1 or 2", "3", "0"), strict=True):
            assert message.startswith("ResumeShapeError: "), message
            assert f"written with ZeRO stage {want} " in message and "\n" not in message
            assert message.endswith(f"resume with train.zero_stage={want}"), message
