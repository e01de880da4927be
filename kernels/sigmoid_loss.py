"""``sigmoid_loss``: the SigLIP loss of ``x = s * Q @ K.T + b`` without the ``N x M`` logits.

    loss = sum_ij -logsigmoid(z_ij * x_ij) / N = sum_ij softplus(-z_ij * x_ij) / N
    z_ij = +1 if j == label_offset + i else -1            (open_clip's SigLipLoss)

Every pair is an independent binary problem, so unlike the softmax losses no row
statistics are needed, and the gradient pass over the tiles gives the loss too:
each tile's ``softplus`` terms are summed, and ``s * dL/dx`` goes into the shared bounded
workspace (``kernels.gradient_gemms``):

    dL/dx_ij = w * sigmoid(x_ij)       off the label      (w = upstream grad / N)
             = -w * sigmoid(-x_ij)     on the label

formed directly in fp32 (``sigmoid(x) - 1`` would cancel to 0 once sigmoid(x) rounds
to 1), then ``dQ = G @ K``, ``dK = G.T @ Q``, ``dL/ds = sum_ij dL/dx_ij (Q @ K.T)_ij``
and ``dL/db = sum_ij dL/dx_ij`` from per-tile partials. Deterministic: no atomics.

The loss is a scalar, so its gradients are those for ``grad = 1`` times the upstream
gradient. When autograd will want them, the forward makes them for ``w = 1 / N`` in that
same pass and the backward only scales them: forward + backward is the gradient pass
alone (one score pass and the two gradient GEMMs; two score passes under the two-pass
schedule of large square problems), where a separate forward cost a full ``Q @ K.T``
more. Without gradients (``torch.no_grad``, or no input requiring them), the forward
only sums the loss, in per-row partials for each column split.
"""

from __future__ import annotations

import torch

from kernels.contrastive_ce import as_scale_tensor, grad_like, refuse_create_graph, scale_meta
from kernels.reference import as_label_offset, check_inputs, sigmoid_loss_reference
from kernels.runtime import autocast_inputs, device_guard, run_eagerly, use_triton


class SigmoidLossFunction(torch.autograd.Function):
    """Autograd wrapper. With ``with_grads`` the forward also makes the gradients for
    ``grad = 1`` (in the gradient pass, which sums the loss too) and the backward only
    scales them by the upstream gradient; without, it only sums the loss. Saves Q, K, the
    scale and the bias besides."""

    @staticmethod
    def forward(ctx, queries, keys, logit_scale, logit_bias, label_offset, with_grads):
        """The sigmoid loss, and with ``with_grads`` its gradients for the backward."""
        from kernels.sigmoid_tiles import sigmoid_forward, sigmoid_grads

        q, k = queries.contiguous(), keys.contiguous()
        ctx.grads = None
        with device_guard(q.device):
            scale = as_scale_tensor(logit_scale, q.device)
            bias = as_scale_tensor(logit_bias, q.device, "logit_bias")
            if with_grads:
                n = q.shape[0]
                w = torch.full((), 1.0 / n, dtype=torch.float32, device=q.device)
                need_dq, need_dk = ctx.needs_input_grad[:2]  # a locked tower's side is skipped
                dq, dk, dscale, dbias, total = sigmoid_grads(
                    q, k, scale, bias, w, label_offset=label_offset, need_dq=need_dq, need_dk=need_dk
                )
                ctx.grads = (dq, dk, dscale, dbias)
                loss = total / n
            else:
                loss = sigmoid_forward(q, k, scale, bias, label_offset=label_offset)
        ctx.save_for_backward(q, k, scale, bias)
        ctx.label_offset = label_offset
        ctx.metas = [scale_meta(logit_scale), scale_meta(logit_bias)]
        return loss

    @staticmethod
    def backward(ctx, grad):
        """Gradients in Q, K and (when they were tensors) the logit scale and bias."""
        refuse_create_graph("sigmoid_loss")
        g = grad.float().reshape(())
        if ctx.grads is not None:
            dq, dk, dscale, dbias = ctx.grads
            # Handed over, not kept: autograd can then store dq and dk as .grad without a copy.
            ctx.grads = None
            for t in (dq, dk):
                if t is not None:
                    t.mul_(g)  # exact for grad = 1 and for power-of-two loss scales
            dscale, dbias = dscale * g, dbias * g
        else:  # a second backward through the graph (retain_graph=True): recompute
            from kernels.sigmoid_tiles import sigmoid_grads

            q, k, scale, bias = ctx.saved_tensors
            need_dq, need_dk = ctx.needs_input_grad[:2]
            with device_guard(q.device):
                w = g / q.shape[0]
                dq, dk, dscale, dbias, _ = sigmoid_grads(
                    q, k, scale, bias, w, label_offset=ctx.label_offset, need_dq=need_dq, need_dk=need_dk
                )
        return dq, dk, grad_like(dscale, ctx.metas[0]), grad_like(dbias, ctx.metas[1]), None, None


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
    if torch.compiler.is_compiling():
        return run_eagerly(sigmoid_loss)(queries, keys, logit_scale, logit_bias, label_offset=label_offset)
    label_offset = as_label_offset(label_offset)
    check_inputs(queries, keys, label_offset, "mean")
    if not use_triton(queries, keys):
        return sigmoid_loss_reference(queries, keys, logit_scale, logit_bias, label_offset=label_offset)
    queries, keys = autocast_inputs(queries, keys)
    # Whether autograd will ask for gradients (inside the Function's forward, grad mode is off):
    # then the forward makes them, and the backward recomputes nothing. Not for fp16: its
    # gradients for grad = 1 would be stored at their true size, where fp16's small entries are
    # subnormal or zero, and the backward's product with a loss scale (fp16 training's 2^16)
    # could not bring them back; recomputed with the upstream gradient folded in, they keep it.
    with_grads = (
        torch.is_grad_enabled()
        and queries.dtype != torch.float16
        and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (queries, keys, logit_scale, logit_bias)
        )
    )
    return SigmoidLossFunction.apply(queries, keys, logit_scale, logit_bias, label_offset, with_grads)
