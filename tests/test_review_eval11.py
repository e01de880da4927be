"""Review of the eval area (11): the tags of a held-out set are normalised once per run, not at
every eval (50k samples of 3-15 tags were ~1.35 million ``normalize_tag`` calls per eval, in the
vocabulary, the prompt merge's renaming and the target pairs), with the same metrics."""

from __future__ import annotations

import torch

import vutrain.eval_multilabel as eval_multilabel
from vutrain.evaluate import tag_metrics


def _tokenize(texts: list[str]) -> dict:
    """One id per lower-cased character (a deterministic stand-in for a tokenizer)."""
    rows = [[ord(c) % 97 + 1 for c in t.lower()][:12] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return dict(input_ids=ids, attention_mask=mask)


def test_a_second_eval_normalises_no_tag_and_scores_the_same(monkeypatch):
    torch.manual_seed(0)
    table = torch.randn(98, 8)

    def encode_text(texts):
        tok = _tokenize(texts)
        return (table[tok["input_ids"]] * tok["attention_mask"][..., None]).sum(dim=1)

    spellings = ["Cat", "cat", "CAT", "Funny  Cats", "funny cats"]
    spellings += ["Straße", "strasse", "dog", "ＧＴＡ５", "gta5"]
    tag_lists = [[spellings[(n * 7 + j) % len(spellings)] for j in range(3 + n % 4)] for n in range(40)]
    images = torch.randn(40, 8)
    calls: list[str] = []
    normalize = eval_multilabel.normalize_tag

    def counting(tag):
        calls.append(tag)
        return normalize(tag)

    monkeypatch.setattr(eval_multilabel, "normalize_tag", counting)
    eval_multilabel.normalized_tag.cache_clear()

    def one_eval():
        # a fresh copy of every string per eval, as the gathered batches of each eval are
        fresh = [[(t + ".")[:-1] for t in tags] for tags in tag_lists]
        templates = ["{}", "a video about {}."]
        return tag_metrics(images, fresh, encode_text, templates, _tokenize, 4, list(range(40)))

    first = one_eval()
    assert len(calls) == len(set(calls))  # each distinct spelling once, not once per sample and pass
    assert set(calls) <= set(spellings)  # (vocabulary tags, already in their one form, are found as such)
    calls.clear()
    second = one_eval()
    assert calls == []
    assert second == first
    assert first["eval/tags_vocab"] == 4.0 and 0.0 <= first["eval/tags_map"] <= 1.0
