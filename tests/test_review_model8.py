"""The logit scale's bound in bf16: the run trains at exp(ln 100) = 100, the value export writes.

bf16 cannot hold ln(100) = 4.60517: its neighbours are 4.59375 and 4.625. The clamp and its
bound test ran in the parameter's dtype, so a bf16 run clamped to 4.59375 and exponentiated in
bf16: every step at the bound trained with a scale of 99.0, and the bound test (4.59375 >= ln 100
in bf16) stopped the gradient that would have moved it. The export clamps the fp32 master
to ln(100) and writes 100. Real DeepSpeed engines in bf16 (world 1 in this process, gloo on CPU).
"""

from __future__ import annotations

import math

import pytest
import torch
from test_logit_scale import _engine, _steps, one_rank  # noqa: F401 (a fixture)

from vutrain.model import bounded_logit_scale

LN100 = math.log(100.0)


def _forward_scale(engine) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return engine(
        pixel_values=torch.randn(2, 3, 16, 16, generator=gen).bfloat16(),
        input_ids=torch.randint(1, 99, (2, 9), generator=gen),
        attention_mask=None,
    )[2]


def test_bf16_run_pushed_to_the_bound_trains_at_100(one_rank):  # noqa: F811
    """A pretrained CLIP's fp32 scale (4.6051998, bf16 4.59375) pushed up for a few steps: the
    forward scale reaches 100 (before: 99.0 at every step) and is fp32. ZeRO-2, the GPU recipe."""
    engine = _engine(2, 4.6051998, precision="bf16")
    assert engine.module.base.logit_scale.dtype == torch.bfloat16  # DeepSpeed's bf16 weights
    _steps(engine, -1.0, 3)
    scale = _forward_scale(engine)
    assert float(scale.detach()) == pytest.approx(100.0, abs=1e-3)
    assert scale.dtype == torch.float32


def test_bounded_scale_of_a_bf16_parameter_is_clamped_in_fp32():
    """Past the bound: exactly ln(100) in fp32, with the outward gradient stopped; just under the
    bound's bf16 rounding (4.59375 < ln 100): its own value, and the outward gradient passes."""
    for value, grad_out, expected_value, expected_grad in [
        (4.625, -1.0, LN100, 0.0),  # past: clamped to ln 100, pushed up: stopped
        (4.625, 1.0, LN100, 1.0),  # past, pulled down: passes
        (4.59375, -1.0, 4.59375, -1.0),  # inside in fp32: passes (before: stopped, held at 99.0)
    ]:
        param = torch.tensor([value], dtype=torch.bfloat16, requires_grad=True)
        out = bounded_logit_scale(param)
        assert float(out) == pytest.approx(expected_value, abs=1e-6)
        assert out.dtype == torch.float32
        out.backward(torch.tensor([grad_out]))
        assert param.grad.dtype == torch.bfloat16
        assert float(param.grad) == expected_grad, (value, grad_out)
