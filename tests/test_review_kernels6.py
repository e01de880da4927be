"""Review of the kernels (sixth round): the ops under ``torch.func`` transforms (``grad``, ``vmap``).
The Triton path failed with "it must override the setup_context staticmethod" (a change the
caller cannot make) where the torch fallback worked; now a transform takes the reference, which
gives the kernels' values. Runs the Triton interpreter on CPU; expected runtime: ~3 s."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

import kernels
from kernels.runtime import interpreting

N, M, D, OFFSET = 4, 7, 6, 2
SCALE, BIAS = 6.0, -2.0
OPS = ["contrastive_ce", "clip_loss", "sigmoid_loss"]

pytestmark = pytest.mark.skipif(not interpreting(), reason="needs TRITON_INTERPRET=1 before Triton's import")


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=1, keepdim=True)


def _loss(op: str, q, k, s):
    if op == "contrastive_ce":
        return kernels.contrastive_ce(q, k, s, label_offset=OFFSET)
    if op == "clip_loss":
        return kernels.clip_loss(q, k[:N], s)
    return kernels.sigmoid_loss(q, k, s, BIAS, label_offset=OFFSET)


@pytest.mark.parametrize("op", OPS)
def test_torch_func_grad_gives_the_gradients_of_plain_autograd(op):
    q, k = _features(N, D, 0), _features(M, D, 1)
    scale = torch.tensor(SCALE)
    dq, dscale = torch.func.grad(lambda a, s: _loss(op, a, k, s), argnums=(0, 1))(q, scale)

    q_leaf, s_leaf = q.clone().requires_grad_(), scale.clone().requires_grad_()
    want_dq, want_dscale = torch.autograd.grad(_loss(op, q_leaf, k, s_leaf), [q_leaf, s_leaf])
    torch.testing.assert_close(dq, want_dq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dscale, want_dscale, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", OPS)
def test_vmap_over_query_sets_gives_each_set_its_own_loss(op):
    batch = torch.stack([_features(N, D, seed) for seed in (2, 3, 4)])
    k = _features(M, D, 1)
    got = torch.vmap(lambda a: _loss(op, a, k, SCALE))(batch)
    want = torch.stack([_loss(op, a, k, SCALE) for a in batch])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
