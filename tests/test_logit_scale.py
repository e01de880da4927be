"""The logit scale's bound ln(100): clamped in the forward, still trainable at and past the bound.

open_clip clamps the parameter in place after each optimizer step, so it sits on the bound and
keeps its gradient. A forward `clamp(max=ln 100)` alone gave a parameter past the bound (a
pretrained CLIP's fp32 ln 100 is 4.6051998 > ln 100) a zero gradient for good. Real DeepSpeed
engines (`vutrain.engine.build_engine`, world 1 in this process, gloo on CPU) at ZeRO-1/2/3.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_param_alignment import _odd_model

from inprocess_trainer import DIST_ENV

LN100 = math.log(100.0)


@pytest.fixture
def one_rank(single_process):
    """A world-1 process group in this process, as a plain `python` run gets it."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    yield


def _engine(stage: int, start: float, precision: str = "fp32"):
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    module = _odd_model()
    module.base.logit_scale.data.fill_(start)
    cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision=precision, lr=1e-2, warmup_steps=0)
    return build_engine(module, cfg, 1, torch.device("cpu"))


def _scale_param(engine) -> float:
    """The full logit-scale parameter (gathered under ZeRO-3, which keeps such a small one whole)."""
    return float(engine.module.base.logit_scale.detach().float().reshape(()))


def _steps(engine, direction: float, n: int) -> list[float]:
    """`n` optimizer steps of a loss `direction * scale` (+1: the loss wants a lower scale)."""
    gen = torch.Generator().manual_seed(1)
    dtype = next(engine.module.parameters()).dtype
    values = []
    for _ in range(n):
        img, txt, scale, _ = engine(
            pixel_values=torch.randn(2, 3, 16, 16, generator=gen).to(dtype),
            input_ids=torch.randint(1, 99, (2, 9), generator=gen),
            attention_mask=None,
        )
        assert float(scale.detach()) <= 100.0 + 1e-3  # the forward value never exceeds the bound
        engine.backward(direction * scale.float() + 0.0 * (img.float() * txt.float()).sum())
        engine.step()
        values.append(_scale_param(engine))
    return values


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_scale_past_the_bound_comes_down_when_the_loss_wants_it_lower(stage, one_rank):
    start = 4.6051998  # a pretrained CLIP's fp32 logit scale, just past ln(100)
    engine = _engine(stage, start)
    values = _steps(engine, +1.0, 3)
    assert values[-1] < LN100 - 1e-3, values  # before: frozen at 4.6051998, zero gradient


@pytest.mark.parametrize("stage", [2, 3])
def test_scale_stays_at_the_bound_while_pushed_out_and_follows_back(stage, one_rank):
    """Pushed up for 20 steps it stays near ln(100) (a pass-through gradient would have drifted
    20 x lr past it), and it is below the bound within a few steps of being pulled back (open_clip
    too needs some: its AdamW momentum, built up against the bound, must turn first)."""
    engine = _engine(stage, LN100 - 0.005)
    up = _steps(engine, -1.0, 20)
    assert max(up) < LN100 + 0.05, up  # momentum may carry it a little past, not lr per step
    down = _steps(engine, +1.0, 10)
    assert down[-1] < LN100, down


def test_bounded_scale_gradients():
    from vutrain.model import bounded_logit_scale

    for value, grad_out, expected in [
        (LN100 + 1.0, 1.0, 1.0),  # past the top, pulled down: passes
        (LN100 + 1.0, -1.0, 0.0),  # past the top, pushed up: stopped
        (1.0, -1.0, -1.0),  # inside: passes either way
        (-0.5, 1.0, 0.0),  # below 0, pushed further down: stopped
        (-0.5, -1.0, -1.0),  # below 0, pulled up: passes
    ]:
        param = torch.tensor([value], requires_grad=True)
        out = bounded_logit_scale(param)
        assert float(out) == pytest.approx(min(max(value, 0.0), LN100))
        out.backward(torch.tensor([grad_out]))
        assert float(param.grad) == expected, (value, grad_out)
