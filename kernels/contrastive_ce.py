"""``contrastive_ce``: row-wise softmax cross-entropy of ``s * Q @ K.T`` with row i
labelled at column ``label_offset + i``, never allocating the ``N x M`` logits.

This is one direction of open_clip's ``local_loss`` CLIP loss: the local image rows
against all gathered texts with ``label_offset = rank * local_batch`` (and the
same for text rows against gathered images).
"""

from __future__ import annotations

import torch

from kernels.reference import (
    as_label_offset,
    check_inputs,
    check_scalar,
    constant_for_autograd,
    contrastive_ce_reference,
)
from kernels.runtime import autocast_inputs, device_guard, run_eagerly, use_triton


def as_scale_tensor(
    logit_scale: torch.Tensor | float, device: torch.device, name: str = "logit_scale"
) -> torch.Tensor:
    """The scale (or bias) as a 0-dim fp32 tensor on ``device`` (kernels read it from
    memory, so no host synchronisation is needed)."""
    check_scalar(logit_scale, name)
    if isinstance(logit_scale, torch.Tensor):
        # Saved for backward: an inference-mode scale or bias must become a plain copy first.
        return constant_for_autograd(logit_scale.detach().reshape(()).to(device=device, dtype=torch.float32))
    return torch.tensor(float(logit_scale), dtype=torch.float32, device=device)


def scale_meta(logit_scale: torch.Tensor | float) -> tuple | None:
    """What the scale's (or bias's) gradient must look like: shape, dtype and device of a
    tensor argument; None for a float (no gradient)."""
    if not isinstance(logit_scale, torch.Tensor):
        return None
    return logit_scale.shape, logit_scale.dtype, logit_scale.device


def grad_like(grad: torch.Tensor, meta: tuple | None) -> torch.Tensor | None:
    """``grad`` (one value, fp32, on the features' device) in the shape, dtype and device of
    the argument described by ``meta`` (from :func:`scale_meta`). The device matters on a GPU:
    autograd moves a 0-dim gradient to its input's device itself but rejects a [1]-shaped one
    on another device (e.g. a CPU ``logit_scale`` of shape [1] with CUDA features)."""
    if meta is None:
        return None
    shape, dtype, device = meta
    return grad.reshape(shape).to(device=device, dtype=dtype)


def refuse_create_graph(op: str) -> None:
    """Raise inside a kernel's backward run with ``create_graph=True`` (autograd turns grad mode
    on there only then). The gradients come from Triton kernels that autograd cannot see, so a
    second backward through them (a gradient penalty) would silently miss the loss's terms."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"kernels.{op} has no second derivative (backward with create_graph=True, e.g. a gradient "
            f"penalty); use kernels.reference.{op}_reference or loss.backend=torch for that"
        )


def row_weights(grad: torch.Tensor, n: int, reduction: str) -> torch.Tensor:
    """Per-row fp32 upstream weights ``g_i = dLoss/dCE_i`` for a reduction."""
    grad = grad.float()
    if reduction == "none":
        return grad.reshape(n).contiguous()
    per_row = grad / n if reduction == "mean" else grad
    return per_row.reshape(1).expand(n).contiguous()


def reduce_rows(per_row: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``reduction`` to the [N] per-row losses."""
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


class ContrastiveCEFunction(torch.autograd.Function):
    """Autograd wrapper: saves only Q, K, the scale and two fp32 [N] row statistics."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, label_offset, reduction, scale_is_tensor):
        """Row cross-entropies of ``s * Q @ K.T``, reduced, and the statistics its backward needs."""
        from kernels.lse_forward import lse_forward

        q, k = queries.contiguous(), keys.contiguous()
        with device_guard(q.device):
            scale = as_scale_tensor(logit_scale, q.device)
            stats = lse_forward(q, k, scale, label_offset=label_offset)
            out = reduce_rows(stats.row_ce, reduction)
        ctx.save_for_backward(q, k, scale, stats.row_m2, stats.row_log2l)
        ctx.label_offset = label_offset
        ctx.reduction = reduction
        ctx.scale_meta = scale_meta(logit_scale) if scale_is_tensor else None
        return out

    @staticmethod
    def backward(ctx, grad):
        """Gradients in Q, K and (when it was a tensor) the logit scale."""
        refuse_create_graph("contrastive_ce")
        from kernels.grad_backward import grad_backward
        from kernels.lse_forward import LseStats

        q, k, scale, row_m2, row_log2l = ctx.saved_tensors
        with device_guard(q.device):
            g_row = row_weights(grad, q.shape[0], ctx.reduction)
            stats = LseStats(row_m2, row_log2l, row_ce=None)
            need_dq, need_dk = ctx.needs_input_grad[:2]  # a locked tower's side is skipped
            dq, dk, dscale = grad_backward(
                q, k, scale, stats, g_row, label_offset=ctx.label_offset, need_dq=need_dq, need_dk=need_dk
            )
        return dq, dk, grad_like(dscale, ctx.scale_meta), None, None, None


def contrastive_ce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    label_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of each row of ``logit_scale * queries @ keys.T`` against column
    ``label_offset + i``; differentiable in queries, keys and logit_scale.

    queries: [N, D], keys: [M, D] (fp32, fp16 or bf16, same dtype; L2-normalised in
    CLIP but not required); logit_scale: scalar tensor or float, already
    exponentiated (e.g. up to 100); label_offset in [0, M - N].
    Returns a float32 scalar (``mean``/``sum``) or [N] (``none``).

    Triton path (CUDA tensors, or TRITON_INTERPRET=1): extra memory O(N + M) plus a
    bounded gradient workspace; falls back to ``kernels.reference`` otherwise. Under
    ``torch.autocast`` fp32 features run in the autocast dtype, as the reference's matmul.
    """
    if torch.compiler.is_compiling():
        return run_eagerly(contrastive_ce)(
            queries, keys, logit_scale, label_offset=label_offset, reduction=reduction
        )
    label_offset = as_label_offset(label_offset)
    check_inputs(queries, keys, label_offset, reduction)
    if not use_triton(queries, keys):
        return contrastive_ce_reference(
            queries, keys, logit_scale, label_offset=label_offset, reduction=reduction
        )
    queries, keys = autocast_inputs(queries, keys)
    scale_is_tensor = isinstance(logit_scale, torch.Tensor)
    return ContrastiveCEFunction.apply(queries, keys, logit_scale, label_offset, reduction, scale_is_tensor)
