"""``clip_loss``: the symmetric CLIP loss of one square problem,
``(CE(S, diag) + CE(S.T, diag)) / 2`` with ``S = s * I @ T.T``, with the row and
the column log-sum-exp computed from one pass over the tiles (forward: one
matmul pass, not two) and one shared recompute in the backward.
"""

from __future__ import annotations

import torch

from kernels.contrastive_ce import as_scale_tensor, grad_like, refuse_create_graph, scale_meta
from kernels.reference import CLIP_NAMES, check_inputs, check_square, clip_loss_reference
from kernels.runtime import autocast_inputs, device_guard, run_eagerly, use_triton


class ClipLossFunction(torch.autograd.Function):
    """Autograd wrapper: saves I, T, the scale and fp32 row and column statistics [N]."""

    @staticmethod
    def forward(ctx, image_features, text_features, logit_scale, scale_is_tensor):
        """Symmetric CLIP loss and the statistics its backward needs."""
        from kernels.lse_forward import lse_forward

        img, txt = image_features.contiguous(), text_features.contiguous()
        with device_guard(img.device):
            scale = as_scale_tensor(logit_scale, img.device)
            s = lse_forward(img, txt, scale, with_cols=True)
            loss = (s.row_ce.mean() + s.col_ce.mean()) / 2
        ctx.save_for_backward(img, txt, scale, s.row_m2, s.row_log2l, s.col_m2, s.col_log2l)
        ctx.scale_meta = scale_meta(logit_scale) if scale_is_tensor else None
        return loss

    @staticmethod
    def backward(ctx, grad):
        """Gradients in both feature sets and (when it was a tensor) the logit scale."""
        refuse_create_graph("clip_loss")
        from kernels.grad_backward import grad_backward
        from kernels.lse_forward import LseStats

        img, txt, scale, row_m2, row_log2l, col_m2, col_log2l = ctx.saved_tensors
        stats = LseStats(row_m2, row_log2l, None, col_m2, col_log2l, None)
        n = img.shape[0]
        with device_guard(img.device):
            # d/dCE_i of (mean_i CE_row_i + mean_j CE_col_j) / 2.
            w = (grad.float() / (2 * n)).reshape(1).expand(n).contiguous()
            need_img, need_txt = ctx.needs_input_grad[:2]  # a locked tower's side is skipped
            dimg, dtxt, dscale = grad_backward(
                img, txt, scale, stats, w, g_col=w, need_dq=need_img, need_dk=need_txt
            )
        return dimg, dtxt, grad_like(dscale, ctx.scale_meta), None


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric CLIP loss of ``logit_scale * image_features @ text_features.T``.

    image_features, text_features: [N, D], row i of each is the other's positive
    (fp32, fp16 or bf16); logit_scale: scalar tensor or float, already exponentiated.
    Returns a float32 scalar equal to open_clip's ``ClipLoss`` with world_size=1.
    Falls back to ``kernels.reference`` where Triton cannot run (see runtime.py).
    """
    if torch.compiler.is_compiling():
        return run_eagerly(clip_loss)(image_features, text_features, logit_scale)
    # Checked before use_triton, which reads the features' device and dtype.
    check_square(image_features, text_features)
    check_inputs(image_features, text_features, 0, "mean", CLIP_NAMES)
    if not use_triton(image_features, text_features):
        return clip_loss_reference(image_features, text_features, logit_scale)
    image_features, text_features = autocast_inputs(image_features, text_features)
    scale_is_tensor = isinstance(logit_scale, torch.Tensor)
    return ClipLossFunction.apply(image_features, text_features, logit_scale, scale_is_tensor)
