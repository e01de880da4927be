"""Shared by the SigLIP kernel tests (test_kernels_sigmoid.py, test_review_kernels10.py): open_clip's
loss written out in fp64 (an oracle that does not go through kernels.reference), the loss and its
four gradients of any implementation, and the comparison of two such lists. Imports neither Triton
nor `kernels`, so a test can set TRITON_INTERPRET before it imports anything that does."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAMES = ("loss", "d_queries", "d_keys", "d_scale", "d_bias")


def open_clip_siglip_loss(q, k, scale, bias, label_offset: int = 0) -> torch.Tensor:
    """open_clip's SigLIP loss: -sum log sigmoid(z * (s q.k + b)) / N, z = +1 at column
    label_offset + i of row i (a row whose column lies past the keys has no positive), -1 elsewhere."""
    x = scale * q @ k.T + bias
    z = -torch.ones_like(x)
    rows = torch.arange(q.shape[0])
    cols = rows + label_offset
    inside = cols < k.shape[0]
    z[rows[inside], cols[inside]] = 1.0
    return -F.logsigmoid(z * x).sum() / q.shape[0]


def loss_and_grads(op, q, k, scale, bias, label_offset, *, device, dtype=None, upstream=1.7):
    """``op(q, k, scale, bias, label_offset=...)`` on ``device`` with every input requiring a gradient,
    backward of ``upstream`` x the loss (not 1, so that a dropped upstream gradient shows). ``dtype``
    re-casts q and k (the oracle: fp64), scale and bias are fp32 unless it is fp64. Returns the loss
    and the four gradients in fp64 on the CPU (in NAMES' order), and the loss tensor itself."""
    qa, ka = (x.to(device=device, dtype=dtype or x.dtype).detach().requires_grad_() for x in (q, k))
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    sa = torch.tensor(scale, dtype=sdt, device=device, requires_grad=True)
    ba = torch.tensor(bias, dtype=sdt, device=device, requires_grad=True)
    out = op(qa, ka, sa, ba, label_offset=label_offset)
    (out * upstream).backward()
    return [t.detach().double().cpu() for t in (out, qa.grad, ka.grad, sa.grad, ba.grad)], out


def assert_matches(ours: list, ref: list, rtol: float, atol: float = 0.0) -> None:
    """Each of ``ours`` finite and within rtol x the largest |entry| of its ``ref`` (+ atol)."""
    for name, a, b in zip(NAMES, ours, ref, strict=True):
        assert torch.isfinite(a).all(), f"{name}: not finite"
        err, bound = (a - b).abs().max().item(), rtol * b.abs().max().item() + atol
        assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"
