"""Multi-label retrieval metrics (vutrain/eval_multilabel.py) on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vutrain.eval_multilabel import (
    average_precision,
    multilabel_retrieval,
    multilabel_targets,
    recall_at_k,
    tag_vocabulary,
)


def test_average_precision_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    targets = torch.tensor([[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    ap = average_precision(scores, targets)
    assert ap[0].item() == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert ap[1].item() == pytest.approx(1 / 4)  # the positive ranked last
    assert math.isnan(ap[2].item())


def test_average_precision_stays_on_the_scores_device():
    """A GPU eval scores on CUDA while the targets are built on the host: nothing may assume the
    CPU (the meta device stands in for CUDA here: a CPU tensor meeting it raises, as on CUDA)."""
    scores = torch.empty(3, 5, device="meta")
    targets = torch.zeros(3, 5, dtype=torch.bool)
    assert average_precision(scores, targets).device.type == "meta"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_multilabel_retrieval_on_cuda_features():
    images = F.one_hot(torch.tensor([0, 1, 2]), 3).float().cuda()
    tags = [["a"], ["b"], ["c", "a"]]
    vocab = ["a", "b", "c"]

    def encode_text(prompts):
        return F.one_hot(torch.tensor([vocab.index(p) for p in prompts]), 3).float().cuda()

    on_gpu = multilabel_retrieval(images, tags, encode_text, ["{}"], vocab=vocab, ks=(1,))
    on_cpu = multilabel_retrieval(
        images.cpu(), tags, lambda p: encode_text(p).cpu(), ["{}"], vocab=vocab, ks=(1,)
    )
    assert on_gpu == pytest.approx(on_cpu) and on_cpu["eval/tags_map"] > 0


def test_recall_at_k_by_hand():
    scores = torch.tensor([[0.9, 0.8, 0.7], [0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    targets = torch.tensor([[0, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    r = recall_at_k(scores, targets, ks=(1, 2, 3))
    # row 0: top1 {0} -> 0/2, top2 {0,1} -> 1/2, top3 -> 1; row 1: its tag is ranked 3rd
    assert r == pytest.approx({1: 0.0, 2: 0.25, 3: 1.0})


def test_ties_count_against_the_model():
    """A collapsed model (every score equal) must not score as a perfect one: among tied scores
    the negatives rank first (before, the stable sort put low-index positives first: AP 1.0)."""
    scores = torch.zeros(2, 4)
    targets = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert recall_at_k(scores, targets, ks=(1, 3, 4)) == pytest.approx({1: 0.0, 3: 0.25, 4: 1.0})
    # row 0: its positive ranks 4th (AP 1/4); row 1: 3rd and 4th (AP (1/3 + 2/4) / 2)
    assert average_precision(scores, targets).tolist() == pytest.approx([0.25, (1 / 3 + 0.5) / 2])
    # Ties only among negatives change nothing: the same ranking as before.
    scores = torch.tensor([[0.9, 0.1, 0.1, 0.1]])
    assert average_precision(scores, targets[:1]).tolist() == [1.0]


def test_vocabulary_and_targets():
    tags = [["Cat", "funny "], ["cat"], [], ["dog", "Cat"]]
    vocab = tag_vocabulary(tags)
    assert vocab == ["cat", "dog", "funny"]
    assert tag_vocabulary(tags, min_count=2) == ["cat"]
    assert multilabel_targets(tags, vocab).tolist() == [
        [True, False, True],
        [True, False, False],
        [False, False, False],
        [True, True, False],
    ]


def test_retrieval_with_an_encoder_that_knows_the_tags():
    """Images built from their tags' text embeddings retrieve exactly their tags: mAP = recall = 1."""
    words = ["cat", "dog", "funny", "music"]
    table = F.normalize(torch.randn(len(words), 16, generator=torch.Generator().manual_seed(0)), dim=1)

    def encode_text(prompts):
        return torch.stack([table[next(i for i, w in enumerate(words) if w in p)] for p in prompts])

    tags = [["cat"], ["dog", "funny"], ["music"], ["cat", "music"]]
    images = torch.stack([table[[words.index(t) for t in ts]].sum(0) for ts in tags])
    m = multilabel_retrieval(images, tags, encode_text, ["a video about {}.", "{}"], ks=(1, 2))
    assert m["eval/tags_vocab"] == 4
    assert m["eval/tags_map"] == pytest.approx(1.0)
    assert m["eval/tags_r2"] == pytest.approx(1.0)
    assert m["eval/tags_r1"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)
    shuffled = multilabel_retrieval(images.flip(0), tags, encode_text, ["{}"])
    assert shuffled["eval/tags_map"] < 0.9


def test_nan_scores_count_against_the_model():
    """A NaN score earns nothing: a NaN negative ranks before every positive, a NaN positive after
    every negative (before, torch's sort put NaN first, so a NaN positive ranked top: AP 1.0)."""
    nan = float("nan")
    targets = torch.tensor([[1, 0, 0, 0]], dtype=torch.bool)
    assert average_precision(torch.tensor([[nan, 0.1, 0.2, 0.3]]), targets).tolist() == [0.25]
    assert average_precision(torch.tensor([[0.9, nan, 0.2, 0.3]]), targets).tolist() == [0.5]
    assert recall_at_k(torch.full((1, 4), nan), targets, ks=(1, 3)) == pytest.approx({1: 0.0, 3: 0.0})
