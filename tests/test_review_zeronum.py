"""ZeRO-1/2's step with vutrain's replacements (grad_clip.py, grad_reduction.py, weight_views.py,
param_alignment.py) against DeepSpeed's own methods on the same engine and against plain torch
AdamW over the global batch, on 2 and 3 real gloo ranks with real DeepSpeed engines.

A tiny module with odd-sized parameters (misaligned in a packed flat buffer, uneven partitions on
3 ranks), a 0-dim scale and a frozen layer between trainable ones; clipping just above, just below
and exactly at the first step's norm, and off; fp32 and bf16; 1 and 2 micro-batches per step.
AdamW's eps is large so that the clip factor shows in the update (Adam alone is scale-invariant).
"""

from __future__ import annotations

import pytest
import torch
from spawn_scenarios import results_by_rank, run_in_turn, selected
from torch import nn

from helpers_dist import run_distributed

MICRO = 2
STEPS = 3
VUTRAIN_WRAPPED = {
    "unscale_and_clip_grads": "_vutrain_device_side",
    "allreduce_and_copy": "_vutrain_lean",
    "reduce_gradients": "_vutrain_lean",
    "_update_model_bit16_weights": "_vutrain_lean",
}


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(7, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.requires_grad_(False)
        self.b = nn.Linear(5, 3)
        self.logit_scale = nn.Parameter(torch.tensor([0.3]))
        self.c = nn.Parameter(torch.randn(11))

    def forward(self, x, y):
        h = self.frozen(torch.tanh(self.a(x)))
        out = self.b(h) * self.logit_scale.exp() + self.c[:3] * self.c[3:6].sum()
        return ((out.float() - y.float()) ** 2).mean()


def _toy() -> Toy:
    torch.manual_seed(0)
    return Toy()


def _batch(step: int, rank: int, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(MICRO, 7, generator=gen) * 3
    y = torch.randn(MICRO, 3, generator=gen)
    return x.to(dtype), y


def _cfg(stage: int, precision: str, clip: float, accumulate: int):
    from vutrain.config import TrainConfig

    return TrainConfig(
        micro_batch_size=MICRO, zero_stage=stage, precision=precision, warmup_steps=0, max_steps=10,
        grad_accum_steps=accumulate, grad_clip=clip, lr=3e-2, eps=0.3, weight_decay=0.1,
    )  # fmt: skip


def _reference(world: int, clip: float, accumulate: int) -> tuple[list[torch.Tensor], float]:
    """Plain torch AdamW over the global batch (every rank's micro-batches) in fp32; the first
    step's gradient norm."""
    from vutrain.optim import build_optimizer

    model = _toy()
    cfg = _cfg(1, "fp32", clip, accumulate)
    opt, sched = build_optimizer(model, cfg)
    first_norm = None
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(accumulate):
            batches = [_batch(step * accumulate + micro, r) for r in range(world)]
            x = torch.cat([b[0] for b in batches])
            y = torch.cat([b[1] for b in batches])
            (model(x, y) / accumulate).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        first_norm = float(norm) if first_norm is None else first_norm
        opt.step()
        sched.step()
    return [p.detach().clone() for p in model.parameters()], first_norm


def _engine_weights(rank: int, world: int, stage, precision, clip, accumulate, deepspeed_path: bool):
    from vutrain.engine import build_engine

    engine = build_engine(_toy(), _cfg(stage, precision, clip, accumulate), world, torch.device("cpu"))
    opt = engine.optimizer
    if deepspeed_path:
        for name, marker in VUTRAIN_WRAPPED.items():
            method = getattr(opt, name)
            if getattr(method, marker, False):
                setattr(opt, name, method.__wrapped__)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for step in range(STEPS * accumulate):
        loss = engine(*_batch(step, rank, dtype))
        engine.backward(loss)
        engine.step()
    return [p.detach().float().clone() for p in engine.module.parameters()]


def _compare(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """Each case's weights against DeepSpeed's path and torch's (the process group is up)."""
    out = []
    for stage, precision, clip_rel, accumulate in cases:
        unclipped, norm = _reference(world, 0.0, accumulate)
        clip = norm * clip_rel
        ref, _ = _reference(world, clip, accumulate)
        ours = _engine_weights(rank, world, stage, precision, clip, accumulate, False)
        theirs = _engine_weights(rank, world, stage, precision, clip, accumulate, True)
        out.append(
            {
                "case": (stage, precision, clip_rel, accumulate),
                "ours_vs_deepspeed": _max_diff(ours, theirs),
                "ours_vs_torch": _max_diff(ours, ref),
                "clip_effect": _max_diff(ref, unclipped),
            }
        )
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def _check(results: list[list[dict]]) -> None:
    for rank, rows in enumerate(results):
        for r in rows:
            stage, precision, clip_rel, _ = r["case"]
            assert r["ours_vs_deepspeed"] == 0.0, f"rank {rank}: not DeepSpeed's weights: {r}"
            if precision == "fp32":  # bf16 weights round far above any reduction-order difference
                assert r["ours_vs_torch"] < 1e-6, f"rank {rank}: not torch's weights: {r}"
            if clip_rel in (0.5, 0.999):  # the clip acts at the first step: the case tests something
                assert r["clip_effect"] > 1e-5, r


CASES = [
    (stage, precision, clip_rel, accumulate)
    for stage in (1, 2)
    for precision in ("fp32", "bf16")
    for clip_rel in (0.0, 0.999, 1.0, 1.001, 0.5)
    for accumulate in (1, 2)
]


# The three-rank runs of this module, by name: (worker, its extra arguments). They share one spawn
# of 3 ranks (the `three_rank_runs` fixture): each spawn paid ~30 s of imports (torch, DeepSpeed)
# on a 2-core machine before its first engine, once per test.
THREE_RANK_RUNS = {
    "uneven ranks": ("_compare", (CASES,)),
    "nan on the last rank": ("_nan_on_last_rank", (1,)),
}


def _run_of(item) -> str | None:
    """The name in THREE_RANK_RUNS that test `item` reads (None for a test without one)."""
    if item.originalname == "test_three_uneven_ranks_step_as_deepspeed_and_torch":
        return "uneven ranks"
    if item.originalname == "test_nan_gradient_on_one_of_three_ranks_is_a_zero_gradient_step":
        return "nan on the last rank"
    return None


def _runs(rank: int, world: int, names: list[str]) -> dict:
    """Each named run of THREE_RANK_RUNS in turn on this rank (spawn_scenarios.run_in_turn)."""
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())

    def run(name):
        worker, args = THREE_RANK_RUNS[name]
        return globals()[worker](rank, world, *args)

    return run_in_turn(names, run)


@pytest.fixture(scope="module")
def three_rank_runs(request):
    """The runs the selected tests of this module read, on one spawn of 3 ranks: a list by rank of
    {name: result}."""
    names = selected(request, THREE_RANK_RUNS, _run_of)
    return run_distributed(_runs, 3, names, init_process_group=False, timeout_s=600)


# One worker of pytest-xdist runs them all: the runs are shared through a module-scoped fixture.
pytestmark = pytest.mark.xdist_group("review_zeronum")


@pytest.mark.slow  # 3 rank processes, 80 tiny engines each
def test_three_uneven_ranks_step_as_deepspeed_and_torch(three_rank_runs):
    """World 3 (uneven partitions, odd-sized parameters, a frozen layer): vutrain's ZeRO-1/2 step
    gives DeepSpeed's own weights bit for bit and torch AdamW's over the global batch in fp32,
    clipping off, just under, at and just over the first step's norm, 1 and 2 micro-batches."""
    _check(results_by_rank(three_rank_runs, "uneven ranks"))


def _compare_in_a_group(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return _compare(rank, world, cases)


def test_two_ranks_step_as_deepspeed_and_torch():
    cases = [c for c in CASES if c[2] in (0.0, 0.999, 1.0) and (c[1] == "bf16") == (c[3] == 2)]
    _check(run_distributed(_compare_in_a_group, 2, cases, init_process_group=False, timeout_s=600))


class Tiny(nn.Module):
    """One decayed weight and a 1-element scale: on 3 ranks some partitions hold only padding."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 7))
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.logit_scale = nn.Parameter(torch.tensor([0.3]))

    def forward(self, x, y):
        out = (x @ self.w.T + self.frozen) * self.logit_scale.exp()
        return ((out.float() - y.float()) ** 2).mean()


def _nan_on_last_rank(rank: int, world: int, nan_step: int) -> dict:
    """bf16: a NaN gradient on the last rank only, under a finite loss, against the same run
    whose loss at that step is multiplied by 0 (a zero-gradient step)."""
    from vutrain.engine import build_engine

    out = {}
    for stage in (1, 2):
        for clip in (0.0, 1.0):
            runs = []
            for poison in (True, False):
                torch.manual_seed(0)
                engine = build_engine(Tiny(), _cfg(stage, "bf16", clip, 1), world, torch.device("cpu"))
                for step in range(3):
                    loss = engine(*_batch(step, rank, torch.bfloat16))
                    hook = None
                    if step == nan_step and poison and rank == world - 1:
                        hook = engine.module.w.register_hook(lambda g: g * float("nan"))
                    if step == nan_step and not poison:
                        loss = loss * 0
                    engine.backward(loss)
                    if hook is not None:
                        hook.remove()
                    engine.step()
                runs.append([p.detach().float().clone() for p in engine.module.parameters()])
            out[(stage, clip)] = all(torch.equal(a, b) for a, b in zip(*runs))
    return out


@pytest.mark.slow  # 3 rank processes
def test_nan_gradient_on_one_of_three_ranks_is_a_zero_gradient_step(three_rank_runs):
    for rank, by_case in enumerate(results_by_rank(three_rank_runs, "nan on the last rank")):
        assert all(by_case.values()), f"rank {rank}: {by_case}"
