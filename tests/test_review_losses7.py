"""Losses with tensors made under `torch.inference_mode()` (an eval loop's cached scale, an eval
call on a loss that caches its labels), on one process and on two real gloo ranks."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels' interpreter on CPU, before any import

import pytest
import torch
import torch.nn.functional as F

from vutrain.losses import ClipLoss, SigLipLoss

from helpers_dist import run_distributed

SCALE, BIAS = 7.0, -3.0


def pairs(n: int = 6, dim: int = 5, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=1)
    txt = F.normalize(torch.randn(n, dim, generator=g, dtype=dtype), dim=1)
    return img, txt


def inference_scalars(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return torch.tensor(SCALE, dtype=dtype), torch.tensor(BIAS, dtype=dtype)


def loss_and_grads(loss, img, txt, *scalars) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    value = loss(img, txt, *scalars)
    value.backward()
    return value.detach(), img.grad, txt.grad


CASES = {
    "clip-torch": (lambda: ClipLoss(backend="torch"), False),
    "clip-torch-bias": (lambda: ClipLoss(backend="torch"), True),
    "clip-triton": (lambda: ClipLoss(backend="triton"), False),
    "siglip-torch": (lambda: SigLipLoss(backend="torch"), True),
    "siglip-triton": (lambda: SigLipLoss(backend="triton"), True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_inference_mode_scale_trains_like_a_plain_one_on_every_backend(case):
    make, with_bias = CASES[case]
    img, txt = pairs()
    scale, bias = inference_scalars()
    cached = (scale, bias) if with_bias else (scale,)
    plain = (torch.tensor(SCALE), torch.tensor(BIAS)) if with_bias else (torch.tensor(SCALE),)
    got = loss_and_grads(make(), img, txt, *cached)
    want = loss_and_grads(make(), img, txt, *plain)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("make", [ClipLoss, SigLipLoss], ids=["clip", "siglip"])
def test_cached_labels_of_an_inference_mode_call_do_not_break_training(make):
    img, txt = pairs()
    scalars = (torch.tensor(SCALE), torch.tensor(BIAS))
    loss = make(cache_labels=True)
    with torch.inference_mode():
        evaluated = loss(img, txt, *scalars)
    got = loss_and_grads(loss, img, txt, *scalars)
    want = loss_and_grads(make(), img, txt, *scalars)
    torch.testing.assert_close(got[0], evaluated)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def _rank_losses(rank: int, world: int) -> dict:
    """Every gather mode of both losses, with an inference-mode scale and bias, on this rank's rows."""
    img, txt = pairs(dtype=torch.float64)
    b = img.shape[0] // world
    mine = img[rank * b : (rank + 1) * b], txt[rank * b : (rank + 1) * b]
    scale, bias = inference_scalars(torch.float64)
    out = {}
    for local_loss in (False, True):
        for with_grad in (False, True):
            loss = ClipLoss(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
            out[("clip", local_loss, with_grad)] = loss_and_grads(loss, *mine, scale)
    for bidir in (False, True):
        loss = SigLipLoss(rank=rank, world_size=world, bidir=bidir)
        out[("siglip", bidir)] = loss_and_grads(loss, *mine, scale, bias)
    return out


def _reference(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 loss of one process on the whole batch, and its image-feature gradient."""
    img, txt = pairs(dtype=torch.float64)
    img, txt = img.requires_grad_(), txt.requires_grad_()
    logits = SCALE * img @ txt.T
    if name == "clip":
        labels = torch.arange(img.shape[0])
        value = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    else:
        signs = 2 * torch.eye(img.shape[0], dtype=img.dtype) - 1
        value = -F.logsigmoid(signs * (logits + BIAS)).sum() / img.shape[0]
    value.backward()
    return value.detach(), img.grad


def test_two_ranks_match_the_fp64_global_loss_with_an_inference_mode_scale():
    world = 2
    results = run_distributed(_rank_losses, world)
    for key in results[0]:
        ref_value, ref_grad = _reference(key[0])
        mean = sum(r[key][0] for r in results) / world
        grad = torch.cat([r[key][1] for r in results])
        torch.testing.assert_close(mean, ref_value, msg=str(key))
        if key[0] == "siglip" or key[2]:  # gradients through the gather: W times the global one
            torch.testing.assert_close(grad, world * ref_grad, msg=str(key))
        elif not key[1]:  # constant gather, full matrix: each rank's slice gets the exact gradient
            torch.testing.assert_close(grad, ref_grad, msg=str(key))
