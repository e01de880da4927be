"""The LR schedule, the clip and a NaN gradient where earlier tests did not look, with real
DeepSpeed engines (`vutrain.engine.build_engine`) on CPU ranks (gloo).

- A resume in the middle of the warm-up continues the schedule and the weights bit for bit, at
  ZeRO-0 (bf16: DeepSpeed's own fp16/bf16 wrapper; fp32), ZeRO-1 with 2 micro-batches per step,
  ZeRO-2 in bf16 and ZeRO-3; every LR is `train.lr x lr_lambda(step)`.
- In bf16 and amp_bf16 (test_review_optim3.py: fp32 only), at every stage on 2 ranks with 2
  micro-batches each: the norm DeepSpeed clips with is the fp64 norm of the gradient of the global
  batch's mean loss (to bf16 precision), and AdamW sees min(norm, clip) (clipped once).
- ZeRO-0 in bf16 (test_review_optim4.py: fp32 and amp_bf16 only): a NaN gradient on rank 0 only,
  under a finite loss, skips that step on both ranks together: the weights do not move, stay
  finite and equal on both ranks, DeepSpeed counts one skipped step, and the next step trains.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny_modules import PoisonGrad
from torch import nn

from helpers_dist import run_distributed

LR, WARMUP, MAX_STEPS, RESUME_AT, STOP = 0.05, 5, 8, 2, 6
MICRO, ACCUM, CLIP = 3, 2, 0.2
RESUME_CASES = ((0, "bf16", 1), (0, "fp32", 1), (1, "fp32", 2), (2, "bf16", 1), (3, "fp32", 1))
CLIP_CASES = ((0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (1, "amp_bf16"), (3, "amp_bf16"))


class _Net(nn.Module):
    """Odd sizes (ZeRO pads the partitions), a norm, a logit-scale-like scalar, a NaN switch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.b = nn.Linear(7, 3)
        self.logit_scale = nn.Parameter(torch.full([1], 0.5))
        self.poison = False

    def forward(self, x, y):
        h = PoisonGrad.apply(self.norm(self.a(x)), self.poison)
        return ((self.b(h) * self.logit_scale - y).float() ** 2).mean()


def _dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32  # amp_bf16: fp32 in, autocast


def _batch(seed: int, n: int, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=gen) * 3, torch.randn(n, 3, generator=gen)
    return x.to(_dtype(precision)), y.to(_dtype(precision))


def _weights(engine) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in engine.module.parameters()]


def _resume_runs(rank: int, world: int, ckpt_dir: str) -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    out = {}
    for stage, precision, accum in RESUME_CASES:
        cfg = TrainConfig(
            micro_batch_size=4, grad_accum_steps=accum, zero_stage=stage, precision=precision,
            lr=LR, warmup_steps=WARMUP, max_steps=MAX_STEPS, weight_decay=0.3,
        )  # fmt: skip
        tag = f"{stage}-{precision}"

        def steps(start: int, stop: int, load: bool = False, save: bool = False, cfg=cfg, tag=tag):
            torch.manual_seed(0)
            engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
            if load:
                engine.load_checkpoint(ckpt_dir, tag=tag)
            lrs = []
            for step in range(start, stop):
                lrs.append(engine.get_lr()[0])
                for micro in range(cfg.grad_accum_steps):
                    engine.backward(engine(*_batch(step * 10 + micro, 4, cfg.precision)))
                    engine.step()
            if save:
                engine.save_checkpoint(ckpt_dir, tag=tag)
            return {"lrs": lrs, "weights": _weights(engine)}

        whole = steps(0, STOP)
        steps(0, RESUME_AT, save=True)
        out[stage, precision] = {"whole": whole, "resumed": steps(RESUME_AT, STOP, load=True)}
    return out


def test_resume_mid_warmup_continues_the_schedule_and_weights_exactly(tmp_path):
    """warm-up 5 of 8 steps, resumed after step 2 (mid warm-up): the resumed run's LRs and final
    weights equal those of the unbroken run, bit for bit, and every LR is lr x lr_lambda(step)."""
    from vutrain.config import TrainConfig
    from vutrain.optim import lr_lambda

    schedule = TrainConfig(warmup_steps=WARMUP, max_steps=MAX_STEPS)
    expected = [LR * lr_lambda(s, schedule) for s in range(STOP)]
    assert expected[RESUME_AT] < LR  # the premise: the resume is inside the warm-up
    out = run_distributed(_resume_runs, 1, str(tmp_path))[0]
    for key, runs in out.items():
        assert runs["whole"]["lrs"] == pytest.approx(expected, rel=1e-12), key
        assert runs["resumed"]["lrs"] == runs["whole"]["lrs"][RESUME_AT:], key
        for got, want in zip(runs["resumed"]["weights"], runs["whole"]["weights"]):
            assert torch.equal(got, want), key


def test_schedule_edges():
    """warm-up 0 starts at the peak; a warm-up longer than the run rises linearly for the whole run;
    the cosine reaches train.min_lr_ratio at train.max_steps and stays there."""
    from vutrain.config import TrainConfig
    from vutrain.optim import lr_lambda

    none = TrainConfig(warmup_steps=0, max_steps=4, min_lr_ratio=0.25)
    assert [lr_lambda(s, none) for s in range(5)] == pytest.approx(
        [0.25 + 0.75 * 0.5 * (1 + math.cos(math.pi * s / 4)) for s in range(5)]
    )
    assert lr_lambda(0, none) == 1.0 and lr_lambda(9, none) == pytest.approx(0.25)
    long = TrainConfig(warmup_steps=10, max_steps=4, min_lr_ratio=0.25)
    assert [lr_lambda(s, long) for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.4])


def _global_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _batch(123, world * ACCUM * MICRO, "fp32")


def _reference_norm(world: int) -> float:
    """fp64, one process, the mean loss over the whole global batch."""
    torch.manual_seed(0)
    net = _Net().double()
    x, y = _global_batch(world)
    net(x.double(), y.double()).backward()
    return math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net.parameters()))


def _clip_run(rank: int, world: int, stage: int, precision: str) -> dict:
    import torch.distributed as dist

    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    x, y = _global_batch(world)
    mine = slice(rank * ACCUM * MICRO, (rank + 1) * ACCUM * MICRO)
    x, y = x[mine].to(_dtype(precision)), y[mine].to(_dtype(precision))
    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=MICRO, grad_accum_steps=ACCUM, zero_stage=stage, precision=precision,
        warmup_steps=0, grad_clip=CLIP,
    )  # fmt: skip
    engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    seen = torch.zeros((), dtype=torch.float64)

    def add_clipped(optimizer, args, kwargs):
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
    return {"norm": float(engine.get_global_grad_norm()), "clipped": math.sqrt(float(seen))}


def _nan_at_zero0_bf16(rank: int, world: int) -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = TrainConfig(
        micro_batch_size=4, zero_stage=0, precision="bf16", lr=LR, warmup_steps=0, grad_clip=CLIP
    )  # an LR whose updates show in bf16 weights
    engine = build_engine(_Net(), cfg, world, torch.device("cpu"))
    after, losses = [], []
    for step in range(3):
        engine.module.poison = step == 1 and rank == 0
        loss = engine(*_batch(step * world + rank, 4, "bf16"))
        losses.append(float(loss))
        engine.backward(loss)
        engine.step()
        after.append(_weights(engine))
    return {"after": after, "losses": losses, "skipped": engine.skipped_steps}


def _two_rank_runs(rank: int, world: int) -> dict:
    """Every 2-rank run of this file in one pair of processes (spawning and imports dominate)."""
    clips = {case: _clip_run(rank, world, *case) for case in CLIP_CASES}
    return {"clips": clips, "nan": _nan_at_zero0_bf16(rank, world)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_distributed(_two_rank_runs, 2)


def test_bf16_clip_norm_is_the_global_batch_gradients_norm_at_every_stage(two_ranks):
    """bf16 at ZeRO-0/1/2/3 and amp_bf16 at ZeRO-1/3, 2 ranks x 2 micro-batches: DeepSpeed's norm is
    the fp64 norm of the global batch's mean-loss gradient to bf16 precision (1%), the same on both
    ranks, and AdamW sees the gradient clipped once to train.grad_clip."""
    expected = _reference_norm(2)
    assert expected > 2 * CLIP  # it clips
    for case in CLIP_CASES:
        mine, theirs = two_ranks[0]["clips"][case], two_ranks[1]["clips"][case]
        assert mine == theirs, case
        assert mine["norm"] == pytest.approx(expected, rel=1e-2), case
        assert mine["clipped"] == pytest.approx(CLIP, rel=1e-4), case


def test_zero0_bf16_nan_gradient_skips_the_step_on_every_rank(two_ranks):
    """ZeRO-0 bf16, rank 0's gradient NaN at step 1 under a finite loss: both ranks skip that step
    (weights unchanged, finite, equal across ranks, one skipped step counted) and step 2 trains."""
    mine, theirs = two_ranks[0]["nan"], two_ranks[1]["nan"]
    assert all(math.isfinite(v) for v in mine["losses"])  # the premise: a finite loss
    assert mine["skipped"] == theirs["skipped"] == 1
    for step in range(3):
        for a, b in zip(mine["after"][step], theirs["after"][step]):
            assert torch.isfinite(a).all() and torch.equal(a, b), step
    assert all(torch.equal(a, b) for a, b in zip(mine["after"][0], mine["after"][1]))
    assert all(not torch.equal(a, b) for a, b in zip(mine["after"][1], mine["after"][2]))
