"""Multi-positive labels from the shards' `<key>.json` (`loss.positives`), batched as tensors.

* `pair`: no labels (each sample is a positive of its own title only); batches carry no "labels".
* `category`: `category_id` -> LongTensor [B]; a sample without an integer category_id gets -1
  ("no label": a positive of itself only).
* `tags`: the set of `tags` (read by ``tag_text.tag_values``: a list, or a string split on ``|`` or
  ``,``, HTML entities decoded) -> LongTensor [B, T] of stable tag ids, padded with -1 to the
  batch's longest tag list. Ids are 62-bit BLAKE2b hashes of the normalised tag (``normalize_tag``:
  NFKC, case-folded, whitespace runs as one space, stripped), so every worker and rank agrees without
  a vocabulary file (a collision needs ~2^31 distinct tags).

The losses read these forms directly (vutrain/losses/positives.py).
"""

from __future__ import annotations

import hashlib

import torch

from vutrain.tag_text import normalize_tag, tag_values

POSITIVES = ("pair", "category", "tags")


def tag_id(tag: str) -> int:
    """Stable non-negative id of a tag ("Cats " and "cats", "Straße" and "STRASSE" share one;
    see ``normalize_tag``)."""
    digest = hashlib.blake2b(normalize_tag(tag).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def sample_label(meta: dict, positives: str) -> int | list[int] | None:
    """The label of one sample's metadata for `positives` (None for "pair")."""
    if positives == "pair":
        return None
    if positives == "category":
        return category_label(meta.get("category_id"))
    if positives == "tags":
        return sorted({tag_id(t) for t in tag_values(meta.get("tags"))})
    raise ValueError(f"loss.positives={positives!r} is not valid; choose one of {', '.join(POSITIVES)}")


def category_label(value) -> int:
    """A ``category_id`` as a class id: an integer, an integral float (20.0: pandas writes an int
    column with gaps as floats) or a string of either ("20", " 20.0 ", as the dataset tools read
    category ids); anything else is -1 ("no label"). A fraction (20.5 was category 20), NaN or
    Infinity (``int(inf)`` raised OverflowError, which dropped the sample as a preprocess error) and
    an id beyond int64 (which crashed the batch's collate) are -1."""
    if isinstance(value, bool) or value is None:
        return -1
    if isinstance(value, str):
        value = _number_of_text(value)
    if isinstance(value, float):
        return _int64_or_no_label(int(value)) if value.is_integer() else -1
    try:
        number = int(value)
    except (TypeError, ValueError):
        return -1
    return _int64_or_no_label(number)


def _number_of_text(text: str) -> int | float | None:
    # "20.0" (a float column written as text) was -1 while the number 20.0 was 20: the same
    # category was a class and no label depending on how the metadata was serialised.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return None


def _int64_or_no_label(number: int) -> int:
    return number if -(1 << 63) <= number < (1 << 63) else -1


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
