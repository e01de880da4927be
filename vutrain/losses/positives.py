"""Multi-positive labels: which in-batch pairs are positives of each other.

YouTube samples carry a category and tags, so two thumbnails of the same category (or sharing a
tag) are not true negatives. A loss given `labels` treats samples i and j as positives when they
share a label; a sample is always a positive of itself (its own image-title pair), also when it
has no label at all.

Accepted forms of `labels` (this rank's rows; gathered across ranks like the features):

* LongTensor [B]: one class id per sample (e.g. `category_id`); a negative id means "no label".
* LongTensor [B, T]: a set of ids per sample (e.g. hashed tags), padded with -1. The width T may
  differ between ranks (the gather pads to the widest).
* BoolTensor [B, L]: multi-hot over a vocabulary of L labels. L may differ between ranks (the
  gather pads with False to the widest: columns past a rank's L are labels none of its rows has).

`positive_mask(row_labels, col_labels, offset)` gives the [R, C] boolean matrix used by the
losses; its memory is O(R x C x T) at most, never O(C x vocabulary).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vutrain.losses.gather import small_collective_device


def check_labels(labels: torch.Tensor, batch: int) -> None:
    """Raise a clear ValueError if `labels` is not one of the accepted forms for `batch` rows."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(
            f"labels must be a tensor (LongTensor [B] / [B, T] or BoolTensor [B, L]), "
            f"got {type(labels).__name__}"
        )
    ok_dtype = labels.dtype == torch.bool or labels.dtype in (torch.int64, torch.int32)
    if not ok_dtype or labels.dim() not in (1, 2) or (labels.dtype == torch.bool and labels.dim() != 2):
        raise ValueError(
            f"labels must be LongTensor [B], LongTensor [B, T] (id sets, -1 padded) or "
            f"BoolTensor [B, L] (multi-hot); got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if labels.shape[0] != batch:
        raise ValueError(
            f"labels has {labels.shape[0]} rows but the features have {batch}; pass one "
            "label entry per sample"
        )


def gather_labels(labels: torch.Tensor, world_size: int) -> torch.Tensor:
    """All ranks' labels concatenated in rank order (no gradient; labels are constants).

    2-D labels may have a different width per rank: id sets ([B, T] long) are padded with -1
    and multi-hot rows ([B, L] bool) with False to the widest first (one extra scalar
    all-reduce). Bool is sent as uint8 (not every backend reduces or gathers bool).
    """
    if world_size == 1:
        return labels
    x = labels.to(torch.uint8) if labels.dtype == torch.bool else labels.long()
    if x.dim() == 2:
        x = _pad_to_widest_rank(x, no_label=0 if labels.dtype == torch.bool else -1)
    parts = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    out = torch.cat(parts, dim=0)
    return out.bool() if labels.dtype == torch.bool else out


def _pad_to_widest_rank(x: torch.Tensor, no_label: int) -> torch.Tensor:
    """`x` [B, T] padded with `no_label` columns to the widest T of all ranks.

    The all-gather needs one shape on every rank (gloo aborts the process on a mismatch). A
    multi-hot column past a rank's width is a label none of its samples has, so False padding
    keeps the positive mask; -1 is the id sets' "no id".
    """
    # The widest T is needed on the host (to pad). On a GPU, a width made and read on the
    # device costs a blocking copy and a read, each waiting for the device queue, at every
    # micro-batch: see small_collective_device.
    width = torch.full((1,), x.shape[1], dtype=torch.long, device=small_collective_device(x.device))
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    pad = int(width.item()) - x.shape[1]
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad), no_label)], dim=1)
    return x


def positive_mask(row_labels: torch.Tensor, col_labels: torch.Tensor, offset: int | None = 0) -> torch.Tensor:
    """[R, C] bool: True where row i and column j share a label, and at (i, offset + i).

    `row_labels` [R, ...] and `col_labels` [C, ...] have the same form (see the module doc);
    the rows are columns `offset .. offset + R - 1` themselves (each sample its own positive).
    `offset=None`: the columns hold none of the rows' own pairs (another rank's chunk).
    """
    r, c = row_labels, col_labels
    if r.dtype == torch.bool:
        # multi-hot: shared label <=> the dot product of the two indicator rows is > 0. A rank's
        # own rows may be narrower than the gathered (padded) columns; a label past the narrower
        # width is on one side only, so it never makes a shared label.
        width = min(r.shape[1], c.shape[1])
        mask = (r[:, :width].float() @ c[:, :width].float().T) > 0
    elif r.dim() == 1:
        mask = (r[:, None] == c[None, :]) & (r[:, None] >= 0)
    else:
        # id sets: one pass per row slot keeps memory at R x C x T instead of R x C x T x T
        mask = torch.zeros(r.shape[0], c.shape[0], dtype=torch.bool, device=r.device)
        valid_c = c >= 0
        for a in range(r.shape[1]):
            ids = r[:, a]
            hit = ((ids[:, None, None] == c[None]) & valid_c[None]).any(dim=-1)
            mask |= hit & (ids >= 0)[:, None]
    if offset is not None:
        idx = torch.arange(r.shape[0], device=mask.device)
        mask[idx, offset + idx] = True
    return mask


def concat_labels(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate the labels of several micro-batches, 2-D ones padded to the widest first
    (id sets with -1, multi-hot rows with False: the columns past a part's width are labels
    none of its samples has)."""
    if parts[0].dim() == 2:
        width = max(p.shape[1] for p in parts)
        parts = [_pad_columns(p, width) for p in parts]
    return torch.cat(parts, dim=0)


def _pad_columns(labels: torch.Tensor, width: int) -> torch.Tensor:
    no_label = False if labels.dtype == torch.bool else -1
    pad = labels.new_full((labels.shape[0], width - labels.shape[1]), no_label)
    return torch.cat([labels, pad], dim=1)
