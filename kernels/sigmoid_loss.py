"""``sigmoid_loss``: the SigLIP loss of ``x = s * Q @ K.T + b`` without the ``N x M`` logits.

    loss = sum_ij -logsigmoid(z_ij * x_ij) / N = sum_ij softplus(-z_ij * x_ij) / N
    z_ij = +1 if j == label_offset + i else -1            (open_clip's SigLipLoss)

Every pair is an independent binary problem, so unlike the softmax losses no row
statistics are needed: the forward sums ``softplus`` over tiles (per-row partials for
each column split, summed in a fixed order), and the backward recomputes each tile and
writes ``s * dL/dx`` into the shared bounded workspace (``kernels.gradient_gemms``):

    dL/dx_ij = w * sigmoid(x_ij)       off the label      (w = upstream grad / N)
             = -w * sigmoid(-x_ij)     on the label

formed directly in fp32 (``sigmoid(x) - 1`` would cancel to 0 once sigmoid(x) rounds
to 1), then ``dQ = G @ K``, ``dK = G.T @ Q``, ``dL/ds = sum_ij dL/dx_ij (Q @ K.T)_ij``
and ``dL/db = sum_ij dL/dx_ij`` from per-tile partials. Deterministic: no atomics.
"""

from __future__ import annotations

import torch

from kernels.contrastive_ce import as_scale_tensor, grad_like, scale_meta
from kernels.reference import check_inputs, sigmoid_loss_reference
from kernels.runtime import autocast_inputs, device_guard, use_triton


class SigmoidLossFunction(torch.autograd.Function):
    """Autograd wrapper: saves only Q, K, the scale and the bias."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, label_offset):
        """The sigmoid loss; saves what its backward needs."""
        from kernels.sigmoid_tiles import sigmoid_forward

        q, k = queries.contiguous(), keys.contiguous()
        with device_guard(q.device):
            scale = as_scale_tensor(logit_scale, q.device)
            bias = as_scale_tensor(logit_bias, q.device, "logit_bias")
            loss = sigmoid_forward(q, k, scale, bias, label_offset=label_offset)
        ctx.save_for_backward(q, k, scale, bias)
        ctx.label_offset = label_offset
        ctx.metas = [scale_meta(logit_scale), scale_meta(logit_bias)]
        return loss

    @staticmethod
    def backward(ctx, grad):
        """Gradients in Q, K and (when they were tensors) the logit scale and bias."""
        from kernels.sigmoid_tiles import sigmoid_backward

        q, k, scale, bias = ctx.saved_tensors
        with device_guard(q.device):
            w = grad.float().reshape(()) / q.shape[0]
            need_dq, need_dk = ctx.needs_input_grad[:2]  # a locked tower's side is skipped
            dq, dk, dscale, dbias = sigmoid_backward(
                q, k, scale, bias, w, label_offset=ctx.label_offset, need_dq=need_dq, need_dk=need_dk
            )
        return dq, dk, grad_like(dscale, ctx.metas[0]), grad_like(dbias, ctx.metas[1]), None


def sigmoid_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    label_offset: int = 0,
) -> torch.Tensor:
    """SigLIP loss of ``logit_scale * queries @ keys.T + logit_bias``, positive of row i at
    column ``label_offset + i``: ``sum over all pairs of -logsigmoid(label * logit) / N``.

    queries: [N, D], keys: [M, D] (fp32, fp16 or bf16, same dtype); logit_scale: the
    already exponentiated scale; logit_bias: the bias (each a scalar tensor, which gets a
    gradient, or a float); label_offset in [0, M - N] (e.g. rank * local_batch).
    Returns a float32 scalar, open_clip's ``SigLipLoss`` normalisation (divided by N).

    Triton path (CUDA tensors, or TRITON_INTERPRET=1): extra memory O(N) plus the bounded
    gradient workspace; falls back to ``kernels.reference`` (plain torch) otherwise.
    """
    check_inputs(queries, keys, label_offset, "mean")
    if not use_triton(queries, keys):
        return sigmoid_loss_reference(queries, keys, logit_scale, logit_bias, label_offset=label_offset)
    queries, keys = autocast_inputs(queries, keys)
    return SigmoidLossFunction.apply(queries, keys, logit_scale, logit_bias, label_offset)
