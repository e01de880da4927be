"""Multi-label retrieval over the tag vocabulary: mAP and recall@k of images against tag prompts.

A YouTube thumbnail has several true tags ("cat", "funny", "compilation"), so one-label top-1
says little. Here every tag of the vocabulary becomes a text query (its prompts averaged, as for
zero-shot classes), every validation image is scored against all tags, and:

* `eval/tags_map`: mean over tags of the average precision of ranking all images for that tag
  (the standard multi-label classification mAP; tags with no positive image are left out);
* `eval/tags_r{k}`: mean over images (with at least one tag in the vocabulary) of the fraction
  of its tags found among its k best-scoring tags.

Inputs are plain tensors and lists, so the metric is independent of the trainer; `evaluate.py`
calls `multilabel_retrieval` with the gathered image features and each image's tag list.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vutrain.data.labels import normalize_tag

RECALL_KS = (1, 5, 10)


@functools.lru_cache(maxsize=2**20)  # more than the distinct tags of 50k samples of 15 tags each
def normalized_tag(tag: str) -> str:
    """``normalize_tag``, memoised for the run: a held-out set's tags are the same at every eval,
    and 50k samples of 3-15 tags were ~1.35 million calls per eval (the vocabulary, the prompt
    merge's renaming, the target pairs), some 10 s of host time, for ~10^5 distinct spellings."""
    return normalize_tag(tag)


def tag_vocabulary(tag_lists: list[list[str]], min_count: int = 1, max_tags: int | None = None) -> list[str]:
    """Distinct normalised tags (``labels.normalize_tag``, as training ids them) of >= min_count
    images, most frequent first.

    A tag counts once per image: YouTube tag lists repeat a tag in other cases ("Minecraft",
    "minecraft"), which made a tag of few images outrank one of many for the vocabulary."""
    counts = Counter(t for tags in tag_lists for t in {normalized_tag(t) for t in tags if t and t.strip()})
    vocab = sorted((t for t, c in counts.items() if c >= min_count), key=lambda t: (-counts[t], t))
    return vocab[:max_tags] if max_tags else vocab


def multilabel_targets(tag_lists: list[list[str]], vocab: list[str]) -> torch.Tensor:
    """BoolTensor [N, V]: image n carries tag v (tags outside the vocabulary are ignored)."""
    index = {normalized_tag(t): i for i, t in enumerate(vocab)}
    out = torch.zeros(len(tag_lists), len(vocab), dtype=torch.bool)
    for n, tags in enumerate(tag_lists):
        for t in tags:
            i = index.get(normalized_tag(t)) if t else None
            if i is not None:
                out[n, i] = True
    return out


def _against_the_model(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The scores with a NaN ranked against the model: a negative's as +inf, a positive's as -inf."""
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    return torch.where(scores.isnan(), torch.where(targets, -inf, inf), scores)


def _ordered_ints(scores: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the (NaN-free) scores, equal exactly where the scores are: int32 for
    floats of up to 32 bits (widened to float32 exactly), int64 for float64. A float's bits read as
    a signed integer order the non-negative floats; the negative ones need the bits below the sign
    flipped. -0.0 is made 0.0 first (they tie as scores, their bits differ)."""
    scores = scores.detach()
    if scores.dtype != torch.float64:
        scores = scores.float()
    bits = (scores + 0.0).view(torch.int32 if scores.dtype == torch.float32 else torch.int64)
    width = bits.element_size() * 8
    return bits ^ ((bits >> (width - 1)) & torch.iinfo(bits.dtype).max)


def ranked_hits(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[R, C] float: each row's targets in order of falling score. Ties go against the model:
    among equal scores the negatives come first, so a collapsed model (all scores equal) earns no
    credit. So does a NaN score: a negative's ranks first, a positive's last.

    One sort of integer keys per row (falling score, then positive last), whose lowest bit is the
    target: the two stable argsorts and three gathers it replaces were half the time of a
    50k-sample eval's tag metrics."""
    targets = targets.to(scores.device)
    scores = _against_the_model(scores, targets)
    if scores.dtype == torch.float64:  # 64 score bits leave no room for the row and the target
        negatives_first = targets.to(torch.uint8).argsort(dim=1, stable=True)
        by_score = scores.gather(1, negatives_first).argsort(dim=1, descending=True, stable=True)
        return targets.gather(1, negatives_first.gather(1, by_score)).float()
    return _hits_of_keys(_ordered_ints(scores), targets)


def _hits_of_keys(keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``ranked_hits`` from the scores' ``_ordered_ints`` keys (NaN against the model), 32-bit ones."""
    keys = torch.add(targets.long(), keys, alpha=-2)  # rising key: falling score, then positive last
    return (_sorted_rows(keys) & 1).float()


def _sorted_rows(keys: torch.Tensor) -> torch.Tensor:
    """Each row of the integer keys in rising order. On the CPU numpy's vectorised sort: some 10x
    faster than torch's, which also builds the indices that are not wanted here."""
    if keys.device.type == "cpu":
        return torch.from_numpy(np.sort(keys.numpy(), axis=1))
    return keys.sort(dim=1).values


def hits_in_top(scores: torch.Tensor, targets: torch.Tensor, ks=RECALL_KS) -> dict[int, torch.Tensor]:
    """Per k, [R] float: the positives among each row's k first in ``ranked_hits``'s order (ties and
    NaN against the model), without ranking whole rows: the k best negatives and positives of a row
    (two top-k) place each of its k best positives, after the negatives that score as much."""
    targets = targets.to(scores.device)
    keys = _ordered_ints(_against_the_model(scores, targets))
    return _hits_of_best(*_best_keys(keys, targets, min(max(ks), scores.shape[1])), ks)


def _best_keys(keys: torch.Tensor, targets: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([R, top], [R, top]), falling: of each row's scores' ``_ordered_ints`` keys (NaN against the
    model), those of its ``top`` best negatives and positives; the integer type's minimum where a
    row has fewer. The best of some columns' best are those of all columns (``_merge_best``)."""
    absent = torch.iinfo(keys.dtype).min  # below every score's key
    negatives = torch.where(targets, absent, keys).topk(top, dim=1).values
    return negatives, torch.where(targets, keys, absent).topk(top, dim=1).values


def _merge_best(kept: torch.Tensor | None, block: torch.Tensor, top: int) -> torch.Tensor:
    """The ``top`` largest keys of each row of ``kept`` and ``block`` together (falling); keys are
    exact integers, so these are the values a top-k of the rows whole gives."""
    both = block if kept is None else torch.cat([kept, block], dim=1)
    return both.topk(min(top, both.shape[1]), dim=1).values


def _hits_of_best(negatives: torch.Tensor, positives: torch.Tensor, ks) -> dict[int, torch.Tensor]:
    """``hits_in_top`` from ``_best_keys``."""
    top = negatives.shape[1]
    absent = torch.iinfo(negatives.dtype).min
    found = positives > absent
    # The j-th best positive ranks at j + (negatives scoring >= it), counted among the `top` best
    # negatives: enough for any rank below max(ks). An absent negative is below every positive.
    before = top - torch.searchsorted(negatives.flip(1), positives)
    rank = torch.arange(top, device=negatives.device) + before
    return {k: ((rank < k) & found).sum(dim=1).float() for k in ks}


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """AP of each row's ranking: scores, targets [R, C] -> [R] (NaN for rows without a positive).

    AP = mean over the positives of the precision at their rank (ties: ``ranked_hits``).
    """
    return _average_precision_of_hits(ranked_hits(scores, targets))


def _average_precision_of_hits(hits: torch.Tensor) -> torch.Tensor:
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float32, device=hits.device)
    precision = hits.cumsum(dim=1) / ranks
    positives = hits.sum(dim=1)
    ap = (precision * hits).sum(dim=1) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def recall_at_k(scores: torch.Tensor, targets: torch.Tensor, ks=RECALL_KS) -> dict[int, float]:
    """Mean over rows with a positive of (positives in the row's top k) / (row's positives)."""
    targets = targets.to(scores.device)
    keep = targets.any(dim=1)
    scores, targets = scores[keep], targets[keep]
    if scores.shape[0] == 0:
        return {k: float("nan") for k in ks}
    total = targets.sum(dim=1).float()
    return {k: (found / total).mean().item() for k, found in hits_in_top(scores, targets, ks).items()}


@torch.no_grad()
def tag_embeddings(
    encode_text: Callable[[list[str]], torch.Tensor], vocab: list[str], templates: list[str]
) -> torch.Tensor:
    """[V, E]: per tag, the normalised mean of its normalised prompt embeddings."""
    prompts = [t.format(tag) for tag in vocab for t in templates]
    feats = encode_text(prompts).float().reshape(len(vocab), len(templates), -1)
    return F.normalize(F.normalize(feats, dim=-1).mean(dim=1), dim=-1)


SCORE_CHUNK_ELEMENTS = 2**24
"""Image-tag scores ranked at a time (64 MB in fp32, beside a few int64 sort temporaries of the
same shape): the whole [N, V] score matrix, its targets and its sorts were 4 GB and more each at
50k validation images and a 20k-tag vocabulary."""


def _rows_per_chunk(n_columns: int) -> int:
    return max(1, SCORE_CHUNK_ELEMENTS // max(n_columns, 1))


def target_pairs(tag_lists: list[list[str]], vocab: list[str]) -> torch.Tensor:
    """LongTensor [P, 2]: the (image, vocabulary index) pairs of ``multilabel_targets``, without
    its [N, V] matrix."""
    index = {normalized_tag(t): i for i, t in enumerate(vocab)}
    found = ((n, index.get(normalized_tag(t))) for n, tags in enumerate(tag_lists) for t in tags if t)
    return torch.tensor(sorted({(n, i) for n, i in found if i is not None}), dtype=torch.long).reshape(-1, 2)


def _block_targets(rows: torch.Tensor, cols: torch.Tensor, start: int, stop: int, width: int) -> torch.Tensor:
    """BoolTensor [stop - start, width]: the pairs (row, col) whose row is in [start, stop)."""
    inside = (rows >= start) & (rows < stop)
    out = torch.zeros(stop - start, width, dtype=torch.bool, device=rows.device)
    out[rows[inside] - start, cols[inside]] = True
    return out


def _per_tag_and_per_image(
    images: torch.Tensor, tags: torch.Tensor, pairs: torch.Tensor, ks
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """([V], per k [I]): each tag's AP over all N images, and per image with a tag of the vocabulary
    (I of them, in order) the share of its tags among its k best (``recall_at_k`` row by row).

    One score product, a block of tags at a time ([N, block] scores): the block's columns rank its
    tags whole for AP, and each image keeps its ``max(ks)`` best negative and positive keys over
    the blocks so far ([N, 2 max(ks)]), which place its best positives as whole rows would. Recall
    scored a block of images at a time, a second product of every image with every tag and a second
    making of every score's key: 6.3 CPU-seconds of tag metrics at 50k samples and 1000 tags, now 5.4."""
    n, v = images.shape[0], tags.shape[0]
    step = _rows_per_chunk(n)
    top = min(max(ks), v)
    per_tag = []
    negatives = positives = None
    # (pairs made distinct: a pair given twice is one true tag, as in the [N, V] targets)
    tags_of_image = torch.bincount(torch.unique(pairs, dim=0)[:, 0], minlength=n)
    for start in range(0, v, step):
        stop = min(start + step, v)
        scores = images @ tags[start:stop].T  # as the columns of images @ tags.T
        targets = _block_targets(pairs[:, 1], pairs[:, 0], start, stop, n)
        # One set of integer keys for both metrics: making them was most of recall's own time.
        keys = _ordered_ints(_against_the_model(scores, targets.T))
        if keys.dtype == torch.int64:  # float64 scores: no room for the target beside the score
            per_tag.append(average_precision(scores.T, targets))
        else:
            per_tag.append(_average_precision_of_hits(_hits_of_keys(keys.T, targets)))
        block_negatives, block_positives = _best_keys(keys, targets.T, min(top, stop - start))
        negatives = _merge_best(negatives, block_negatives, top)
        positives = _merge_best(positives, block_positives, top)
    keep = tags_of_image > 0  # an image without a vocabulary tag has no recall
    total = tags_of_image[keep].float()
    found = _hits_of_best(negatives[keep], positives[keep], ks)
    return torch.cat(per_tag), {k: hits / total for k, hits in found.items()}


@torch.no_grad()
def multilabel_retrieval(
    image_features: torch.Tensor,
    tag_lists: list[list[str]],
    encode_text: Callable[[list[str]], torch.Tensor],
    templates: list[str],
    vocab: list[str] | None = None,
    ks=RECALL_KS,
    prefix: str = "eval/tags_",
    pairs: torch.Tensor | None = None,
) -> dict[str, float]:
    """mAP over tags and recall@k over images (see the module doc).

    The [N, V] scores are never made whole: they are made once, a block of tags at a time (at most
    ``SCORE_CHUNK_ELEMENTS`` scores), for mAP and recall, with the values of the whole matrix.

    Args:
        image_features: [N, E] (normalised here), the images of the whole validation set.
        tag_lists: N lists of tag strings (the `tags` field of each `<key>.json`).
        encode_text: list of prompts -> [P, E] text features.
        templates: prompt templates with '{}' for the tag.
        vocab: the tags to rank; default every tag seen in `tag_lists`.
        pairs: ``target_pairs(tag_lists, vocab)`` when the caller has it (kept across evals).
    """
    vocab = tag_vocabulary(tag_lists) if vocab is None else vocab
    metrics: dict[str, float] = {f"{prefix}vocab": float(len(vocab))}
    if not vocab or image_features.shape[0] == 0:
        return metrics
    images = F.normalize(image_features.float(), dim=-1)
    tags = tag_embeddings(encode_text, vocab, templates).to(images.device)
    pairs = target_pairs(tag_lists, vocab) if pairs is None else pairs
    pairs = pairs.to(images.device)  # on a GPU run: CUDA scores
    per_tag, per_image_recall = _per_tag_and_per_image(images, tags, pairs, ks)
    metrics[f"{prefix}map"] = per_tag[~per_tag.isnan()].mean().item()
    for k, per_image in per_image_recall.items():
        metrics[f"{prefix}r{k}"] = per_image.mean().item() if per_image.numel() else float("nan")
    return metrics
