"""Multi-positive labels from the shards' `<key>.json` (`loss.positives`), batched as tensors.

* `pair`: no labels (each sample is a positive of its own title only); batches carry no "labels".
* `category`: `category_id` -> LongTensor [B]; a sample without an integer category_id gets -1
  ("no label": a positive of itself only).
* `tags`: the set of `tags` -> LongTensor [B, T] of stable tag ids, padded with -1 to the
  batch's longest tag list. Ids are 62-bit BLAKE2b hashes of the lower-cased, stripped tag, so
  every worker and rank agrees without a vocabulary file (a collision needs ~2^31 distinct tags).

The losses read these forms directly (vutrain/losses/positives.py).
"""

from __future__ import annotations

import hashlib

import torch

POSITIVES = ("pair", "category", "tags")


def tag_id(tag: str) -> int:
    """Stable non-negative id of a tag ("Cats " and "cats" share one)."""
    digest = hashlib.blake2b(tag.strip().lower().encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def tag_values(value) -> list[str]:
    """The tags of a metadata ``tags`` value: a list's strings, or a comma-separated string's parts
    (some metadata sources keep tags as one string), blanks left out. Training's tag positives
    and the validation tag metrics both read tags through this, so they agree."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list):
        return []
    return [t for t in value if isinstance(t, str) and t.strip()]


def sample_label(meta: dict, positives: str) -> int | list[int] | None:
    """The label of one sample's metadata for `positives` (None for "pair")."""
    if positives == "pair":
        return None
    if positives == "category":
        value = meta.get("category_id")
        if isinstance(value, bool) or value is None:
            return -1
        try:
            return int(value)
        except (TypeError, ValueError):
            return -1
    if positives == "tags":
        return sorted({tag_id(t) for t in tag_values(meta.get("tags"))})
    raise ValueError(f"loss.positives={positives!r} is not valid; choose one of {', '.join(POSITIVES)}")


def collate_labels(labels: list, positives: str) -> torch.Tensor | None:
    """Batch the per-sample labels: LongTensor [B] (category), [B, T] (tags), None (pair)."""
    if positives == "pair":
        return None
    if positives == "category":
        return torch.tensor(labels, dtype=torch.long)
    width = max(1, max((len(t) for t in labels), default=0))
    out = torch.full((len(labels), width), -1, dtype=torch.long)
    for i, ids in enumerate(labels):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
