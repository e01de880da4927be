"""Alignment + uniformity (Wang & Isola, 2020) with negatives from every rank.

The seed objective of Vector Universe: pull each image onto its own title, push apart every
other image-title pair of the global batch.

    align   = mean_i ||x_i - y_i||^2                              (x: images, y: titles)
    uniform = log mean_{i != j} exp(-t * ||x_i - y_j||^2)         (all W*B x W*B - W*B pairs)
    loss    = align_weight * align + uniform_weight * uniform

Uniformity is computed over cross-modal non-matching pairs: every rank scores its B images
against all W*B gathered titles, takes the log-sum-exp of its -t d^2 block, and the W per-rank
values are all-gathered (with gradient) and combined by one more log-sum-exp, so every rank sees
the exact global log-mean. Hence, as for the other losses, the mean over ranks of the per-rank
losses equals the loss of one process on the concatenated batch, and each rank's feature
gradient is W times that loss's gradient for its slice.

Both terms are computed in the promoted dtype of the two features, at least fp32. The
log-sum-exp form is exact for any t: a plain sum of exp(-t d^2) underflows to 0 in fp32 once
every pair has t d^2 > ~100 (t > 25 with all non-matching pairs antipodal, d^2 = 4), and the term
became log(0) = -inf.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from vutrain.losses.gather import (
    all_gather_with_grad,
    at_least_fp32,
    check_group,
    check_pairs,
    check_rank,
    common_dtype,
)


class AlignUniformLoss(nn.Module):
    """Alignment + uniformity; `forward` returns the weighted total.

    The two unweighted terms of the last call are kept in
    `self.last_terms = {"align": tensor, "uniform": tensor}` for logging: both are global-batch
    values, identical on every rank (align is averaged over ranks with one scalar all-reduce),
    detached 0-dim tensors on the features' device, so the trainer reads them on the host only on
    its logging steps (`float(v)`), not at every micro-batch.

    Args:
        rank, world_size: this process's place in the default process group.
        align_weight, uniform_weight: weights of the two terms in the total.
        t: uniformity temperature (Wang & Isola use 2).
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        align_weight: float = 1.0,
        uniform_weight: float = 1.0,
        t: float = 2.0,
        check_shapes: bool = True,
    ) -> None:
        super().__init__()
        check_rank(rank, world_size)
        self.check_shapes = check_shapes  # as ClipLoss's: one small all-reduce per call, or off
        if t <= 0:
            raise ValueError(f"AlignUniformLoss t must be > 0, got {t}")
        self.rank = rank
        self.world_size = world_size
        self.align_weight = align_weight
        self.uniform_weight = uniform_weight
        self.t = t
        self.last_terms: dict[str, torch.Tensor] = {}

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss of this rank.

        Args:
            image_features, text_features: [B, D], L2-normalised, row i of both is a pair.
            logit_scale, logit_bias: accepted so every loss has the same call signature; unused
                (distances on the unit sphere need no temperature beyond `t`).
        """
        check_pairs("AlignUniformLoss", image_features, text_features)
        b = image_features.shape[0]
        if self.world_size * b < 2:
            raise ValueError("AlignUniformLoss needs at least 2 pairs in the global batch")
        # The promoted dtype of both, as ClipLoss/SigLIP: from the images alone, fp64 texts beside
        # fp32 images were cut to fp32, and integer features passed without the losses' error.
        x, y = common_dtype(image_features, text_features)
        x, y = at_least_fp32(x), at_least_fp32(y)
        align = (x - y).pow(2).sum(dim=1).mean()
        uniform = self._uniform(x, y)
        self.last_terms = {"align": self._global_mean(align), "uniform": uniform.detach()}
        return self.align_weight * align + self.uniform_weight * uniform

    def uses_kernels(self, features: torch.Tensor, logit_bias=None, labels=None) -> bool:
        """Never: this loss has a torch implementation only (the trainer asks every loss)."""
        return False

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a detached scalar, left on the device (for logging; no gradient)."""
        value = value.detach().clone()
        if self.world_size > 1:
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def _uniform(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """log mean over global non-matching pairs of exp(-t * squared distance)."""
        b = image_features.shape[0]
        all_txt = text_features
        if self.world_size > 1:
            check_group(self.rank, self.world_size)
            all_txt = all_gather_with_grad(text_features, self.check_shapes)
        n = all_txt.shape[0]
        # ||x - y||^2 = |x|^2 + |y|^2 - 2 x.y; clamp guards tiny negatives from rounding.
        sq = (
            image_features.pow(2).sum(1, keepdim=True)
            + all_txt.pow(2).sum(1)
            - 2 * image_features @ all_txt.T
        ).clamp_min(0)
        own_pairs = torch.zeros_like(sq, dtype=torch.bool)
        idx = torch.arange(b, device=sq.device)
        own_pairs[idx, self.rank * b + idx] = True
        # Every row has n - 1 >= 1 non-matching columns, so each rank's log-sum-exp is finite.
        log_partial = torch.logsumexp((-self.t * sq).masked_fill(own_pairs, float("-inf")).flatten(), 0)
        if self.world_size > 1:
            log_partial = torch.logsumexp(all_gather_with_grad(log_partial.reshape(1), check_shapes=False), 0)
        return log_partial - math.log(n * (n - 1))
