"""Review of the eval area (12): retrieval recall finds a block's right columns through an index
built once (it scanned every group link and built a [block, N] table per block of rows), and the
tag metrics' per-set preparation is kept across evals of one set; the metrics stay those of a
straightforward full-matrix reference."""

from __future__ import annotations

import random

import pytest
import torch

import vutrain.eval_multilabel as eval_multilabel
import vutrain.evaluate as evaluate
from vutrain.evaluate import feature_recall_at_k, recall_at_k, tag_metrics


def _reference_recall(sim: torch.Tensor, groups, key_groups, ks) -> dict[int, float]:
    """Row i is a hit at k when fewer than k wrong columns score >= (or NaN) its best right one."""
    n = sim.shape[0]
    q = list(range(n)) if groups is None else groups.tolist()
    kg = q if key_groups is None else key_groups.tolist()
    links = set(zip(q, kg, strict=True))
    ranks = []
    for i in range(n):
        right = [j for j in range(n) if (q[i], kg[j]) in links]
        scored = [sim[i, j].item() for j in right if not sim[i, j].isnan()]
        if not scored:
            ranks.append(float("inf"))
            continue
        best = max(scored)
        wrong = [j for j in range(n) if j not in right]
        ranks.append(sum(1 for j in wrong if sim[i, j].isnan() or sim[i, j].item() >= best))
    return {k: sum(r < k for r in ranks) / n for k in ks}


def _groups(rnd: random.Random, n: int) -> torch.Tensor:
    """Per sample a group id (arbitrary, not 0..G-1), with a few groups of 2-5 copies."""
    ids = []
    while len(ids) < n:
        ids += [rnd.randrange(10**6)] * (rnd.randint(2, 5) if rnd.random() < 0.2 else 1)
    return torch.tensor(ids[:n])


@pytest.mark.parametrize("seed", range(6))
def test_recall_matches_a_full_matrix_reference(monkeypatch, seed):
    rnd = random.Random(seed)
    n = rnd.randint(3, 23)
    captions, images = _groups(rnd, n), _groups(rnd, n)
    captions[rnd.randrange(n)] = captions[rnd.randrange(n)]  # duplicate captions across copies
    sim = torch.randint(-2, 3, (n, n)).float()  # a few values: many ties
    if seed % 2:
        sim[torch.rand(n, n) < 0.15] = float("nan")
    ks = (1, 5, 10, 3 * n)  # K larger than the set
    monkeypatch.setattr(evaluate, "RECALL_CHUNK_ELEMENTS", n * 4 + 1)  # blocks of 4 rows, not dividing n
    monkeypatch.setattr(evaluate, "RECALL_CHUNK_PAIRS", 3)  # blocks cut again into runs of few pairs
    for groups, key_groups in ((None, None), (captions, None), (images, captions), (captions, images)):
        want = _reference_recall(sim, groups, key_groups, ks)
        assert recall_at_k(sim, ks, groups=groups, key_groups=key_groups) == pytest.approx(want, abs=1e-6)
    queries, keys = torch.randn(n, 6), torch.randn(n, 6)
    keys[1] = keys[0]  # duplicate images: exact ties
    want = _reference_recall(queries @ keys.T, images, captions, ks)
    got = feature_recall_at_k(queries, keys, ks, groups=images, key_groups=captions)
    assert got == pytest.approx(want, abs=1e-6)


def test_one_caption_for_most_of_the_set_is_cut_into_runs(monkeypatch):
    """Every row right for ~N columns: the pairs of a block are looked at a run of rows at a time."""
    n = 30
    captions = torch.zeros(n, dtype=torch.long)
    captions[-3:] = torch.tensor([5, 6, 6])
    sim = torch.randn(n, n)
    monkeypatch.setattr(evaluate, "RECALL_CHUNK_PAIRS", 40)
    right = evaluate.RightColumns(captions, captions)
    assert len(right.pieces(0, n, evaluate.RECALL_CHUNK_PAIRS)) > 5
    want = _reference_recall(sim, captions, None, (1, 2, 40))
    assert recall_at_k(sim, (1, 2, 40), groups=captions) == pytest.approx(want, abs=1e-6)


def _tokenize(texts: list[str]) -> dict:
    """One id per lower-cased character (a deterministic stand-in for a tokenizer)."""
    rows = [[ord(c) % 97 + 1 for c in t.lower()][:12] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return dict(input_ids=ids, attention_mask=mask)


_TABLE = torch.randn(98, 8, generator=torch.Generator().manual_seed(0))


def _encode_text(texts):
    tok = _tokenize(texts)
    return (_TABLE[tok["input_ids"]] * tok["attention_mask"][..., None]).sum(dim=1)


def _reference_tag_metrics(img, tag_lists, vocab_size, image_groups, templates) -> dict[str, float]:
    """Full [N, V] scores: vocabulary by images per normalised tag, merged where the prompts
    tokenise alike; ties and order against the model (a negative first among equal scores)."""
    norm = eval_multilabel.normalize_tag
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for t in {norm(t) for t in tags if t.strip()}:
            counts[t] = counts.get(t, 0) + 1
    key_of = {
        t: tuple(map(tuple, _tokenize([tp.format(t) for tp in templates])["input_ids"].tolist()))
        for t in counts
    }
    vocab, merged = [], {}
    for t in sorted(counts, key=lambda t: (-counts[t], t)):
        first = next((v for v in vocab if key_of[v] == key_of[t]), None)
        if first is None and len(vocab) < vocab_size:
            vocab.append(t)
            first = t
        if first is not None:
            merged[t] = first
    n = len(tag_lists)
    sets = [{merged[norm(t)] for t in tags if t.strip() and norm(t) in merged} for tags in tag_lists]
    sets = [set().union(*(sets[m] for m in range(n) if image_groups[m] == image_groups[i])) for i in range(n)]
    feats = torch.nn.functional.normalize(
        _encode_text([tp.format(v) for v in vocab for tp in templates]), dim=-1
    )
    emb = torch.nn.functional.normalize(feats.reshape(len(vocab), len(templates), -1).mean(1), dim=-1)
    scores = torch.nn.functional.normalize(img, dim=-1) @ emb.T
    target = [[vocab[v] in sets[i] for v in range(len(vocab))] for i in range(n)]

    def hits(values, labels):  # by falling score, negatives first among ties
        return [lab for _, lab in sorted(zip(values, labels, strict=True), key=lambda p: (-p[0], p[1]))]

    aps = []
    for v in range(len(vocab)):
        h = hits(scores[:, v].tolist(), [target[i][v] for i in range(n)])
        if any(h):
            aps.append(sum(sum(h[: r + 1]) / (r + 1) for r, x in enumerate(h) if x) / sum(h))
    out = {"eval/tags_vocab": float(len(vocab)), "eval/tags_map": sum(aps) / len(aps)}
    for k in (1, 5, 10):
        rec = [
            sum(hits(scores[i].tolist(), target[i])[:k]) / sum(target[i]) for i in range(n) if any(target[i])
        ]
        out[f"eval/tags_r{k}"] = sum(rec) / len(rec)
    return out


def _tag_set(seed: int, n: int = 24):
    rnd = random.Random(seed)
    words = ["Cat", "cat", "CAT", "Funny  Cats", "funny cats", "Straße", "strasse", "dog", "ＧＴＡ５", "gta5"]
    words += [f"topic{k}" for k in range(8)]
    tags = [[rnd.choice(words) for _ in range(rnd.randint(1, 5))] for _ in range(n)]
    groups = [i if rnd.random() < 0.8 else max(0, i - 1) for i in range(n)]  # some reused images
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed)), tags, groups


def test_tag_metrics_match_a_full_matrix_reference():
    templates = ["{}", "a video about {}."]
    for seed in range(3):
        img, tags, groups = _tag_set(seed)
        got = tag_metrics(img, tags, _encode_text, templates, _tokenize, 6, groups)
        want = _reference_tag_metrics(img, tags, 6, groups, templates)
        assert got == pytest.approx(want, abs=1e-5)


def test_the_tag_preparation_is_kept_for_one_set_and_redone_for_another(monkeypatch):
    calls = []
    pairs = eval_multilabel.target_pairs
    monkeypatch.setattr(eval_multilabel, "target_pairs", lambda *a: calls.append(1) or pairs(*a))
    templates = ["{}", "a video about {}."]
    img, tags, groups = _tag_set(7)
    first = tag_metrics(img, tags, _encode_text, templates, _tokenize, 6, groups)
    fresh = [[(t + ".")[:-1] for t in ts] for ts in tags]  # a new copy, as each eval gathers
    assert tag_metrics(img, fresh, _encode_text, templates, _tokenize, 6, groups) == first
    assert len(calls) == 1  # the second eval of the set prepared nothing
    # another set, the same tags on other images, another vocabulary size: each prepared anew
    _, other_tags, _ = _tag_set(8)
    other_groups = list(range(len(tags)))
    for case_tags, case_groups, size in ((other_tags, groups, 6), (tags, other_groups, 6), (tags, groups, 3)):
        got = tag_metrics(img, case_tags, _encode_text, templates, _tokenize, size, case_groups)
        assert got == pytest.approx(
            _reference_tag_metrics(img, case_tags, size, case_groups, templates), abs=1e-5
        )
    assert len(calls) == 4
