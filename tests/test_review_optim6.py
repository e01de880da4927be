"""Review 6 of the optimizer step: a zero-element parameter (an empty tensor in the model) at ZeRO-0
with fp32 weights, where `zero_nonfinite_at_step` (vutrain/grad_clip.py) checks the gradients.

Its max-norm (`torch._foreach_norm(..., inf)`) raised "cannot compute the infinity norm on an empty
tensor" for the empty gradient, so every step of such a model failed at ZeRO-0 fp32 and amp_bf16
(ZeRO-1/2 and bf16 were fine). Real DeepSpeed engine from `vutrain.engine.build_engine`, one rank.
"""

from __future__ import annotations

import os

import pytest
import torch
from test_param_alignment import _odd_model

from inprocess_trainer import DIST_ENV


def _model_with_an_empty_parameter():
    """_odd_model with a zero-element parameter that takes part in the forward (so it gets a gradient)."""
    module = _odd_model()
    base = module.base
    base.empty = torch.nn.Parameter(torch.zeros(0))
    text_features = base.get_text_features

    def get_text_features(**kwargs):
        out = text_features(**kwargs)
        out.pooler_output = out.pooler_output + base.empty.sum()  # + 0, but in the graph
        return out

    base.get_text_features = get_text_features
    return module


def _backward(engine, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    img, txt, scale, _ = engine(
        pixel_values=torch.randn(2, 3, 16, 16, generator=gen),
        input_ids=torch.randint(1, 99, (2, 9), generator=gen),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
    )
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float())


@pytest.mark.parametrize("precision", ["fp32", "amp_bf16"])
def test_zero0_step_with_an_empty_parameter(single_process, precision):
    from vutrain.config import TrainConfig
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.engine import build_engine
    from vutrain.grad_clip import count_zeroed_steps

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    torch.manual_seed(0)
    module = _model_with_an_empty_parameter()
    cfg = TrainConfig(micro_batch_size=2, zero_stage=0, precision=precision, warmup_steps=0)
    engine = build_engine(module, cfg, 1, torch.device("cpu"))
    zeroed = torch.zeros((), dtype=torch.int64)
    assert count_zeroed_steps(engine, zeroed)

    before = module.base.text_projection.weight.detach().clone()
    _backward(engine, 0)
    assert module.base.empty.grad is not None and module.base.empty.grad.numel() == 0
    engine.step()  # raised RuntimeError from _foreach_norm before the fix
    assert not torch.equal(module.base.text_projection.weight, before), "the step trained nothing"
    assert int(zeroed) == 0

    # The hook still does its job with the empty gradient among the others: a NaN step is zeroed.
    _backward(engine, 1)
    module.base.text_projection.weight.grad[0, 0] = float("nan")
    engine.step()
    assert int(zeroed) == 1
    assert all(torch.isfinite(p).all() for p in module.parameters())
