"""vutrain's ClipLoss and SigLipLoss against open_clip's own `loss.py` (the installed code, not a
rewrite of its formulas) on 3 real gloo ranks, rank by rank:

* ClipLoss: every (local_loss, gather_with_grad) combination, with and without a logit bias;
* SigLipLoss: the all-gather and open_clip's neighbour exchange ("bidir"; an odd world of 3 takes
  one hop to both neighbours and no one-way last hop; tests/test_losses_labels.py checks the ring
  against the gather at world 4, whose ring ends with that hop).

Each rank's loss and the gradients of its image and text features, the logit scale and the bias
equal open_clip's in fp64, so a run that swaps open_clip's loss for vutrain's trains the same.
open_clip's `loss.py` is loaded from the installed distribution by file (its package `__init__`
needs torchvision, which the CPU dev machine lacks). One spawn of 3 ranks; about 10 s on 2 idle CPU cores.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from helpers_dist import run_distributed

WORLD, B, D = 3, 3, 5
SCALE, BIAS = 2.5, -1.3
TOL = dict(rtol=1e-10, atol=1e-12)
CLIP_MODES = [
    (local_loss, gather_with_grad, bias)
    for local_loss in (False, True)
    for gather_with_grad in (False, True)
    for bias in (False, True)
]
SIGLIP_IMPLS = ("gather", "bidir")
WHAT = ("loss", "image grad", "text grad", "scale grad", "bias grad")
OPEN_CLIP = importlib.util.find_spec("open_clip")

pytestmark = pytest.mark.skipif(
    OPEN_CLIP is None, reason="open_clip_torch is not installed (make test installs it)"
)


def _open_clip_loss_module():
    """open_clip's `loss.py` on its own: it imports only torch."""
    path = os.path.join(list(OPEN_CLIP.submodule_search_locations)[0], "loss.py")
    spec = importlib.util.spec_from_file_location("open_clip_loss_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _loss_and_grads(fn, img: torch.Tensor, txt: torch.Tensor, with_bias: bool) -> list[torch.Tensor]:
    """[loss, d/d img, d/d txt, d/d scale, d/d bias] of one call on fresh leaves."""
    x, y = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(BIAS, dtype=torch.float64, requires_grad=True)
    loss = fn(x, y, scale, bias if with_bias else None)
    loss.backward()
    bias_grad = bias.grad if bias.grad is not None else torch.zeros(())
    return [loss.detach(), x.grad, y.grad, scale.grad, bias_grad]


def _both_losses(rank: int, world: int, img: torch.Tensor, txt: torch.Tensor) -> dict:
    """Per case: (vutrain's [loss, grads...], open_clip's) on this rank's rows."""
    from vutrain.losses import ClipLoss, SigLipLoss

    open_clip_loss = _open_clip_loss_module()
    mine, theirs = img[rank * B : (rank + 1) * B], txt[rank * B : (rank + 1) * B]
    out = {}
    for local_loss, gather_with_grad, bias in CLIP_MODES:
        kw = dict(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank, world_size=world)
        out[("clip", local_loss, gather_with_grad, bias)] = (
            _loss_and_grads(ClipLoss(**kw), mine, theirs, bias),
            _loss_and_grads(open_clip_loss.ClipLoss(**kw), mine, theirs, bias),
        )
    for impl in SIGLIP_IMPLS:
        kw = dict(rank=rank, world_size=world, dist_impl=impl)
        out[("siglip", impl)] = (
            _loss_and_grads(SigLipLoss(**kw), mine, theirs, True),
            _loss_and_grads(open_clip_loss.SigLipLoss(**kw), mine, theirs, True),
        )
    return out


@pytest.fixture(scope="module")
def per_rank():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=1)
    return run_distributed(_both_losses, WORLD, img, txt)


def _assert_same(per_rank: list[dict], key: tuple) -> None:
    for rank, out in enumerate(per_rank):
        ours, open_clips = out[key]
        for what, a, b in zip(WHAT, ours, open_clips):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, r=rank, w=what: f"rank {r} {w}: {m}")


@pytest.mark.parametrize(
    "local_loss, gather_with_grad, bias",
    CLIP_MODES,
    ids=[f"local{int(a)}-gwg{int(b)}-bias{int(c)}" for a, b, c in CLIP_MODES],
)
def test_clip_loss_equals_open_clips_on_every_rank(per_rank, local_loss, gather_with_grad, bias):
    _assert_same(per_rank, ("clip", local_loss, gather_with_grad, bias))


@pytest.mark.parametrize("impl", SIGLIP_IMPLS)
def test_siglip_loss_equals_open_clips_on_every_rank(per_rank, impl):
    _assert_same(per_rank, ("siglip", impl))
