"""Sigmoid contrastive loss (SigLIP) with negatives from every rank.

Each image-text pair is an independent binary problem (no softmax over the batch):

    logits = s * img @ txt.T + b          z_ij = +1 if i, j are a pair else -1
    loss   = -sum_ij logsigmoid(z_ij * logits_ij) / B       (rows: this rank's B images,
                                                               columns: all W*B texts)

This is the value of open_clip's `SigLipLoss` on every rank (its neighbour exchange visits the
same columns one chunk at a time). Here the texts are all-gathered once with an autograd-aware
gather (open_clip's `dist_impl="gather"`): peak memory is one B x W*B block. The mean over ranks
of the per-rank losses equals the loss of one process on the concatenated batch, and each rank's
feature gradient is W times that loss's gradient for its slice (so the DDP/DeepSpeed average of
parameter gradients is exact).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vutrain.losses.gather import all_gather_with_grad, check_group, check_rank

DIST_IMPLS = ("gather",)


class SigLipLoss(nn.Module):
    """open_clip-compatible SigLIP loss.

    Args:
        cache_labels: reuse the +-1 label matrix per (device, shape, offset).
        rank, world_size: this process's place in the default process group.
        dist_impl: only "gather" (one all-gather of the text features); None means "gather".
            open_clip's "bidir"/"shift"/"reduce" give the same values but are not implemented.

    `last_terms` is always empty (single-term loss; kept for a uniform trainer API).
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None) -> None:
        super().__init__()
        dist_impl = dist_impl or "gather"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"SigLipLoss dist_impl {dist_impl!r} is not implemented; choose one of "
                             f"{', '.join(DIST_IMPLS)} (all of open_clip's variants give the same values)")
        check_rank(rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.last_terms: dict[str, float] = {}
        self._labels: dict[tuple, torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, dtype: torch.dtype, rows: int, cols: int,
                         ) -> torch.Tensor:
        """[rows, cols] matrix of -1 with +1 at (i, rank*rows + i): this rank's positives."""
        offset = self.rank * rows
        key = (device, dtype, rows, cols, offset)
        if self.cache_labels and key in self._labels:
            return self._labels[key]
        labels = -torch.ones(rows, cols, device=device, dtype=dtype)
        idx = torch.arange(rows, device=device)
        labels[idx, offset + idx] = 1
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        """Scalar loss of this rank.

        Args:
            image_features, text_features: [B, D], L2-normalised, row i of both is a pair.
            logit_scale: scalar, already exponentiated (SigLIP init: exp(log 10)).
            logit_bias: scalar learnable bias (SigLIP init: -10); required.
        """
        if logit_bias is None:
            raise ValueError("SigLipLoss needs a logit_bias (a learnable scalar, SigLIP initialises "
                             "it to -10); enable the bias in the model or use loss.name=clip")
        all_txt = text_features
        if self.world_size > 1:
            check_group(self.rank, self.world_size)
            all_txt = all_gather_with_grad(text_features)
        logits = logit_scale * image_features @ all_txt.T + logit_bias
        labels = self.get_ground_truth(logits.device, logits.dtype, *logits.shape)
        return -F.logsigmoid(labels * logits).sum() / image_features.shape[0]
