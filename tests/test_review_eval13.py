"""Review of the eval area (13): the tag metrics rank without sorting whole rows twice (two stable
argsorts of every [block, N] and [block, V] score block were half a 50k-sample eval's tag-metric
time): mAP sorts one integer key per score, recall@k takes two top-k per image. The values stay
bit for bit those of a straightforward full-matrix reference, ties and NaN against the model."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vutrain import eval_multilabel
from vutrain.eval_multilabel import average_precision, multilabel_retrieval, ranked_hits, recall_at_k


def _reference_hits(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row, the targets by falling score; among equal scores the negatives first; a NaN score
    ranks a negative first and a positive last (-0.0 ties 0.0, as floats compare)."""
    out = []
    for row, labels in zip(scores.double().tolist(), targets.tolist(), strict=True):
        fixed = [
            (-math.inf if t else math.inf) if math.isnan(s) else s for s, t in zip(row, labels, strict=True)
        ]
        out.append([t for _, t in sorted(zip(fixed, labels, strict=True), key=lambda p: (-p[0], p[1]))])
    return torch.tensor(out, dtype=torch.float32).reshape(scores.shape)


def _reference_ap(hits: torch.Tensor) -> torch.Tensor:
    """Mean precision at the positives' ranks (the metric's float32 formula, so equal bit for bit)."""
    precision = hits.cumsum(dim=1) / torch.arange(1, hits.shape[1] + 1, dtype=torch.float32)
    positives = hits.sum(dim=1)
    ap = (precision * hits).sum(dim=1) / positives.clamp_min(1)
    return torch.where(positives > 0, ap, torch.full_like(ap, float("nan")))


def _reference_recall(hits: torch.Tensor, ks) -> dict[int, float]:
    keep = hits.sum(dim=1) > 0
    hits = hits[keep]
    return {k: (hits[:, :k].sum(dim=1) / hits.sum(dim=1)).mean().item() for k in ks}


def _case(seed: int, dtype: torch.dtype):
    rnd = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    rows, cols = rnd.randint(2, 9), rnd.randint(1, 30)
    scores = (torch.randint(-3, 4, (rows, cols), generator=gen) * 0.25).to(dtype)  # a few values: ties
    if seed % 3 == 0:
        scores = torch.randn(rows, cols, generator=gen).to(dtype)
    u = torch.rand(rows, cols, generator=gen)
    scores[u < 0.08] = float("nan")
    scores[(u >= 0.08) & (u < 0.12)] = float("inf")
    scores[(u >= 0.12) & (u < 0.16)] = -float("inf")
    scores[(u >= 0.16) & (u < 0.22)] = -0.0
    targets = torch.rand(rows, cols, generator=gen) < rnd.random()
    targets[0] = True  # a row with all positives
    targets[1] = False  # a row without one
    return scores, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", range(12))
def test_ranking_ap_and_recall_equal_a_full_matrix_reference(seed, dtype):
    scores, targets = _case(seed, dtype)
    hits = _reference_hits(scores, targets)
    assert torch.equal(ranked_hits(scores, targets), hits)
    assert torch.equal(
        average_precision(scores, targets).nan_to_num(-1.0), _reference_ap(hits).nan_to_num(-1.0)
    )
    ks = (1, 2, 5, 10, scores.shape[1] + 7)  # K larger than the vocabulary
    assert recall_at_k(scores, targets, ks) == _reference_recall(hits, ks)  # exact, not approx


def test_ties_and_nan_by_hand():
    """Equal scores rank the negatives first; a NaN positive ranks after every negative, even -inf."""
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.1], [nan, -inf, -inf, 0.0], [-0.0, 0.0, 1.0, 0.0]])
    targets = torch.tensor([[1, 0, 0, 1], [1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert ranked_hits(scores, targets).tolist() == [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]]
    assert recall_at_k(scores, targets, ks=(1, 3, 4)) == pytest.approx({1: 0.0, 3: 1 / 6, 4: 1.0})


class _Ops(TorchDispatchMode):
    """Records every op (and the shapes of its outputs) while active."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        self.calls.append((str(func.overloadpacket.__name__), tuple(getattr(first, "shape", ()))))
        return out


def test_blocked_tag_metrics_equal_the_reference_and_sort_no_rows_twice(monkeypatch):
    """multilabel_retrieval in blocks equals the full-matrix reference exactly; it ran two stable
    argsorts of every block for mAP and again for recall, now none for recall (top-k) and none in
    torch for mAP on the CPU (one numpy sort of integer keys)."""
    n, v = 37, 23
    gen = torch.Generator().manual_seed(5)
    vocab = [f"tag{j}" for j in range(v)]
    tag_lists = [[vocab[j] for j in torch.randperm(v, generator=gen)[: i % 5].tolist()] for i in range(n)]
    tag_lists[3] = list(vocab)  # an image with every tag
    dim = 16  # +-1/4 entries: exact dot products, many ties
    images = (torch.randint(0, 2, (n, dim), generator=gen).float() * 2 - 1) / dim**0.5
    table = (torch.randint(0, 2, (v, dim), generator=gen).float() * 2 - 1) / dim**0.5
    images[6] = float("nan")
    vocab_with_unused = vocab + ["nobody"]  # a tag without a positive image
    table = torch.cat([table, table[:1]])  # ... tied with tag0 everywhere
    encode = lambda prompts: table[[vocab_with_unused.index(p) for p in prompts]]  # noqa: E731

    scores = torch.nn.functional.normalize(images, dim=-1) @ table.T
    targets = eval_multilabel.multilabel_targets(tag_lists, vocab_with_unused)
    ap = _reference_ap(_reference_hits(scores.T, targets.T))
    ks = (1, 5, 10, 40)
    want = {"eval/tags_vocab": float(v + 1), "eval/tags_map": ap[~ap.isnan()].mean().item()}
    want.update(
        {f"eval/tags_r{k}": r for k, r in _reference_recall(_reference_hits(scores, targets), ks).items()}
    )

    monkeypatch.setattr(eval_multilabel, "SCORE_CHUNK_ELEMENTS", 150)  # blocks of 4 tags, of 6 images
    with _Ops() as ops:
        got = multilabel_retrieval(images, tag_lists, encode, ["{}"], vocab=vocab_with_unused, ks=ks)
    assert got == want
    assert 0 < got["eval/tags_map"] < 1
    assert [c for c in ops.calls if c[0] == "sort"] == []  # before: 2 stable argsorts per block
    assert any(name == "topk" for name, _ in ops.calls)
