"""ZeRO's gradient norm through one multi-tensor norm (vutrain/grad_norm.py), on 2 real CPU ranks
(gloo) with real DeepSpeed engines from `vutrain.engine.build_engine` at ZeRO-1, 2 and 3 in bf16.

The wrapped `get_grad_norm_direct` must give DeepSpeed's own value (the norm over both ranks'
gradients, ZeRO-1/2's partition padding left out, -1 for a non-finite norm) from a handful of ops
instead of two per gradient, and a real optimizer step must run through it.
"""

from __future__ import annotations

import pytest
import torch
from test_param_alignment import _odd_model
from torch.utils._python_dispatch import TorchDispatchMode

from helpers_dist import run_distributed


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _norms(rank: int, world: int, stage: int, device: str = "cpu") -> dict:
    import torch.distributed as dist

    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision="bf16", warmup_steps=0)
    engine = build_engine(_odd_model(), cfg, world, torch.device(device))
    opt = engine.optimizer
    wrapped = opt.get_grad_norm_direct
    original = wrapped.__wrapped__
    params = opt.params_in_partition[0] if stage in (1, 2) else opt.fp16_groups[0]
    gen = torch.Generator().manual_seed(rank)
    grads = [torch.randn(1 + 7 * i % 53, generator=gen).bfloat16().to(device) for i in range(len(params))]
    counted = list(grads)
    if stage in (1, 2):  # ZeRO-1/2 leave their partition's padding out of the norm
        pad = torch.full((5,), 1e3, dtype=torch.bfloat16, device=device)
        pad._zero_padding = True
        grads.insert(2, pad)
    expected = torch.stack([g.double().pow(2).sum() for g in counted]).sum()
    dist.all_reduce(expected)
    out = {"expected": expected.sqrt().item(), "grads": len(counted)}
    for name, fn in (("ours", wrapped), ("deepspeed", original)):
        with CountOps() as mode:
            out[name] = fn(grads, params).item()
        out[f"{name}_ops"] = mode.ops
    with CountOps() as mode:  # four times the gradients: the same ops (DeepSpeed's: 2 per gradient more)
        wrapped(grads * 4, params * 4)
    out["ours_ops_x4"] = mode.ops
    if rank == world - 1:  # one rank's NaN makes every rank's norm -1
        grads[4] = grads[4].clone()
        grads[4][0] = float("nan")
    out["ours_nan"], out["deepspeed_nan"] = wrapped(grads, params).item(), original(grads, params).item()
    # A real step goes through the wrapper (DeepSpeed calls it at the boundary).
    calls = []
    opt.get_grad_norm_direct = lambda *a, **k: calls.append(1) or wrapped(*a, **k)
    img, txt, scale, _ = engine(
        pixel_values=torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, device=device),
        input_ids=torch.randint(1, 99, (2, 9), device=device),
        attention_mask=torch.ones(2, 9, dtype=torch.long, device=device),
    )
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float())
    engine.step()
    out["step_calls"], out["step_norm"] = len(calls), float(engine.get_global_grad_norm())
    return out


def _all_stages(rank: int, world: int) -> dict:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return {stage: _norms(rank, world, stage) for stage in (1, 2, 3)}


def _check(r: dict, where: str) -> None:
    assert r["ours"] == pytest.approx(r["expected"], rel=1e-6), where
    assert r["deepspeed"] == pytest.approx(r["expected"], rel=1e-6), where
    assert r["deepspeed_ops"] >= 2 * r["grads"] and r["ours_ops_x4"] <= r["ours_ops"] <= 20, where
    assert r["ours_nan"] == r["deepspeed_nan"] == -1.0, where
    assert r["step_calls"] >= 1 and r["step_norm"] > 0, where


@pytest.mark.slow  # spawns 2 rank processes
def test_zero_gradient_norm_is_deepspeeds_from_a_few_ops():
    results = run_distributed(_all_stages, 2, init_process_group=False, timeout_s=600)
    for rank, by_stage in enumerate(results):
        for stage, r in by_stage.items():
            _check(r, f"rank {rank}, ZeRO-{stage}: {r}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_gradient_norm_on_a_gpu(single_process, stage):
    """The same on one GPU (world 1): torch._foreach_norm's CUDA multi-tensor path with bf16
    gradients and an fp32 result, DeepSpeed's finish on the device."""
    import os

    from vutrain.distributed import init_distributed, resolve_dist_env

    from inprocess_trainer import DIST_ENV

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    r = _norms(0, 1, stage, device="cuda")
    _check(r, f"cuda, ZeRO-{stage}: {r}")
