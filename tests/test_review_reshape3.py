"""Review of resuming with another shape, part 3: a model with odd parameter sizes (real DeepSpeed
engines built with vutrain's config, on gloo ranks).

ZeRO-1/2 flatten each group into one buffer; vutrain asks DeepSpeed to pad between parameters
(param_alignment.py), so with odd sizes (a 1-element scale, 7x5 and 5x3 weights) the saved flat
partitions hold padding that DeepSpeed's universal conversion must skip. A checkpoint written by 2
ranks resumes on 1: ZeRO-2 bf16 -> fp32 (world and precision change together), ZeRO-1 fp32 with LoRA,
ZeRO-3 fp32. Every trainable parameter's fp32 value and Adam moments, every frozen parameter, the
Adam step, the LR and the global step equal the saved ones bit for bit, and the weights the forward
uses equal the restored fp32 values. The ZeRO-3 tag read at ZeRO-2 (a combination the README does
not promise) stops with one line naming train.zero_stage.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn
from zero_engines import full_state, small_engine

from helpers_dist import run_distributed

# (ZeRO stage, saved precision, resumed precision, LoRA)
CASES = [(2, "bf16", "fp32", False), (1, "fp32", "fp32", True), (3, "fp32", "fp32", False)]
GLOBAL_BATCH = 4  # micro batch 2: 1 micro-step a step on 2 ranks, 2 on 1
pytestmark = pytest.mark.slow


class _Odd(nn.Module):
    """Parameter sizes 1, 35, 5, 15, 3: packed back to back, all but the first are misaligned."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.a = nn.Linear(7, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return (self.scale * self.b(torch.tanh(self.a(x)))).pow(2).mean()


def _engine(stage: int, precision: str, lora: bool, world: int):
    torch.manual_seed(0)
    module = _Odd()
    if lora:  # frozen base weights plus trainable adapters, as model.lora.enabled builds them
        from peft import LoraConfig, get_peft_model

        module = get_peft_model(module, LoraConfig(r=3, lora_alpha=4, target_modules=["a", "b"]))
    return small_engine(module, stage, world, 2, GLOBAL_BATCH // (2 * world), precision)


def _save(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt

    deepspeed.init_distributed("gloo")
    saved = {}
    for stage, precision, _, lora in CASES:
        engine = _engine(stage, precision, lora, world)
        dtype = next(engine.module.parameters()).dtype
        torch.manual_seed(100 + rank)
        for _ in range(3 * engine.gradient_accumulation_steps()):
            engine.backward(engine(torch.randn(2, 7, dtype=dtype)).float())
            engine.step()
        out = os.path.join(run_dir, f"z{stage}")
        ckpt.save_checkpoint(engine, out, 3, {"step": 3, "data": {"rank": rank}}, rank, keep=1)
        saved[stage] = full_state(engine)
    return saved


def _forward_weights_match(engine) -> bool:
    """Whether each trainable weight the forward reads equals its restored fp32 value (ZeRO-1/2)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return all(
        torch.equal(p.detach(), safe_get_full_fp32_param(p).to(p.dtype))
        for p in engine.module.parameters()
        if p.requires_grad
    )


def _load(rank, world, run_dir):
    import deepspeed

    from vutrain import checkpoint as ckpt
    from vutrain.config import ConfigError

    deepspeed.init_distributed("gloo")
    loaded = {}
    for stage, _, precision, lora in CASES:
        engine = _engine(stage, precision, lora, world)
        state = ckpt.load_checkpoint(
            engine, *ckpt.resolve_resume("auto", os.path.join(run_dir, f"z{stage}")), rank
        )
        forward_ok = _forward_weights_match(engine) if stage in (1, 2) else True
        loaded[stage] = (full_state(engine), state["step"], state["data"], forward_ok)
    try:  # the ZeRO-3 tag at ZeRO-2: not promised
        ckpt.load_checkpoint(
            _engine(2, "fp32", False, world), *ckpt.resolve_resume("auto", os.path.join(run_dir, "z3")), rank
        )
        loaded["z3_at_2"] = "loaded"
    except ConfigError as exc:
        loaded["z3_at_2"] = str(exc)
    return loaded


def _differences(saved: dict, loaded: dict) -> list:
    out = []
    for key, value in saved.items():
        if key.startswith("_"):
            if value != loaded[key]:
                out.append((key, value, loaded[key]))
            continue
        for i, (a, b) in enumerate(zip(value, loaded[key], strict=True)):
            if not torch.equal(a, b):
                out.append((key, i, (a - b).abs().max().item()))
    return out


def test_odd_sized_parameters_resume_exactly_on_another_world_size(tmp_path):
    run_dir = str(tmp_path)
    saved = run_distributed(_save, 2, run_dir, init_process_group=False)[0]
    loaded = run_distributed(_load, 1, run_dir, init_process_group=False)[0]
    for stage, *_ in CASES:
        state, step, data, forward_ok = loaded[stage]
        assert _differences(saved[stage], state) == [], stage
        assert state["_global_steps"] == 3 and step == 3
        assert data == {"ranks": [{"rank": 0}, {"rank": 1}]}
        assert forward_ok, stage
    message = loaded["z3_at_2"]
    assert "was written with ZeRO stage 3 and this run has train.zero_stage=2" in message
    assert "resume with train.zero_stage=3 " in message and "\n" not in message
