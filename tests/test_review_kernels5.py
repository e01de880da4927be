"""Review of the kernels (fifth round): features made under ``torch.inference_mode()`` (an eval
loop's) with a logit scale (and bias) that requires grad. The ops' ``save_for_backward`` raised
"Inference tensors cannot be saved for backward" where the torch reference returned the loss and
the scale's gradient. Also checks ragged shapes, a rank offset and strided views against fp64.
Runs the Triton interpreter on CPU; expected runtime: ~4 s."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import kernels
from kernels import reference
from kernels.runtime import interpreting

N, M, D, OFFSET = 5, 9, 7, 3
SCALE, BIAS = 6.0, -2.0


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _loss(op: str, q, k, s, b):
    if op == "contrastive_ce":
        return kernels.contrastive_ce(q, k, s, label_offset=OFFSET)
    if op == "clip_loss":
        return kernels.clip_loss(q, k[:N], s)
    return kernels.sigmoid_loss(q, k, s, b, label_offset=OFFSET)


def _oracle(op: str, q, k, s, b):
    q, k = q.double(), k.double()
    if op == "contrastive_ce":
        return reference.contrastive_ce_reference(q, k, s, label_offset=OFFSET)
    if op == "clip_loss":
        return reference.clip_loss_reference(q, k[:N], s)
    return reference.sigmoid_loss_reference(q, k, s, b, label_offset=OFFSET)


def _params():
    return (torch.tensor(SCALE, requires_grad=True), torch.tensor(BIAS, requires_grad=True))


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before Triton's import")
@pytest.mark.parametrize("op", ["contrastive_ce", "clip_loss", "sigmoid_loss"])
def test_inference_mode_features_with_a_learnable_scale(op):
    with torch.inference_mode():
        q, k = _features(N, D, 0), _features(M, D, 1)
    s, b = _params()
    loss = _loss(op, q, k, s, b)
    loss.backward()
    s64, b64 = (torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (SCALE, BIAS))
    want = _oracle(op, q.clone(), k.clone(), s64, b64)
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert s.grad.item() == pytest.approx(s64.grad.item(), rel=1e-4, abs=1e-6)
    if op == "sigmoid_loss":
        assert b.grad.item() == pytest.approx(b64.grad.item(), rel=1e-4, abs=1e-6)


@pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before Triton's import")
@pytest.mark.parametrize("op", ["contrastive_ce", "sigmoid_loss"])
def test_strided_views_with_a_rank_offset_match_fp64(op):
    # Every column of a wider buffer but the first, rows from an offset: no contiguous input.
    buf = torch.cat([_features(M + 2, D, 2), _features(M + 2, D, 3)], dim=1)
    q = buf[2 : 2 + N, 1 : 1 + D].detach().requires_grad_()
    k = buf[1 : 1 + M, D:].t().contiguous().t().detach().requires_grad_()
    s, b = _params()
    loss = _loss(op, q, k, s, b)
    got = torch.autograd.grad(loss, (q, k, s, b) if op == "sigmoid_loss" else (q, k, s))
    leaves = [t.detach().double().requires_grad_() for t in (q, k, s, b)]
    want_loss = _oracle(op, *leaves)
    want = torch.autograd.grad(want_loss, leaves[: len(got)])
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6)
