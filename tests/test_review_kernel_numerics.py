"""The fused losses at the extremes a CLIP or SigLIP run reaches, against fp64 losses written
here from their definitions (not ``kernels.reference``, which runs in the inputs' dtype).

Runs the real Triton kernels in the interpreter (fp32 and fp16 only: the interpreter upcasts
bf16 at load, so bf16 accuracy is for the GPU tests).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest
import torch

import kernels
from kernels.runtime import interpreting

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs the Triton interpreter")

# Relative to the oracle's largest magnitude: fp32 accumulation noise; fp16 gradients are
# rounded to fp16 (2^-11) on the way out.
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3}


def features(n: int, d: int, norm: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return x / x.norm(dim=1, keepdim=True) * norm


def ce_fp64(q, k, s, off=0):
    x = s * q @ k.T
    rows = torch.arange(q.shape[0])
    return (torch.logsumexp(x, 1) - x[rows, rows + off]).mean()


def clip_fp64(q, k, s):
    x = s * q @ k.T
    diag = x.diagonal()
    return ((torch.logsumexp(x, 1) - diag).mean() + (torch.logsumexp(x, 0) - diag).mean()) / 2


def sigmoid_fp64(q, k, s, b, off=0):
    x = s * q @ k.T + b
    z = -torch.ones_like(x)
    rows = torch.arange(q.shape[0])
    z[rows, rows + off] = 1
    return torch.logaddexp(torch.zeros_like(x), -z * x).sum() / q.shape[0]  # log(1 + e^(-z x))


def compare(op, oracle, q, k, scalars, dtype):
    """Loss and every gradient of ``op`` (inputs in ``dtype``) against ``oracle`` in fp64 on the
    very same (rounded) values; returns the fp64 loss."""
    ours = [q.to(dtype), k.to(dtype)] + [torch.tensor(float(v)) for v in scalars]
    ours = [t.requires_grad_() for t in ours]
    exact = [t.detach().double().requires_grad_() for t in ours]
    loss = op(*ours)
    loss.backward()
    want = oracle(*exact)
    want.backward()
    assert torch.isfinite(want), "the set-up should keep the exact loss finite"
    assert torch.isfinite(loss), f"loss {loss.item()} where the exact loss is {want.item():.6g}"
    assert abs(loss.item() - want.item()) <= 1e-6 * abs(want.item()) + 1e-6, (loss.item(), want.item())
    names = ["d_queries", "d_keys", "d_scale", "d_bias"]
    for name, a, b in zip(names, ours, exact):
        assert torch.isfinite(a.grad).all(), f"{name} not finite"
        err = (a.grad.double() - b.grad).abs().max().item()
        largest = b.grad.abs().max().item()
        tol = GRAD_TOL[dtype] if a.dim() else 1e-5  # the scalars' gradients are fp32 sums
        assert err <= tol * largest + 1e-12, f"{name}: error {err:.3g} vs largest {largest:.3g}"
    return want.item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [1.0, 1000.0])
def test_scale_100_unit_and_unnormalised_features_match_fp64(dtype, norm):
    # Unit norm at CLIP's clamp: logits up to +-100. Norm 1000: logits up to 1e8, far past
    # fp16's 65504, so the fp16 run only stays finite if tiles accumulate in fp32 and the
    # log-sum-exp keeps a true running max. N=37, M=70 are ragged against the 32-wide tiles,
    # D=45 against BD=32, and the labels end at the last column (label_offset + N == M).
    q, k = features(37, 45, norm, seed=1), features(70, 45, norm, seed=2)
    off = 70 - 37
    loss = compare(
        lambda a, b, s: kernels.contrastive_ce(a, b, s, label_offset=off),
        lambda a, b, s: ce_fp64(a, b, s, off),
        q,
        k,
        [100.0],
        dtype,
    )
    if norm > 1:
        assert loss > 65504, "the set-up should put logits beyond fp16's range"
    compare(kernels.clip_loss, clip_fp64, q, k[:37], [100.0], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [-10.0, 1e4, -1e4])
def test_sigmoid_loss_at_large_logits_of_both_signs_matches_fp64(dtype, bias):
    # SigLIP's init (scale 10, bias -10) on unnormalised features: logits of +-1e4 and beyond,
    # where a plain log(1 + exp(x)) is inf and sigmoid(x) - 1 cancels to 0.
    q, k = features(33, 20, 100.0, seed=3), features(64, 20, 100.0, seed=4)
    off = 64 - 33
    compare(
        lambda a, b, s, c: kernels.sigmoid_loss(a, b, s, c, label_offset=off),
        lambda a, b, s, c: sigmoid_fp64(a, b, s, c, off),
        q,
        k,
        [10.0, bias],
        dtype,
    )
    with torch.no_grad():  # the forward-only kernel (no gradient pass)
        got = kernels.sigmoid_loss(q.float(), k.float(), 10.0, bias, label_offset=off).item()
    want = sigmoid_fp64(q.float().double(), k.float().double(), 10.0, bias, off).item()
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_degenerate_inputs_match_fp64(dtype):
    # D = 1; a side of zero features (all logits equal, P uniform); every key the same vector.
    q1, k1 = features(33, 1, 1.0, seed=5), features(65, 1, 1.0, seed=6)
    ce = (
        lambda a, b, s: kernels.contrastive_ce(a, b, s, label_offset=32),
        lambda a, b, s: ce_fp64(a, b, s, 32),
    )
    compare(*ce, q1, k1, [100.0], dtype)
    zeros = torch.zeros(33, 8, dtype=torch.float64)
    compare(*ce, zeros, features(65, 8, 1.0, seed=7), [100.0], dtype)
    compare(
        kernels.clip_loss,
        clip_fp64,
        features(20, 8, 1.0, seed=8),
        features(1, 8, 1.0, seed=9).repeat(20, 1),
        [100.0],
        dtype,
    )
    sig = (kernels.sigmoid_loss, sigmoid_fp64)
    compare(*sig, zeros[:20], features(20, 8, 1.0, seed=10), [10.0, -10.0], dtype)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_feature_makes_the_loss_non_finite_as_in_eager_torch(bad):
    # The trainer's guard skips a micro-batch on a non-finite loss; a finite loss from a NaN or
    # inf feature would train on garbage. (The gradients are then garbage too, as in eager.)
    q, k = features(40, 16, 1.0, seed=11).float(), features(40, 16, 1.0, seed=12).float()
    q[3, 2] = bad
    for dtype in (torch.float32, torch.float16):
        a, b = q.to(dtype), k.to(dtype)
        assert not torch.isfinite(kernels.contrastive_ce(a, b, 100.0))
        assert not torch.isfinite(kernels.contrastive_ce(b, a, 100.0))  # the bad row as a key
        assert not torch.isfinite(kernels.clip_loss(a, b, 100.0))
        assert not torch.isfinite(kernels.sigmoid_loss(a, b, 10.0, -10.0))
        assert not torch.isfinite(kernels.sigmoid_loss(b, a, 10.0, -10.0))


def test_scale_shapes_and_frozen_towers_change_no_bit():
    # A 0-dim, [1] or [1, 1] scale and bias, and either tower frozen, give the same bits as
    # the full run (two runs are also bitwise equal: every partial has one writer).
    q, k = features(40, 20, 3.0, seed=13).float(), features(70, 20, 3.0, seed=14).float()
    ops = [
        lambda a, b, s, c: kernels.contrastive_ce(a, b, s, label_offset=30),
        lambda a, b, s, c: kernels.sigmoid_loss(a, b, s, c, label_offset=30),
        lambda a, b, s, c: kernels.clip_loss(a, b[:40], s),
    ]
    for op in ops:
        runs = []
        for shape, frozen in (((), None), ((), None), ((1,), "q"), ((1, 1), "k")):
            a, b = q.clone().requires_grad_(frozen != "q"), k.clone().requires_grad_(frozen != "k")
            s, c = torch.full(shape, 30.0, requires_grad=True), torch.full(shape, -10.0, requires_grad=True)
            loss = op(a, b, s, c)
            loss.backward()
            assert s.grad.shape == s.shape
            runs.append((loss.detach(), a.grad, b.grad, s.grad.reshape(()), c.grad))
        full = runs[0]
        for run in runs[1:]:
            for x, y in zip(run, full):
                if x is not None and y is not None:
                    assert torch.equal(x.reshape(y.shape), y)
