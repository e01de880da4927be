"""A NaN gradient under a finite loss, at every precision and ZeRO stage, with real DeepSpeed
engines (`vutrain.engine.build_engine`) on CPU ranks (gloo).

- ZeRO-0 in fp32 (the plain torch AdamW, which skips nothing): the step becomes a zero-gradient
  step, as in bf16 at ZeRO-1/2, with clipping off and on, on 2 ranks with the NaN on one rank only.
  Before: the weights went NaN for good.
  Also amp_bf16 (fp32 weights and the same AdamW at ZeRO-0).
- ZeRO-1/2/3 in fp32, bf16 and amp_bf16 on 2 ranks, the NaN on rank 0 only: the weights stay finite, the
  same on both ranks, and the following steps train.
"""

from __future__ import annotations

import pytest
import torch
from tiny_modules import PoisonGrad
from torch import nn

from helpers_dist import run_distributed

STEPS, BAD_STEP, MICRO = 3, 1, 4
# ZeRO-0 runs whose optimizer is the plain AdamW: fp32 weights (amp_bf16 autocasts the forward only).
ZERO0_CASES = (("fp32", 0.0), ("fp32", 1.0), ("amp_bf16", 0.0))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.b = nn.Linear(7, 3)
        self.poison = False

    def forward(self, x, y):
        h = PoisonGrad.apply(self.norm(self.a(x)), self.poison)
        return ((self.b(h) - y).float() ** 2).mean()


def _train(
    rank: int, world: int, precision: str, stage: int, clip: float, bad: str
) -> list[list[torch.Tensor]]:
    """STEPS steps; at BAD_STEP rank 0's gradient is NaN (bad="nan") or every loss is times 0
    (bad="zero", the reference zero-gradient step). Returns the weights after each step."""
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=MICRO, zero_stage=stage, precision=precision, warmup_steps=0, grad_clip=clip
    )
    engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32  # amp_bf16: fp32 in, autocast
    after = []
    for step in range(STEPS):
        gen = torch.Generator().manual_seed(step * world + rank)
        x, y = torch.randn(MICRO, 5, generator=gen).to(dtype), torch.randn(MICRO, 3, generator=gen).to(dtype)
        engine.module.poison = bad == "nan" and step == BAD_STEP and rank == 0
        loss = engine(x, y)
        if bad == "zero" and step == BAD_STEP:
            loss = loss * 0
        if step == BAD_STEP:
            assert torch.isfinite(loss)  # the premise: a finite loss with a NaN gradient
        engine.backward(loss)
        engine.step()
        after.append([p.detach().float().clone() for p in engine.module.parameters()])
    return after


def _all_runs(rank: int, world: int) -> dict:
    """Every run of this file in one pair of processes (spawning and importing DeepSpeed dominate)."""
    zero0 = {
        (precision, clip, bad): _train(rank, world, precision, 0, clip, bad)
        for precision, clip in ZERO0_CASES
        for bad in ("nan", "zero")
    }
    stages = {
        (precision, stage): _train(rank, world, precision, stage, 0.0, "nan")
        for precision in ("fp32", "bf16", "amp_bf16")
        for stage in (1, 2, 3)
    }
    return {"zero0": zero0, "stages": stages}


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return run_distributed(_all_runs, 2)


@pytest.mark.parametrize("precision, clip", ZERO0_CASES)
def test_zero0_fp32_nan_gradient_is_a_zero_gradient_step(runs, precision, clip):
    """ZeRO-0 with fp32 weights (fp32, amp_bf16), 2 ranks, rank 0's gradient NaN under a finite
    loss: on both ranks the weights after every step equal, bit for bit, those of a run whose loss
    at that step is times 0 (finite, and the next steps train). Before: NaN weights from then on."""
    for rank in range(2):
        nan_run, zero_run = (
            runs[rank]["zero0"][precision, clip, "nan"],
            runs[rank]["zero0"][precision, clip, "zero"],
        )
        for step in range(STEPS):
            for got, want in zip(nan_run[step], zero_run[step]):
                assert torch.isfinite(got).all(), (rank, step)
                assert torch.equal(got, want), (rank, step)
        moved = [not torch.equal(a, b) for a, b in zip(nan_run[BAD_STEP], nan_run[BAD_STEP + 1])]
        assert all(moved), "the step after the NaN one trains every weight"


def test_rank_local_nan_gradient_leaves_every_stage_finite_and_ranks_agreeing(runs):
    """fp32, bf16 and amp_bf16 x ZeRO-1/2/3 (ZeRO-0 above), clipping off, 2 ranks, the NaN on rank
    0 only: the weights are finite after every step, equal on both ranks (no rank steps while
    another skips), and the last step moves them."""
    for key, steps in runs[0]["stages"].items():
        for step in range(STEPS):
            for mine, theirs in zip(steps[step], runs[1]["stages"][key][step]):
                assert torch.isfinite(mine).all(), (key, step)
                assert torch.equal(mine, theirs), (key, step)
        assert any(not torch.equal(a, b) for a, b in zip(steps[-2], steps[-1])), key
