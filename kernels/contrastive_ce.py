"""``contrastive_ce``: row-wise softmax cross-entropy of ``s * Q @ K.T`` with row i
labelled at column ``label_offset + i``, never allocating the ``N x M`` logits.

This is one direction of open_clip's ``local_loss`` CLIP loss: the local image rows
against all gathered texts with ``label_offset = rank * local_batch`` (and the
same for text rows against gathered images).
"""

from __future__ import annotations

import torch

from kernels.reference import check_inputs, contrastive_ce_reference
from kernels.runtime import use_triton


def as_scale_tensor(
    logit_scale: torch.Tensor | float, device: torch.device, name: str = "logit_scale"
) -> torch.Tensor:
    """The scale (or bias) as a 0-dim fp32 tensor on ``device`` (kernels read it from
    memory, so no host synchronisation is needed)."""
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"{name} must hold one value; got shape {tuple(logit_scale.shape)}")
        return logit_scale.detach().reshape(()).to(device=device, dtype=torch.float32)
    return torch.tensor(float(logit_scale), dtype=torch.float32, device=device)


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
        scale = as_scale_tensor(logit_scale, q.device)
        stats = lse_forward(q, k, scale, label_offset=label_offset)
        ctx.save_for_backward(q, k, scale, stats.row_m2, stats.row_log2l)
        ctx.label_offset = label_offset
        ctx.reduction = reduction
        ctx.scale_is_tensor = scale_is_tensor
        ctx.scale_meta = (logit_scale.shape, logit_scale.dtype) if scale_is_tensor else None
        return reduce_rows(stats.row_ce, reduction)

    @staticmethod
    def backward(ctx, grad):
        """Gradients in Q, K and (when it was a tensor) the logit scale."""
        from kernels.grad_backward import grad_backward
        from kernels.lse_forward import LseStats

        q, k, scale, row_m2, row_log2l = ctx.saved_tensors
        g_row = row_weights(grad, q.shape[0], ctx.reduction)
        stats = LseStats(row_m2, row_log2l, row_ce=None)
        dq, dk, dscale = grad_backward(q, k, scale, stats, g_row, label_offset=ctx.label_offset)
        d_logit_scale = None
        if ctx.scale_is_tensor:
            shape, dtype = ctx.scale_meta
            d_logit_scale = dscale.reshape(shape).to(dtype)
        return dq, dk, d_logit_scale, None, None, None


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
    bounded gradient workspace; falls back to ``kernels.reference`` otherwise.
    """
    check_inputs(queries, keys, label_offset, reduction)
    if not use_triton(queries, keys):
        return contrastive_ce_reference(
            queries, keys, logit_scale, label_offset=label_offset, reduction=reduction
        )
    scale_is_tensor = isinstance(logit_scale, torch.Tensor)
    return ContrastiveCEFunction.apply(queries, keys, logit_scale, label_offset, reduction, scale_is_tensor)
