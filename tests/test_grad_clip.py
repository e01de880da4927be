"""ZeRO-1/2's gradient clipping on the device (vutrain/grad_clip.py), on 2 real CPU ranks (gloo)
with real DeepSpeed engines from `vutrain.engine.build_engine` in bf16.

The wrapped `unscale_and_clip_grads` must scale the flat gradients exactly as DeepSpeed's does
(clipping, no clipping, an invalid norm: non-finite or DeepSpeed's -1) without reading a value on
the host, and a real optimizer step must make no host read in DeepSpeed's ZeRO-1/2 optimizer.
Before the change DeepSpeed's `is_invalid_grad_norm` read the norm once per parameter group (2 per
step; seen on an H200 as `host_reads_per_step: 2` in `python -m vutrain.bench --compare`). The
clip factor is computed once per step, not once per parameter group.
"""

from __future__ import annotations

import pytest
import torch
from test_grad_reduction import OpNames
from test_param_alignment import _odd_model

from vutrain.host_reads import HostReads

from helpers_dist import run_distributed


def _clip(rank: int, world: int, stage: int, device: str = "cpu") -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision="bf16", warmup_steps=0, grad_clip=1.0)
    engine = build_engine(_odd_model(), cfg, world, torch.device(device))
    opt = engine.optimizer
    wrapped = opt.unscale_and_clip_grads
    original = wrapped.__wrapped__
    out = {"clip_grad": opt.clip_grad, "max_abs_diff": 0.0, "reads": {}}
    gen = torch.Generator().manual_seed(rank)
    cases = [(n, 1.0) for n in (0.5, 7.0, -1.0, float("nan"), float("inf"))]  # under, over, -1, non-finite
    cases += [(7.0, 1024.0), (2048.0, 1024.0)]  # a loss scale (fp16's): the norm is of scaled gradients
    cases += [(float("nan"), "nan entry"), (float("inf"), "inf entry")]  # non-finite gradients
    for norm, scale in cases:
        bad_entry = scale if isinstance(scale, str) else None
        opt.loss_scale = scale = 1.0 if bad_entry else scale
        flat = [torch.randn(37, generator=gen).to(device), [torch.randn(5, generator=gen).to(device)]]
        if bad_entry:  # a finite loss whose backward overflowed: the norm says so
            flat[0][3] = float(bad_entry.split()[0])
        ours = [flat[0].clone(), [flat[1][0].clone()]]
        theirs = [flat[0].clone(), [flat[1][0].clone()]]
        total = torch.tensor(norm, device=device)
        with HostReads() as reads:
            wrapped(ours, total)
        out["reads"][(norm, scale, bad_entry)] = reads.total
        original(theirs, total)
        if bad_entry:  # DeepSpeed's times 0 leaves the entry NaN; ours zeroes every gradient
            out.setdefault("bad_entry_deepspeed_nan", []).append(bool(theirs[0][3].isnan()))
            out.setdefault("bad_entry_zeroed", []).append(
                all(bool((t == 0).all()) for t in (ours[0], ours[1][0]))
            )
            continue
        for a, b in ((ours[0], theirs[0]), (ours[1][0], theirs[1][0])):
            assert torch.isfinite(a).all(), (norm, a)
            out["max_abs_diff"] = max(out["max_abs_diff"], (a - b).abs().max().item())
        if norm != norm or norm in (-1.0, float("inf")):  # invalid: clipped with an infinite norm
            out.setdefault("zeroed", []).append(bool((ours[0] == 0).all()))
    opt.loss_scale = 1.0
    # The non-finite guard's verdict at the step (grad_clip.mask_at_step: bf16, one micro-batch per
    # step): a skipped step's flat gradients are zeroed, a kept one's left to the clip.
    from vutrain.grad_clip import mask_at_step

    skip = torch.tensor(False, device=device)
    out["mask_at_step"] = mask_at_step(engine, skip) and wrapped.skip is skip
    for verdict in (True, False):
        skip.fill_(verdict)
        g = [torch.randn(7, generator=gen).to(device)]
        kept = g[0].clone()
        wrapped(g, torch.tensor(float("nan") if verdict else 0.5, device=device))
        out[f"skip={verdict}"] = bool((g[0] == 0).all()) if verdict else bool(torch.equal(g[0], kept))
    wrapped.skip = None
    # DeepSpeed passes the step's one norm tensor to one call per parameter group: the factor is
    # computed by the first call, the second only scales; an in-place update gets a new factor.
    total = torch.tensor(7.0, device=device)
    wrapped([torch.randn(9, generator=gen).to(device)], total)
    second = [torch.randn(9, generator=gen).to(device)]
    with OpNames() as ops:
        wrapped(second, total)
    out["second_group_ops"] = {op: n for op, n in ops.ops.items() if op != "detach"}  # `.data`: a view
    total.fill_(0.5)
    g = [torch.randn(9, generator=gen).to(device)]
    ref = [g[0].clone()]
    wrapped(g, total)
    original(ref, total)
    out["in_place_update_diff"] = (g[0] - ref[0]).abs().max().item()
    # A real step: DeepSpeed's ZeRO-1/2 optimizer reads nothing on the host any more.
    img, txt, scale, _ = engine(
        pixel_values=torch.randn(2, 3, 16, 16, dtype=torch.bfloat16, device=device),
        input_ids=torch.randint(1, 99, (2, 9), device=device),
        attention_mask=torch.ones(2, 9, dtype=torch.long, device=device),
    )
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float() * 1e3)  # clipped
    # DeepSpeed's host-side validity check, counted where ZeRO-1/2 call it; on a GPU also every
    # read of a CUDA tensor (on CPU ranks the optimizer's CPU step counters are read: no sync).
    import deepspeed.runtime.zero.stage_1_and_2 as zero12

    checks, check = [], zero12.is_invalid_grad_norm
    zero12.is_invalid_grad_norm = lambda norm: checks.append(1) or check(norm)
    try:
        with HostReads("cuda") as reads:
            engine.step()
    finally:
        zero12.is_invalid_grad_norm = check
    out["host_checks"], out["cuda_reads"] = len(checks), dict(reads.sites)
    out["step_norm"] = float(engine.get_global_grad_norm())
    return out


def _stages(rank: int, world: int) -> dict:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return {stage: _clip(rank, world, stage) for stage in (1, 2)}


def _check(r: dict, where: str) -> None:
    assert r["clip_grad"] == 1.0, where
    assert r["max_abs_diff"] <= 1e-6, where  # DeepSpeed's scaling, to fp32 rounding
    assert r["zeroed"] == [True, True, True], where
    assert set(r["reads"].values()) == {0}, where
    assert r["host_checks"] == 0 and r["cuda_reads"] == {}, where
    assert r["mask_at_step"] and r["skip=True"] and r["skip=False"], where
    assert r["step_norm"] > 1.0, where  # the step's norm was over the clip: the clip ran
    assert r["bad_entry_deepspeed_nan"] == [True, True], where
    assert r["bad_entry_zeroed"] == [True, True], where  # NaN and inf entries: a zero gradient
    assert r["second_group_ops"] == {"mul_": 1, "masked_fill_": 1}, where
    assert r["in_place_update_diff"] <= 1e-6, where


@pytest.mark.slow  # spawns 2 rank processes
def test_zero12_clip_is_deepspeeds_without_host_reads():
    results = run_distributed(_stages, 2, init_process_group=False, timeout_s=600)
    for rank, by_stage in enumerate(results):
        for stage, r in by_stage.items():
            _check(r, f"rank {rank}, ZeRO-{stage}: {r}")


def test_other_optimizers_keep_their_method():
    from vutrain.grad_clip import use_device_side_clip

    class NotZero:
        def unscale_and_clip_grads(self, *a):
            return "theirs"

    opt = NotZero()
    assert use_device_side_clip(opt) is False and opt.unscale_and_clip_grads() == "theirs"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_clip_on_a_gpu_reads_nothing(single_process, stage):
    """The same on one GPU (world 1): no read of a CUDA tensor in DeepSpeed's ZeRO-1/2 step."""
    import os

    from vutrain.distributed import init_distributed, resolve_dist_env

    from inprocess_trainer import DIST_ENV

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    r = _clip(0, 1, stage, device="cuda")
    _check(r, f"cuda, ZeRO-{stage}: {r}")
