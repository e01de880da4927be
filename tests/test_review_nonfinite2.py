"""Skipping a non-finite micro-batch inside an accumulation window (issue 9), on 2 gloo ranks with
real DeepSpeed engines (fp32 and amp_bf16, ZeRO-0 to 3), the real NonFiniteGuard and the
engine's zeroing paths (vutrain/engine.py's build_engine, grad_clip.py), as the trainer wires them.

- A NaN loss on one rank in the first, middle or last micro-batch of a 3-micro-batch window, or in
  the whole window: every rank ends with exactly the weights of a run whose losses there are
  multiplied by 0 (the skipped micro-batch's share is dropped, the others are not rescaled), the
  optimizer steps at the same micro-batches (every 3rd), the LR schedule advances alike, and the
  guard counts exactly the skipped and good micro-batches.
- An inf gradient under a finite loss is not the guard's (nothing skipped): ZeRO-0 zeroes that
  step's gradient and counts it in the guard's zeroed_steps; ZeRO-1/2/3 leave it to DeepSpeed,
  which skips the step (engine.skipped_steps) and holds the schedule, as the README says.
- No host read in a micro-batch that is not an accumulation boundary (after the first step).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helpers_dist import run_distributed

STEPS, ACCUM, POISONED_STEP = 3, 3, 1


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x):
        return self.b(nn.functional.gelu(self.a(x)))


def _engine_and_guard(world: int, precision: str, stage: int):
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine
    from vutrain.grad_clip import count_zeroed_steps, mask_at_step
    from vutrain.nonfinite import NonFiniteGuard

    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=4, grad_accum_steps=ACCUM, zero_stage=stage, precision=precision,
        lr=1e-2, warmup_steps=0, max_steps=STEPS, grad_clip=1.0,
    )  # fmt: skip
    engine = build_engine(Tiny(), cfg, world, torch.device("cpu"))
    guard = NonFiniteGuard(engine.module, torch.device("cpu"), world)
    if mask_at_step(engine, guard.skip):  # as Trainer.__init__
        guard.remove()
    count_zeroed_steps(engine, guard.zeroed_steps)
    return engine, guard


def _run(rank: int, world: int, precision: str, stage: int, kind: str, micros: tuple, mode: str) -> dict:
    """STEPS steps; at POISONED_STEP's `micros` the last rank's pixels are NaN (kind "nan") or its
    first parameter's gradient inf (kind "inf_grad") in mode "bad"; mode "zero" multiplies those
    losses by 0 on every rank instead (the reference)."""
    from vutrain.host_reads import HostReads

    engine, guard = _engine_and_guard(world, precision, stage)
    inf_grad = [False]
    first = next(p for p in engine.module.parameters() if p.requires_grad)
    first.register_hook(lambda g: torch.full_like(g, float("inf")) if inf_grad[0] else g)
    gen = torch.Generator().manual_seed(100 + rank)
    dtype = next(engine.module.parameters()).dtype
    boundaries, lrs, reads = [], [], HostReads(None)
    for step in range(STEPS):
        for micro in range(ACCUM):
            x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)
            poisoned = step == POISONED_STEP and micro in micros
            if mode == "bad" and poisoned and rank == world - 1:
                if kind == "nan":
                    x = torch.full_like(x, float("nan"))
                inf_grad[0] = kind == "inf_grad"
            # Counted from the second step (the first builds DeepSpeed's buffers and ZeRO-3's
            # parameter trace), outside the optimizer step at the accumulation boundary.
            before, boundary = engine.global_steps, micro == ACCUM - 1
            counted = step > 0 and not boundary
            with reads if counted else _nothing():
                loss = ((engine(x.to(dtype)).float() - y) ** 2).mean()
                if mode == "zero" and poisoned:
                    loss = loss * 0
                engine.backward(guard.agree(loss))
            _counted(reads, engine.step) if counted else engine.step()
            inf_grad[0] = False
            if engine.global_steps != before:
                boundaries.append((step, micro))
        lrs.append(engine.get_lr()[0])
    stats = guard.read()
    params = dict(engine.module.named_parameters())
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            params = {n: p.detach().float().clone() for n, p in params.items()}
    else:
        params = {n: p.detach().float().clone() for n, p in params.items()}
    return dict(
        params=params, boundaries=boundaries, lrs=lrs, skipped=stats.skipped, good=stats.good,
        zeroed=stats.zeroed_steps, ds_skipped=int(getattr(engine, "skipped_steps", 0)),
        reads=dict(reads.sites),
    )  # fmt: skip


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _counted(reads, fn):
    with reads:
        return fn()


# (precision, stage, kind, poisoned micro-batches of POISONED_STEP): first, middle and last
# positions spread over the stages, a whole window, and an inf gradient under a finite loss.
CASES = [
    ("fp32", 0, "nan", (0,)),
    ("fp32", 1, "nan", (1,)),
    ("fp32", 2, "nan", (2,)),
    ("fp32", 3, "nan", (0,)),
    ("amp_bf16", 0, "nan", (2,)),
    ("amp_bf16", 1, "nan", (0,)),
    ("amp_bf16", 2, "nan", (1,)),
    ("amp_bf16", 3, "nan", (2,)),
    ("fp32", 2, "nan", (0, 1, 2)),
    ("amp_bf16", 3, "nan", (0, 1, 2)),
    ("fp32", 0, "inf_grad", (1,)),
    ("amp_bf16", 2, "inf_grad", (1,)),
]


def _all_cases(rank: int, world: int) -> list[dict]:
    return [{m: _run(rank, world, *case, m) for m in ("bad", "zero")} for case in CASES]


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_cases, 2, timeout_s=600)


def _case_id(case) -> str:
    return f"{case[0]}-zero{case[1]}-{case[2]}-{''.join(map(str, case[3]))}"


@pytest.mark.slow  # spawns 2 rank processes
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_nonfinite_microbatch_in_window(results, index):
    precision, stage, kind, micros = CASES[index]
    every_boundary = [(s, ACCUM - 1) for s in range(STEPS)]
    for rank, by_case in enumerate(results):
        bad, zero = by_case[index]["bad"], by_case[index]["zero"]
        assert bad["boundaries"] == zero["boundaries"] == every_boundary, f"rank {rank}: boundary moved"
        assert bad["reads"] == zero["reads"] == {}, f"rank {rank}: host reads in a micro-batch"
        for name, value in bad["params"].items():
            assert torch.isfinite(value).all(), f"rank {rank}: {name} is not finite"
        if kind == "nan":
            assert (bad["skipped"], bad["good"]) == (len(micros), STEPS * ACCUM - len(micros))
            assert (zero["skipped"], bad["zeroed"], bad["ds_skipped"]) == (0, 0, 0)
            assert bad["lrs"] == zero["lrs"], f"rank {rank}: the schedule differs"
            for name, value in bad["params"].items():
                torch.testing.assert_close(value, zero["params"][name], rtol=0, atol=0, msg=name)
        else:  # the guard skips nothing; the step's optimizer deals with the inf gradient
            assert (bad["skipped"], bad["good"]) == (0, STEPS * ACCUM)
            if stage == 0:  # a zero-gradient step, counted; the schedule advances
                assert (bad["zeroed"], bad["ds_skipped"]) == (1, 0)
                assert bad["lrs"] == zero["lrs"]
            else:  # DeepSpeed skips the step and holds the schedule
                assert (bad["zeroed"], bad["ds_skipped"]) == (0, 1)
    for name, value in results[0][index]["bad"]["params"].items():
        torch.testing.assert_close(value, results[1][index]["bad"]["params"][name], rtol=0, atol=0)
