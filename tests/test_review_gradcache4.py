"""GradCache on 2 real gloo ranks against an fp64 whole-step reference, where a serious user goes:
dropout in both towers (the replayed forward must draw the phase-1 masks), micro-batches of 1 row,
SigLIP with its bias (one-way and bidirectional ring), class and tag-set positives, and a tower
run under `torch.no_grad()` (locked, its features constants).

The reference runs the same micro-batch forwards with autograd from the same seed (so the same
dropout masks), concatenates them and backpropagates one loss: GradCache's loss and every
parameter gradient (towers, logit scale, bias) must equal it on each rank, and the RNG must end
where that reference leaves it. One spawn of 2 ranks; about 15 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_dist import run_distributed

WORLD, IN, D = 2, 6, 4
TOL64 = dict(rtol=1e-9, atol=1e-12)


class DropoutTowers(nn.Module):
    """Two MLP towers with dropout; `lock_text` runs the text tower under torch.no_grad()."""

    def __init__(self, lock_text: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Sequential(nn.Linear(IN, 8), nn.Dropout(0.3), nn.Linear(8, D))
        self.text = nn.Sequential(nn.Linear(IN, 8), nn.Dropout(0.3), nn.Linear(8, D))
        self.logit_scale = nn.Parameter(torch.tensor(1.2))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0))
        self.lock_text = lock_text

    def forward(self, x, y):
        img = F.normalize(self.image(x), dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.lock_text):
            txt = F.normalize(self.text(y), dim=-1)
        return img, txt, self.logit_scale.exp(), self.logit_bias


class GradsOnly:
    """engine.backward/step without an optimizer, so the accumulated gradients can be compared."""

    def __init__(self, k: int):
        self.k = k

    def gradient_accumulation_steps(self):
        return self.k

    def backward(self, loss, scale_wrt_gas=True):
        (loss / self.k if scale_wrt_gas else loss).backward()

    def step(self):
        pass


def _classes(rank):
    return torch.tensor([0, 1, -1, 0]) if rank == 0 else torch.tensor([1, 2, 2, -1])


def _tag_sets(rank):
    if rank == 0:
        return torch.tensor([[0, 5], [1, -1], [-1, -1], [0, 1]])
    return torch.tensor([[1, -1], [2, 5], [2, -1], [-1, -1]])


# (id, micro-batch sizes per rank, loss name, build_loss kwargs, labels of a rank, lock_text)
CASES = [
    ("clip-dropout-micro2", [2, 2, 2], "clip", {}, None, False),
    ("clip-micro1", [1, 1, 1, 1], "clip", {}, None, False),
    ("siglip-bias-3+2", [3, 2], "siglip", {}, None, False),
    ("siglip-bidir-bias-micro1", [1, 1, 1], "siglip", dict(bidir=True), None, False),
    ("clip-class-positives", [2, 2], "clip", {}, _classes, False),
    ("siglip-tag-positives", [1, 3], "siglip", {}, _tag_sets, False),
    ("clip-no-grad-text-tower", [2, 2], "clip", {}, None, True),
    ("siglip-no-grad-text-tower", [2, 1], "siglip", {}, None, True),
]


def _grads(model):
    return {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _case(rank, world, sizes, name, kw, labels, lock_text):
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import build_loss

    g = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(sum(sizes), IN, generator=g, dtype=torch.float64)
    y = torch.randn(sum(sizes), IN, generator=g, dtype=torch.float64)
    micro = list(zip(x.split(sizes), y.split(sizes)))
    loss_fn = build_loss(name, rank=rank, world_size=world, **kw)
    extra = {"labels": labels(rank)} if labels else {}

    model = DropoutTowers(lock_text).double().train()
    torch.manual_seed(123)
    got = gradcache_step(
        GradsOnly(len(sizes)), micro, lambda mb: model(*mb), lambda i, t, s, b: loss_fn(i, t, s, b, **extra)
    )
    rng_after_gradcache = torch.rand(4)

    ref = DropoutTowers(lock_text).double().train()
    torch.manual_seed(123)
    outs = [ref(*mb) for mb in micro]
    want = loss_fn(torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), *outs[-1][2:], **extra)
    want.backward()
    return got, want.detach(), _grads(model), _grads(ref), rng_after_gradcache, torch.rand(4)


def _world2(rank, world):
    return [_case(rank, world, *case[1:]) for case in CASES]


@pytest.fixture(scope="module")
def results():
    return run_distributed(_world2, WORLD)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[0] for c in CASES])
def test_gradcache_equals_the_whole_step_on_two_ranks(results, case):
    """Each rank: GradCache's loss and every parameter gradient == the fp64 whole-step reference
    with the same dropout masks; the RNG ends as after one forward per micro-batch."""
    for rank in range(WORLD):
        got, want, grads, ref_grads, rng_got, rng_want = results[rank][case]
        torch.testing.assert_close(got, want, **TOL64)
        assert torch.isfinite(want)
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], **TOL64, msg=f"rank {rank}: {name}")
        assert ref_grads["image.0.weight"].abs().sum() > 0
        assert ref_grads["logit_scale"].abs() > 0
        torch.testing.assert_close(rng_got, rng_want, rtol=0, atol=0)


def test_the_locked_tower_gets_no_gradient(results):
    """Under torch.no_grad() the text tower's features are constants: nothing reaches its weights."""
    for case, (_, *_, lock_text) in enumerate(CASES):
        if lock_text:
            for rank in range(WORLD):
                assert all(
                    v.abs().sum() == 0 for k, v in results[rank][case][2].items() if k.startswith("text.")
                )
