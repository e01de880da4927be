"""Review of the eval area (6): identical images and identical captions credit only true pairs
(an image's right captions are the captions of its copies, not of everything a chain reaches),
checked against a float64 reference computed pair by pair."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bpe_tokenizers import LONG_A, LONG_B, cut_alike_tokenizer, perfect_tag_model

from vutrain.evaluate import evaluate, feature_recall_at_k


def _reference_recall(sim: np.ndarray, row_groups, key_groups, ks) -> dict[int, float]:
    """float64, loop by loop: column j is right for row i when some sample k shares row i's
    query group and column j's key group; the rank counts wrong columns that beat or tie the best
    right one (NaN: a NaN wrong column beats it, an all-NaN right set misses)."""
    n = sim.shape[0]
    hits = {k: 0 for k in ks}
    for i in range(n):
        right = [
            j
            for j in range(n)
            if any(row_groups[k] == row_groups[i] and key_groups[k] == key_groups[j] for k in range(n))
        ]
        finite = [sim[i, j] for j in right if not np.isnan(sim[i, j])]
        if not finite:
            continue
        best = max(finite)
        rank = sum(1 for j in range(n) if j not in right and (np.isnan(sim[i, j]) or sim[i, j] >= best))
        for k in ks:
            hits[k] += rank < k
    return {k: hits[k] / n for k in ks}


class _LookupEngine(torch.nn.Module):
    """Image features: ``images[pixel_values[:, 0, 0, 0]]``; text features: ``texts[input_ids[:, 0]]``."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": images.shape[1]})})()
        self.images, self.texts = images, texts

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, self.texts[input_ids[:, 0]], None, None


def _batch(images: list[int], captions: list[int]) -> dict:
    n = len(images)
    return dict(
        pixel_values=torch.tensor(images, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        input_ids=torch.tensor(captions).view(n, 1),
        attention_mask=torch.ones(n, 1, dtype=torch.long),
        labels=[""] * n,
        image_ids=[f"jpeg{i}" for i in images],
    )


def test_a_chain_of_a_reused_image_and_a_shared_title_credits_no_foreign_pair():
    """Samples A (image 0, title 0), B (image 0, title 1), C (image 1, title 1), D (image 2, title 2).
    C's image is neither A's image nor an image of A's title, but the groups joined transitively
    (A-B by image, B-C by title), so a model that ranks C's image first for A's title, and ties A's
    title with C's own for C's image, scored i2t and t2i R@1 of 1.0. Right pairs now come through
    one shared sample: R@1 is 0.75 both ways, the float64 reference's value."""
    images, captions = [0, 0, 1, 2], [0, 1, 1, 2]
    eye = torch.eye(3)
    image_feats = eye  # images 0, 1, 2 along three axes
    # title 0 looks like image 1 (a foreign pair), title 1 like both of its images, title 2 like image 2
    text_feats = torch.stack([eye[1], eye[0] + eye[1], eye[2]])
    engine = _LookupEngine(image_feats, text_feats)
    metrics = evaluate(engine, [_batch(images, captions)], [], [], None, torch.float32, "cpu", {})

    img = image_feats[images].double().numpy()
    txt = text_feats[captions].double().numpy()
    expected_i2t = _reference_recall(img @ txt.T, images, captions, (1, 5, 10))
    expected_t2i = _reference_recall(txt @ img.T, captions, images, (1, 5, 10))
    # image 1 ties title 0 with its own title 1; title 0 finds image 1 first: one miss each way
    assert expected_i2t[1] == expected_t2i[1] == 0.75
    for k in (1, 5, 10):
        assert metrics[f"eval/i2t_r{k}"] == pytest.approx(expected_i2t[k])
        assert metrics[f"eval/t2i_r{k}"] == pytest.approx(expected_t2i[k])


def test_recall_with_shared_images_and_titles_matches_a_float64_reference():
    """Random features over 40 samples drawn from 12 images and 10 titles (many chains), with ties
    and NaN: both directions of ``feature_recall_at_k`` equal the pair-by-pair float64 reference."""
    rng = np.random.default_rng(0)
    n = 40
    images, captions = rng.integers(0, 12, n), rng.integers(0, 10, n)
    img_table = np.round(rng.normal(size=(12, 3)), 1)
    txt_table = np.round(rng.normal(size=(10, 3)), 1)
    img_table[3] = np.nan
    img, txt = torch.tensor(img_table[images]), torch.tensor(txt_table[captions])
    for queries, keys, rows, columns in ((img, txt, images, captions), (txt, img, captions, images)):
        got = feature_recall_at_k(
            queries, keys, groups=torch.tensor(rows), key_groups=torch.tensor(columns), ks=(1, 3, 10)
        )
        sim = queries.numpy() @ keys.numpy().T
        assert got == pytest.approx(_reference_recall(sim, rows, columns, (1, 3, 10)))


def test_tags_that_merge_do_not_shrink_the_tag_vocabulary_below_its_size(tmp_path):
    """eval.tag_vocab_size=2 over tags ranked long_a (3 videos), long_b (3), cat (2), dog (1), where
    long_a and long_b are cut alike at the context length: the cut came before the merge, so one tag
    was ranked (tags_vocab 1, cat left out). Now the two most frequent distinct tags are: long_a
    (with long_b's videos) and cat; a model whose images are their first tag's text scores 1.0."""
    image_tags = [[LONG_A]] * 3 + [[LONG_B]] * 3 + [["cat"]] * 2 + [["dog"]]
    tokenizer, tokenize = cut_alike_tokenizer(str(tmp_path / "tok"))
    cut = tokenize([LONG_A, LONG_B])
    assert torch.equal(cut["input_ids"][0], cut["input_ids"][1])  # the premise: cut alike
    engine, batch = perfect_tag_model(tokenizer, tokenize, image_tags)
    metrics = evaluate(engine, [batch], [], ["{}"], tokenize, torch.float32, "cpu", batch, tag_vocab_size=2)
    assert metrics["eval/tags_vocab"] == 2.0
    assert (metrics["eval/tags_r1"], metrics["eval/tags_map"]) == (1.0, 1.0)


WORDS = ["cat", "dog", "fish", "gaming", "music", "sports", "video a", "video b", "video c", "video d"]


def _word_tokenize(texts: list[str]) -> dict:
    """One token per text: its index in WORDS (a text tower that reads whole words)."""
    ids = torch.tensor([[WORDS.index(t)] for t in texts])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def test_copies_of_one_thumbnail_share_their_tags_and_categories():
    """Videos A (tags cat, category gaming) and B (dog, music) share one thumbnail; C (fish, sports)
    and D (cat, sports) have their own. A model whose image features are the sum of the words of
    every video that carries the image is perfect, yet the copies tied: B (no cat) ranked with A
    for "cat" (tags_map 0.83), and music tied gaming for A (zero-shot top-1 0.5). Now identical
    images share their labels: mAP and top-1 are 1.0, tags R@1 the hand count (A and B: 1 of
    their 2 tags in the top 1; C and D: 1 of 1) 0.75."""
    eye = torch.eye(len(WORDS))
    word = {w: eye[i] for i, w in enumerate(WORDS)}
    images = torch.stack(
        [
            word["cat"] + word["dog"] + word["gaming"] + word["music"],
            word["fish"] + word["sports"],
            2 * word["cat"] + word["sports"],
        ]
    )
    engine = _LookupEngine(images, eye)
    pixels, categories = [0, 0, 1, 2], ["gaming", "music", "sports", "sports"]
    batch = dict(
        _word_tokenize(["video a", "video b", "video c", "video d"]),
        pixel_values=torch.tensor(pixels, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 2, 2),
        labels=categories,
        label_sets=[[c] for c in categories],
        tags=[["cat"], ["dog"], ["fish"], ["cat"]],
        image_ids=[f"jpeg{p}" for p in pixels],
    )
    classes = ["gaming", "music", "sports"]
    metrics = evaluate(
        engine, [batch], classes, ["{}"], _word_tokenize, torch.float32, "cpu", batch, tag_vocab_size=10
    )
    assert metrics["eval/zeroshot_top1"] == 1.0
    assert metrics["eval/tags_map"] == pytest.approx(1.0)
    assert metrics["eval/tags_r1"] == pytest.approx(0.75)
    assert metrics["eval/tags_vocab"] == 3.0
