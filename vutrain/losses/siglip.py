"""Sigmoid contrastive loss (SigLIP) with negatives from every rank.

Each image-text pair is an independent binary problem (no softmax over the batch):

    logits = s * img @ txt.T + b          z_ij = +1 if i, j are positives else -1
    loss   = -sum_ij logsigmoid(z_ij * logits_ij) / B       (rows: this rank's B images,
                                                               columns: all W*B texts)

This is the value of open_clip's `SigLipLoss` on every rank. Two ways to visit the columns:

* gather (default): one autograd-aware all-gather of the text features, one B x W*B block.
* bidir (`bidir=True`): open_clip's neighbour exchange. Text features travel around the ring
  (to both neighbours at once, then onwards), and each received B x B block is scored and
  dropped; its logits are recomputed in backward (activation checkpointing), so the loss holds
  O(B^2) logits at a time instead of O(B x W*B). The received text blocks (W*B x D in all) stay
  alive for backward, as the gathered copy does.

Both give the same values and gradients. The mean over ranks of the per-rank losses equals the
loss of one process on the concatenated batch, and each rank's feature gradient is W times that
loss's gradient for its slice (so the DDP/DeepSpeed average of parameter gradients is exact).

Multi-positive labels (`forward(..., labels=...)`, see positives.py): pairs that share a label
get z = +1 as well; `labels=None` is the plain loss.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vutrain.losses.backends import check_backend, scalar_for_autograd, takes_kernel
from vutrain.losses.exchange import neighbour_exchange, neighbour_exchange_bidir, p2p_supported
from vutrain.losses.gather import (
    all_gather_with_grad,
    at_least_fp32,
    check_group,
    check_pairs,
    check_rank,
    check_same_shape_on_all_ranks,
    common_dtype,
)
from vutrain.losses.positives import check_labels, gather_labels, positive_mask

log = logging.getLogger(__name__)
DIST_IMPLS = ("gather", "bidir")


def _block_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    row_labels: torch.Tensor | None,
    col_labels: torch.Tensor | None,
    own_pairs: bool,
) -> torch.Tensor:
    """-sum logsigmoid(z * logits) of one B x C block (not yet divided by the rows).

    `own_pairs`: the block's columns are the rows' own texts (the diagonal is positive).
    """
    logits = scale * at_least_fp32(img) @ at_least_fp32(txt).T + bias
    if row_labels is not None:
        mask = positive_mask(row_labels, col_labels, 0 if own_pairs else None)
    else:
        mask = torch.zeros_like(logits, dtype=torch.bool)
        if own_pairs:
            mask.fill_diagonal_(True)
    signs = mask.to(logits.dtype) * 2 - 1
    return -F.logsigmoid(signs * logits).sum()


class SigLipLoss(nn.Module):
    """open_clip-compatible SigLIP loss.

    Args:
        cache_labels: reuse the +-1 label matrix per (device, shape, offset) (gather, no labels).
        rank, world_size: this process's place in the default process group.
        dist_impl: "gather" (one all-gather of the text features) or "bidir" (neighbour
            exchange around the ring); None follows `bidir`.
        bidir: shorthand for dist_impl="bidir" (open_clip's default). A group that cannot send
            the features' device point to point (gloo with CUDA tensors: `cuda:gloo`) gathers
            instead, with a warning (same values; see exchange.p2p_supported).
        backend: "torch", "triton" (`kernels.sigmoid_loss`, never materialises the logits;
            gather only, no labels) or "auto" (triton for CUDA features when available, with
            no labels and dist_impl="gather"; torch otherwise; see backends.py).

    `last_terms` is always empty (single-term loss; kept for a uniform trainer API).
    """

    def __init__(
        self,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        dist_impl: str | None = None,
        bidir: bool = False,
        backend: str = "torch",
        check_shapes: bool = True,
    ) -> None:
        super().__init__()
        self.check_shapes = check_shapes  # as ClipLoss's: one small all-reduce per call, or off
        dist_impl = dist_impl or ("bidir" if bidir else "gather")
        if dist_impl not in DIST_IMPLS:
            raise ValueError(
                f"SigLipLoss dist_impl {dist_impl!r} is not implemented; choose one of "
                f"{', '.join(DIST_IMPLS)} (all of open_clip's variants give the same values)"
            )
        if bidir and dist_impl != "bidir":
            raise ValueError(f"SigLipLoss got bidir=True and dist_impl={dist_impl!r}; pass one of them")
        check_backend(backend)
        if backend == "triton" and dist_impl == "bidir":
            raise ValueError(
                "SigLipLoss backend 'triton' gathers the texts (its kernel already "
                "avoids the logits matrix); use bidir=False or backend='torch'"
            )
        check_rank(rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl
        self.bidir = dist_impl == "bidir"
        self.backend = backend
        self.last_terms: dict[str, float] = {}
        self._labels: dict[tuple, torch.Tensor] = {}
        self._warned_no_p2p = False

    def get_ground_truth(
        self,
        device: torch.device,
        dtype: torch.dtype,
        rows: int,
        cols: int,
    ) -> torch.Tensor:
        """[rows, cols] matrix of -1 with +1 at (i, rank*rows + i): this rank's positives."""
        offset = self.rank * rows
        key = (device, dtype, rows, cols, offset)
        if self.cache_labels and key in self._labels:
            return self._labels[key]
        labels = -torch.ones(rows, cols, device=device, dtype=dtype)
        idx = torch.arange(rows, device=device)
        labels[idx, offset + idx] = 1
        if self.cache_labels and not torch.is_inference_mode_enabled():
            # An inference tensor (an eval loop's call) cannot be saved for a training backward.
            self._labels[key] = labels
        return labels

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss of this rank.

        Args:
            image_features, text_features: [B, D], L2-normalised, row i of both is a pair.
            logit_scale: scalar, already exponentiated (SigLIP init: exp(log 10)).
            logit_bias: scalar learnable bias (SigLIP init: -10); required.
            labels: optional multi-positive labels of this rank's rows (LongTensor [B] or [B, T],
                BoolTensor [B, L]; see positives.py); None is the plain loss.
        """
        if logit_bias is None:
            raise ValueError(
                "SigLipLoss needs a logit_bias (a learnable scalar, SigLIP initialises "
                "it to -10); enable the bias in the model or use loss.name=clip"
            )
        check_pairs("SigLipLoss", image_features, text_features)
        image_features, text_features = common_dtype(image_features, text_features)
        logit_scale, logit_bias = scalar_for_autograd(logit_scale), scalar_for_autograd(logit_bias)
        b = image_features.shape[0]
        if labels is not None:
            check_labels(labels, b)
            # CPU labels beside CUDA features built the mask on the CPU: a device mismatch.
            labels = labels.to(image_features.device)
        if self.world_size > 1:
            check_group(self.rank, self.world_size)
        if self.uses_kernels(image_features, logit_bias, labels):
            if labels is not None:
                raise ValueError(
                    "SigLipLoss backend 'triton' does not support multi-positive labels; "
                    "use loss.backend=torch or loss.positives=pair"
                )
            return self._forward_triton(image_features, text_features, logit_scale, logit_bias)
        if self.bidir and self.world_size > 1:
            if p2p_supported(image_features.device):
                return self._forward_bidir(image_features, text_features, logit_scale, logit_bias, labels)
            # Same values and gradients from the gather below; only the logits' memory differs.
            if not self._warned_no_p2p:
                self._warned_no_p2p = True
                log.warning(
                    "SigLipLoss(bidir=True): the process group cannot send %s tensors point to "
                    "point (gloo sends CPU tensors only); all-gathering the texts instead",
                    image_features.device.type,
                )
        all_txt = text_features
        if self.world_size > 1:
            all_txt = all_gather_with_grad(text_features, self.check_shapes)
        logits = logit_scale * at_least_fp32(image_features) @ at_least_fp32(all_txt).T + logit_bias
        if labels is None:
            signs = self.get_ground_truth(logits.device, logits.dtype, *logits.shape)
        else:
            mask = positive_mask(labels, gather_labels(labels, self.world_size), self.rank * b)
            signs = mask.to(logits.dtype) * 2 - 1
        return -F.logsigmoid(signs * logits).sum() / b

    # -- internals ---------------------------------------------------------------------------

    def _forward_bidir(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        scale: torch.Tensor,
        bias: torch.Tensor,
        labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """open_clip's ring: both neighbours at once, then one last hop if the world is even."""
        w, rank, b = self.world_size, self.rank, img.shape[0]
        if self.check_shapes:  # the ring swaps blocks of one shape
            check_same_shape_on_all_ranks(txt)
        all_labels = gather_labels(labels, w) if labels is not None else None

        def block(texts: torch.Tensor, owner: int) -> torch.Tensor:
            cols = all_labels[owner * b : (owner + 1) * b] if all_labels is not None else None
            # Recompute the B x B logits in backward instead of keeping W of them alive.
            return checkpoint(
                _block_loss, img, texts, scale, bias, labels, cols, owner == rank, use_reentrant=False
            )

        left, right = (rank - 1) % w, (rank + 1) % w
        loss = block(txt, rank)
        to_left = to_right = txt
        bidir_steps, remainder = divmod(w - 1, 2)
        for step in range(bidir_steps):
            from_left, from_right = neighbour_exchange_bidir(left, right, to_left, to_right)
            loss = loss + block(from_left, (rank - step - 1) % w) + block(from_right, (rank + step + 1) % w)
            to_left, to_right = from_right, from_left
        if remainder:
            from_left = neighbour_exchange(left, right, to_right)
            loss = loss + block(from_left, (rank - bidir_steps - 1) % w)
        return loss / b

    def uses_kernels(
        self,
        features: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> bool:
        """Whether `forward` runs the Triton kernel for these arguments (see backends.py); the
        kernel takes the bias, so only labels and the ring exchange keep "auto" on torch."""
        supported = labels is None and not self.bidir
        return takes_kernel(self.backend, features, "sigmoid_loss", supported)

    def _forward_triton(
        self, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        try:
            import kernels  # lazy: the trainer must import without Triton installed
        except ImportError as e:
            raise ImportError(
                "SigLipLoss(backend='triton') needs the `kernels` package and Triton; "
                "install with `pip install -e .[kernels]` or use backend='torch'"
            ) from e
        sigmoid_loss = getattr(kernels, "sigmoid_loss", None)
        if sigmoid_loss is None:
            raise NotImplementedError(
                "this `kernels` package has no sigmoid_loss kernel yet; use "
                "loss.backend=torch for loss.name=siglip"
            )
        all_txt = all_gather_with_grad(txt, self.check_shapes) if self.world_size > 1 else txt
        return sigmoid_loss(img, all_txt, scale, bias, label_offset=self.rank * img.shape[0])
