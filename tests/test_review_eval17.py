"""Review of the eval area (17): the tag metrics make the image x tag scores once. mAP scored a
block of tags at a time and recall a block of images, so every score (and its ranking key) was
made twice; now each tag block serves both, each image keeping its best keys over the blocks
([N, 2 max(ks)]), never the whole [N, V] matrix. The values are bit for bit those of the code
before (kept here as the reference)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vutrain import eval_multilabel
from vutrain.eval_multilabel import (
    _against_the_model,
    _block_targets,
    _ordered_ints,
    _rows_per_chunk,
    average_precision,
    multilabel_retrieval,
)


def _before_hits_in_top(scores, targets, ks):
    """``hits_in_top`` as it was: two torch top-k per row."""
    top = min(max(ks), scores.shape[1])
    keys = _ordered_ints(_against_the_model(scores, targets))
    absent = torch.iinfo(keys.dtype).min
    negatives = torch.where(targets, absent, keys).topk(top, dim=1).values
    positives = torch.where(targets, keys, absent).topk(top, dim=1).values
    found = positives > absent
    before = top - torch.searchsorted(negatives.flip(1), positives)
    rank = torch.arange(top) + before
    return {k: ((rank < k) & found).sum(dim=1).float() for k in ks}


def _before(images, tags, pairs, ks):
    """The two passes as they were: ([V] AP by blocks of tags, per k the recall by blocks of images)."""
    n, v = images.shape[0], tags.shape[0]
    step = _rows_per_chunk(n)
    aps = []
    for start in range(0, v, step):
        stop = min(start + step, v)
        scores = images @ tags[start:stop].T
        aps.append(average_precision(scores.T, _block_targets(pairs[:, 1], pairs[:, 0], start, stop, n)))
    step = _rows_per_chunk(v)
    parts: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, n, step):
        stop = min(start + step, n)
        targets = _block_targets(pairs[:, 0], pairs[:, 1], start, stop, v)
        keep = targets.any(dim=1)
        scores, targets = (images[start:stop] @ tags.T)[keep], targets[keep]
        total = targets.sum(dim=1).float()
        for k, found in _before_hits_in_top(scores, targets, ks).items():
            parts[k].append(found / total)
    return torch.cat(aps), {k: torch.cat(p) for k, p in parts.items()}


def _metrics(per_tag, per_image, prefix="eval/tags_"):
    out = {f"{prefix}map": per_tag[~per_tag.isnan()].mean().item()}
    out.update(
        {f"{prefix}r{k}": r.mean().item() if r.numel() else float("nan") for k, r in per_image.items()}
    )
    return out


def _case(seed: int, exact: bool):
    """Images and tags with ties: duplicate images (a reused thumbnail), duplicate tags (one
    embedding), a NaN image, images without a vocabulary tag, one with every tag, a tag without
    an image. exact: +-1/4 entries, so every dot product is exact and ties are many."""
    gen = torch.Generator().manual_seed(seed)
    n, v, dim = 37 + seed, 23 + seed % 3, 16
    if exact:
        images = (torch.randint(0, 2, (n, dim), generator=gen).float() * 2 - 1) / dim**0.5
        table = (torch.randint(0, 2, (v, dim), generator=gen).float() * 2 - 1) / dim**0.5
    else:
        images = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
        table = torch.nn.functional.normalize(torch.randn(v, dim, generator=gen), dim=-1)
    images[4] = images[2]  # the same thumbnail twice
    images[9] = float("nan")
    table[7] = table[3]  # two tags the model cannot tell apart
    vocab = [f"tag{j}" for j in range(v)]
    tag_lists = [[vocab[j] for j in torch.randperm(v - 1, generator=gen)[: i % 6].tolist()] for i in range(n)]
    tag_lists[2] = list(vocab[:-1])  # every tag but the last, which no image carries
    tag_lists[4] = ["tag3", "tag3", "TAG3"]  # one tag, given three times
    return images, table, vocab, tag_lists


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("chunk", [150, 100, 2**24])  # blocks of 4 or 2 tags (not dividing V), or one
@pytest.mark.parametrize("seed", range(3))
def test_shared_blocks_give_the_metrics_of_the_two_passes_bit_for_bit(monkeypatch, seed, chunk, exact):
    images, table, vocab, tag_lists = _case(seed, exact)
    encode = lambda prompts: table[[vocab.index(p) for p in prompts]]  # noqa: E731
    ks = (1, 5, 10, len(vocab) + 4)  # a k past the vocabulary
    monkeypatch.setattr(eval_multilabel, "SCORE_CHUNK_ELEMENTS", chunk)
    normalised = torch.nn.functional.normalize(images.float(), dim=-1)
    tags = eval_multilabel.tag_embeddings(encode, vocab, ["{}"])
    pairs = eval_multilabel.target_pairs(tag_lists, vocab)
    want_tag, want_image = _before(normalised, tags, pairs, ks)

    got_tag, got_image = eval_multilabel._per_tag_and_per_image(normalised, tags, pairs, ks)
    assert torch.equal(got_tag.nan_to_num(-1.0), want_tag.nan_to_num(-1.0))
    assert got_image.keys() == want_image.keys()
    assert all(torch.equal(got_image[k], want_image[k]) for k in ks)
    doubled = torch.cat([pairs, pairs])  # a pair given twice is still one true tag
    assert all(
        torch.equal(r, want_image[k])
        for k, r in eval_multilabel._per_tag_and_per_image(normalised, tags, doubled, ks)[1].items()
    )

    got = multilabel_retrieval(images, tag_lists, encode, ["{}"], vocab=vocab, ks=ks)
    assert got == {"eval/tags_vocab": float(len(vocab)), **_metrics(want_tag, want_image)}
    assert 0 < got["eval/tags_map"] < 1


class _Products(TorchDispatchMode):
    """The output shape of every matrix product while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "matmul", "mv"):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("chunk", [150, 2**24])
def test_every_image_tag_score_is_made_once_a_block_at_a_time(monkeypatch, chunk):
    """Before: 2 N V scores (a pass by blocks of tags for mAP, one by blocks of images for recall)."""
    images, table, vocab, tag_lists = _case(0, exact=False)
    n, v = images.shape[0], len(vocab)
    encode = lambda prompts: table[[vocab.index(p) for p in prompts]]  # noqa: E731
    monkeypatch.setattr(eval_multilabel, "SCORE_CHUNK_ELEMENTS", chunk)
    with _Products() as products:
        multilabel_retrieval(images, tag_lists, encode, ["{}"], vocab=vocab)
    assert sum(torch.Size(s).numel() for s in products.shapes) == n * v
    assert max(torch.Size(s).numel() for s in products.shapes) <= max(chunk, n)  # a block, never [N, V]
    if chunk < n * v:
        assert len(products.shapes) > 1
