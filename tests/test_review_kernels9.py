"""Review 9 of the Triton loss ops under the interpreter: contrastive_ce and sigmoid_loss against an
fp64 torch oracle written here (not kernels.reference), forward and backward in every input, on
the shapes a gathered run produces and on the edges: untiled N, M and D, D < 16, N = 1, M = 1, the
last valid label_offset, extreme scales and biases, 16-bit inputs, partial requires_grad and
bitwise repeatability. No bug was found; these pin the behaviour the review checked."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.runtime import use_triton

pytestmark = pytest.mark.skipif(
    not use_triton(torch.zeros(1, 1)), reason="needs the Triton interpreter (TRITON_INTERPRET=1)"
)


def oracle(op, q, k, scale, bias, offset):
    """The loss in fp64 from the definitions (open_clip's ClipLoss direction and SigLipLoss)."""
    logits = scale * (q @ k.T)
    labels = torch.arange(q.shape[0]) + offset
    if op == "ce":
        return F.cross_entropy(logits, labels)
    signs = -torch.ones_like(logits)
    signs[torch.arange(q.shape[0]), labels] = 1
    return -F.logsigmoid(signs * (logits + bias)).sum() / q.shape[0]


def kernel_loss(op, q, k, scale, bias, offset):
    if op == "ce":
        return kernels.contrastive_ce(q, k, scale, label_offset=offset)
    return kernels.sigmoid_loss(q, k, scale, bias, label_offset=offset)


def loss_and_grads(op, q, k, scale, bias, offset, *, dtype=torch.float32):
    """(loss, grads of q, k, scale[, bias]) from the op and from the fp64 oracle on the same values."""
    leaves = [q.to(dtype), k.to(dtype), torch.tensor(scale), torch.tensor(bias)]
    if op == "ce":
        leaves = leaves[:3]
    got = [t.clone().requires_grad_() for t in leaves]
    want = [t.double().requires_grad_() for t in leaves]
    loss = kernel_loss(op, *got, *([None] if op == "ce" else []), offset)
    ref = oracle(op, *want, *([0.0] if op == "ce" else []), offset)
    return (loss, torch.autograd.grad(loss, got)), (ref, torch.autograd.grad(ref, want))


def assert_close(got, want, rtol):
    (loss, grads), (ref, ref_grads) = got, want
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - ref.item()) <= rtol * max(1.0, abs(ref.item()))
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        assert (g.double() - r).abs().max() <= rtol * max(r.abs().max().item(), 1e-30)


def features(n, m, d, seed=0, norm=True):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    return (F.normalize(q, dim=-1), F.normalize(k, dim=-1)) if norm else (q, k)


@pytest.mark.parametrize("op", ["ce", "sig"])
@pytest.mark.parametrize(
    ("n", "m", "d", "offset"),
    [
        (1, 1, 3, 0),  # one pair
        (1, 7, 20, 6),  # N = 1, the last valid offset
        (7, 21, 33, 14),  # gathered keys (rank 2 of 3), nothing a multiple of a tile
        (70, 70, 1, 0),  # D = 1
        (33, 100, 17, 67),  # the last valid offset, untiled
        (4, 700, 16, 696),  # a small local N against many keys: the forward splits its columns
    ],
)
def test_ops_match_an_fp64_oracle_on_real_and_edge_shapes(op, n, m, d, offset):
    q, k = features(n, m, d)
    assert_close(*loss_and_grads(op, q, k, 10.0, -10.0, offset), rtol=2e-6)
    with torch.no_grad():  # the forward-only kernels (no gradients wanted) too
        loss = kernel_loss(op, q, k, 10.0, -10.0, offset)
    ref = oracle(op, q.double(), k.double(), 10.0, -10.0, offset)
    assert abs(loss.item() - ref.item()) <= 2e-6 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("op", ["ce", "sig"])
@pytest.mark.parametrize(("scale", "bias"), [(1e4, -10.0), (1e4, 10.0), (1e-6, -10.0), (100.0, 10.0)])
def test_extreme_scales_and_biases_give_finite_exact_losses(op, scale, bias):
    """A scale of 1e4 (100x the training clamp) on unnormalised features is still a finite loss
    with the oracle's value and gradients, not inf or NaN."""
    q, k = features(9, 30, 8, norm=False)
    assert_close(*loss_and_grads(op, q, k, scale, bias, 9), rtol=2e-6)


@pytest.mark.parametrize("op", ["ce", "sig"])
@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float16, 3e-3), (torch.bfloat16, 3e-2)])
def test_16_bit_inputs_match_the_oracle_of_their_rounded_values(op, dtype, rtol):
    q, k = features(17, 40, 24)
    assert_close(*loss_and_grads(op, q, k, 10.0, -10.0, 20, dtype=dtype), rtol=rtol)


@pytest.mark.parametrize("op", ["ce", "sig"])
@pytest.mark.parametrize("offset", [22, -1])
def test_an_offset_past_the_last_valid_one_is_one_clear_error(op, offset):
    q, k = features(9, 30, 8)
    with pytest.raises(ValueError, match=r"must lie in \[0, 21\]"):
        kernel_loss(op, q, k, 10.0, -10.0, offset)


@pytest.mark.parametrize("op", ["ce", "sig"])
def test_transposed_sliced_and_shared_storage_inputs_match_the_oracle(op):
    base = F.normalize(torch.randn(40, 12, generator=torch.Generator().manual_seed(0)), dim=-1).T.contiguous()
    q, k = base.T[10:18], base.T  # non-contiguous views; the queries are rows of the keys
    assert not q.is_contiguous() and not k.is_contiguous()
    assert_close(*loss_and_grads(op, q, k, 7.0, -3.0, 10), rtol=2e-6)


@pytest.mark.parametrize("wanted", [(0,), (1,), (2,), (3,), (0, 3)])
def test_sigmoid_gradients_with_only_some_inputs_requiring_them(wanted):
    q, k = features(9, 20, 12)
    leaves = [q, k, torch.tensor(10.0), torch.tensor(-10.0)]
    got = [t.clone().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    want = [t.double().requires_grad_(i in wanted) for i, t in enumerate(leaves)]
    grads = torch.autograd.grad(3 * kernels.sigmoid_loss(*got, label_offset=3), [got[i] for i in wanted])
    ref = torch.autograd.grad(3 * oracle("sig", *want, 3), [want[i] for i in wanted])
    for g, r in zip(grads, ref):
        assert g.dtype == torch.float32
        assert (g.double() - r).abs().max() <= 2e-6 * r.abs().max()


@pytest.mark.parametrize("op", ["ce", "sig"])
def test_double_backward_is_a_clear_error(op):
    q, k = features(5, 9, 8)
    q.requires_grad_()
    loss = kernel_loss(op, q, k, 10.0, -10.0, 2)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, q, create_graph=True)


@pytest.mark.parametrize("op", ["ce", "sig"])
def test_the_same_call_twice_is_bitwise_identical(op):
    q, k = features(40, 200, 24)
    runs = [loss_and_grads(op, q, k, 10.0, -10.0, 160)[0] for _ in range(2)]
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))
