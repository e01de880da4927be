"""Softmax contrastive loss (CLIP / InfoNCE) with negatives gathered from every rank.

Same constructor arguments, values and gradients as open_clip's `ClipLoss`:

    logits_per_image = s * img @ txt.T (+ bias)     labels = arange(n) (+ rank * B if local_loss)
    loss = (CE(logits_per_image, labels) + CE(logits_per_text, labels)) / 2

Gradient semantics across ranks (B = local batch, W = world size, L = the loss of one process
on the concatenated global batch):

* `gather_with_grad=True` (any `local_loss`): the mean over ranks of the per-rank losses is L,
  and rank r's feature gradient is ``sum_k d loss_k / d feat_r = W * dL/dfeat_r``; after DDP /
  DeepSpeed average parameter gradients over ranks, training follows dL exactly.
* `gather_with_grad=False, local_loss=False`: every rank computes L itself and its own slice
  gets the exact dL/dfeat_r (the other slices are constants) - the averaged parameter gradient
  is dL / W (open_clip's behaviour; the factor is absorbed by the learning rate).
* `gather_with_grad=False, local_loss=True`: only the query side of the local rows gets a
  gradient (gathered keys are constants), as in open_clip. Prefer `gather_with_grad=True` with
  `local_loss=True`: it is exact and scores only a B x (W*B) block per rank.

Multi-positive labels (`forward(..., labels=...)`, see positives.py): samples sharing a label
are positives of each other. Each row's target distribution is uniform over its positives
(always including its own pair), in both directions:

    loss = (mean_i CE(logits_per_image[i], p_i) + mean_i CE(logits_per_text[i], p_i)) / 2
    p_ij = 1[i, j share a label or j is i's pair] / (number of such j)

With all labels distinct this is exactly the plain loss; `labels=None` is the plain code path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vutrain.losses.backends import check_backend, scalar_for_autograd, takes_kernel
from vutrain.losses.gather import at_least_fp32, check_pairs, check_rank, common_dtype, gather_features
from vutrain.losses.positives import check_labels, gather_labels, positive_mask


class ClipLoss(nn.Module):
    """open_clip-compatible CLIP loss; see the module docstring for gradient semantics.

    Args:
        local_loss: score only this rank's rows against all gathered columns (B x W*B logits)
            instead of the full W*B x W*B matrix.
        gather_with_grad: gather features with an autograd-aware all-gather.
        cache_labels: reuse the label tensor per (device, number of rows, offset).
        rank, world_size: this process's place in the default process group.
        backend: "torch" (reference), "triton" (`kernels.contrastive_ce` / `kernels.clip_loss`,
            never materialises the logits; on CPU the kernels fall back to their torch
            reference unless TRITON_INTERPRET=1) or "auto" (triton for CUDA features when
            `kernels.triton_available()` and the call has no logit bias and no labels, torch
            otherwise; see backends.py).

    `last_terms` is always empty: the loss has a single term (kept for a uniform trainer API).
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        backend: str = "torch",
        check_shapes: bool = True,
    ) -> None:
        super().__init__()
        check_backend(backend)
        check_rank(rank, world_size)
        # Each call first agrees that every rank passes one shape (gather.check_same_shape_on_all_ranks:
        # one small all-reduce): off where the caller guarantees it (the trainer: build_loss_from_config).
        self.check_shapes = check_shapes
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.backend = backend
        self.last_terms: dict[str, float] = {}
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """Labels [num_logits] for the rows of this rank: arange, offset by rank*B if local_loss."""
        offset = num_logits * self.rank if (self.world_size > 1 and self.local_loss) else 0
        key = (device, num_logits, offset)
        if self.cache_labels and key in self._labels:
            return self._labels[key]
        labels = torch.arange(offset, offset + num_logits, device=device, dtype=torch.long)
        if self.cache_labels and not torch.is_inference_mode_enabled():
            # One made under inference_mode (an eval loop's call) cannot be saved for a later
            # training step's backward: training failed with "Inference tensors cannot be saved".
            self._labels[key] = labels
        return labels

    def get_logits(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): [B, W*B] each with local_loss, else [W*B, W*B];
        in fp32 at least (16-bit features are cast after the gather, see gather.at_least_fp32)."""
        logit_scale, logit_bias = scalar_for_autograd(logit_scale), scalar_for_autograd(logit_bias)
        all_img, all_txt = self._gather(image_features, text_features)
        image_features, text_features = at_least_fp32(image_features), at_least_fp32(text_features)
        all_img, all_txt = at_least_fp32(all_img), at_least_fp32(all_txt)
        if self.world_size > 1 and self.local_loss:
            per_image = logit_scale * image_features @ all_txt.T
            per_text = logit_scale * text_features @ all_img.T
        else:
            per_image = logit_scale * all_img @ all_txt.T
            per_text = per_image.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss of this rank.

        Args:
            image_features, text_features: [B, D], L2-normalised, row i of both is a pair.
            logit_scale: scalar, already exponentiated (e.g. `model.logit_scale.exp()`).
            logit_bias: optional scalar added to every logit (torch backend only).
            labels: optional multi-positive labels of this rank's rows (LongTensor [B] or [B, T],
                BoolTensor [B, L]; see positives.py); None is the plain one-positive loss.
        """
        check_pairs("ClipLoss", image_features, text_features)
        image_features, text_features = common_dtype(image_features, text_features)
        logit_scale, logit_bias = scalar_for_autograd(logit_scale), scalar_for_autograd(logit_bias)
        if labels is not None:
            check_labels(labels, image_features.shape[0])
            # A caller's CPU labels beside CUDA features built the positive mask on the CPU and
            # failed in cross_entropy with a device mismatch (the trainer moves them itself).
            labels = labels.to(image_features.device)
        if self.uses_kernels(image_features, logit_bias, labels):
            if logit_bias is not None:
                raise ValueError(
                    "ClipLoss backend 'triton' does not support logit_bias; use "
                    "backend='torch' or drop the bias (loss.backend=torch)"
                )
            if labels is not None:
                raise ValueError(
                    "ClipLoss backend 'triton' does not support multi-positive labels; "
                    "use loss.backend=torch or loss.positives=pair"
                )
            return self._forward_triton(image_features, text_features, logit_scale)
        per_image, per_text = self.get_logits(image_features, text_features, logit_scale, logit_bias)
        if labels is None:
            targets = self.get_ground_truth(image_features.device, per_image.shape[0])
        else:
            targets = self.soft_targets(labels, per_image.shape[0], per_image.dtype)
        return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2

    def uses_kernels(
        self,
        features: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> bool:
        """Whether `forward` runs the Triton kernels for these arguments (see backends.py)."""
        return takes_kernel(self.backend, features, "clip_loss", logit_bias is None and labels is None)

    def soft_targets(
        self,
        labels: torch.Tensor,
        rows: int,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """[rows, W*B] target distributions: uniform over each row's positives.

        The positive relation is symmetric and an image shares its labels with its own title,
        so the same matrix serves logits_per_image and logits_per_text.
        """
        all_labels = gather_labels(labels, self.world_size)
        local = self.world_size > 1 and self.local_loss
        offset = self.rank * rows if local else 0
        mask = positive_mask(labels if local else all_labels, all_labels, offset)
        mask = mask.to(dtype)
        return mask / mask.sum(dim=1, keepdim=True)

    # -- internals ---------------------------------------------------------------------------

    def _gather(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_features(
            image_features,
            text_features,
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            rank=self.rank,
            world_size=self.world_size,
            check_shapes=self.check_shapes,
        )

    def _forward_triton(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        try:
            import kernels  # lazy: the trainer must import without Triton installed
        except ImportError as e:
            raise ImportError(
                "ClipLoss(backend='triton') needs the `kernels` package and Triton; "
                "install with `pip install -e .[kernels]` or use backend='torch'"
            ) from e
        all_img, all_txt = self._gather(image_features, text_features)
        if self.world_size > 1 and self.local_loss:
            offset = self.rank * image_features.shape[0]
            i2t = kernels.contrastive_ce(
                image_features, all_txt, logit_scale, label_offset=offset, reduction="mean"
            )
            t2i = kernels.contrastive_ce(
                text_features, all_img, logit_scale, label_offset=offset, reduction="mean"
            )
            return (i2t + t2i) / 2
        return kernels.clip_loss(all_img, all_txt, logit_scale)
