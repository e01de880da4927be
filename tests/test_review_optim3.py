"""The optimizer step's gradient handling with real DeepSpeed engines (`vutrain.engine.build_engine`)
on CPU ranks (gloo).

- The global gradient norm DeepSpeed clips with is the norm of the gradient of the mean loss over
  the whole global batch (every rank, every accumulation micro-step), at ZeRO-0/1/2/3 on 2 ranks,
  as a single fp64 process computes it; the gradient AdamW then sees has norm
  min(norm, max_norm) (clipped once).
- bf16 at ZeRO-1/2 with clipping off (`train.grad_clip=0`): a gradient that is NaN under a finite
  loss makes a zero-gradient step, as it does with clipping on (README "DeepSpeed"). Before, the
  wrapped clip handed such a step to DeepSpeed, which does nothing without a clip, and AdamW made
  the weights NaN for good.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_modules import PoisonGrad
from torch import nn

from helpers_dist import run_distributed

MICRO, ACCUM = 3, 2


class _Net(nn.Module):
    """Odd sizes (ZeRO pads the partitions), a norm, a frozen layer and a logit-scale-like scalar."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.frozen = nn.Linear(7, 7)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(7, 3)
        self.logit_scale = nn.Parameter(torch.full([1], 0.5))
        self.poison = False

    def forward(self, x, y):
        h = PoisonGrad.apply(self.frozen(self.norm(self.a(x))), self.poison)
        return ((self.b(h) * self.logit_scale - y).float() ** 2).mean()


def _global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    n = world * ACCUM * MICRO
    return torch.randn(n, 5, generator=gen) * 3, torch.randn(n, 3, generator=gen)


def _reference_norm(world: int) -> float:
    """fp64, one process, the mean loss over the whole global batch."""
    torch.manual_seed(0)
    net = _Net().double()
    x, y = _global_batch(world)
    net(x.double(), y.double()).backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters() if p.requires_grad))


def _norms(rank: int, world: int, clip: float) -> dict:
    import torch.distributed as dist

    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    x, y = _global_batch(world)
    mine = slice(rank * ACCUM * MICRO, (rank + 1) * ACCUM * MICRO)
    x, y = x[mine], y[mine]
    out = {}
    for stage in (0, 1, 2, 3):
        torch.manual_seed(0)
        cfg = TrainConfig(
            micro_batch_size=MICRO, grad_accum_steps=ACCUM, zero_stage=stage, warmup_steps=0, grad_clip=clip
        )
        engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
        inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
        seen = torch.zeros((), dtype=torch.float64)

        def add_clipped(optimizer, args, kwargs, seen=seen):
            # ZeRO-1/2 step one parameter group at a time: sum over every call.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        seen.add_(p.grad.double().pow(2).sum())

        inner.register_step_pre_hook(add_clipped)
        for micro in range(ACCUM):
            part = slice(micro * MICRO, (micro + 1) * MICRO)
            engine.backward(engine(x[part], y[part]))
            engine.step()
        if stage > 0:  # partitioned over the ranks; ZeRO-0's gradients are whole on every rank
            dist.all_reduce(seen)
        norm = engine.get_global_grad_norm()
        out[stage] = {"norm": None if norm is None else float(norm), "clipped": math.sqrt(float(seen))}
    return out


def test_clip_norm_is_the_global_batch_gradients_norm_at_every_stage():
    """2 ranks x 2 micro-steps: DeepSpeed's norm equals the fp64 norm of the gradient of the global
    batch's mean loss (ZeRO-1/2/3; ZeRO-0 fp32 reports none), and AdamW sees min(norm, clip)."""
    world, clip = 2, 0.2
    expected = _reference_norm(world)
    assert expected > 2 * clip  # it clips
    out = run_distributed(_norms, world, clip)
    for rank in range(world):
        for stage, got in out[rank].items():
            if stage > 0:
                assert got["norm"] == pytest.approx(expected, rel=1e-5), (rank, stage)
            clipped = expected * min(1.0, clip / (expected + 1e-6))
            assert got["clipped"] == pytest.approx(clipped, rel=1e-5), (rank, stage)


def _nan_gradient_steps(rank: int, world: int, stage: int) -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    def run(bad_step: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        cfg = TrainConfig(
            micro_batch_size=4, zero_stage=stage, precision="bf16", warmup_steps=0, grad_clip=0.0
        )
        engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
        for step in range(3):
            gen = torch.Generator().manual_seed(step * world + rank)
            x, y = torch.randn(4, 5, generator=gen).bfloat16(), torch.randn(4, 3, generator=gen).bfloat16()
            engine.module.poison = bad_step == "nan" and step == 1
            loss = engine(x, y)
            if bad_step == "zero" and step == 1:
                loss = loss * 0  # the reference: a zero-gradient step
            engine.backward(loss)
            engine.step()
        return [p.detach().float().clone() for p in engine.module.parameters()]

    return {"nan": run("nan"), "zero": run("zero")}


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_nan_gradient_without_clip_is_a_zero_gradient_step(stage):
    """A finite loss whose gradient is NaN, bf16, grad_clip=0: the weights stay finite and equal,
    bit for bit, those of a run whose loss at that step is multiplied by 0. Before: NaN weights."""
    out = run_distributed(_nan_gradient_steps, 1, stage)[0]
    for nan_run, zero_run in zip(out["nan"], out["zero"]):
        assert torch.isfinite(nan_run).all()
        assert torch.equal(nan_run, zero_run)
