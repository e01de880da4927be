"""Review of the eval area (10): a tag past the ``eval.tag_vocab_size`` cut whose prompts tokenise
like a tag inside the vocabulary is merged into it (its images are that tag's positives), and the
cut still adds no tag of its own."""

from __future__ import annotations

import pytest
import torch
from bpe_tokenizers import LONG_A, LONG_B, cut_alike_tokenizer, perfect_tag_model

import vutrain.evaluate as evaluate_module
from vutrain.evaluate import evaluate, merge_same_prompt_tags, merge_same_prompts


@pytest.mark.parametrize("templates", [["{}"], ["{}", "a video about {}."]])
def test_a_rare_tag_cut_like_a_vocabulary_tag_is_its_positive_not_its_negative(tmp_path, templates):
    """Tags long_a (3 videos), cat (2), long_b (1), long_a and long_b cut alike at context length 6,
    eval.tag_vocab_size=1: the merge stopped at cat, so long_b's video was a negative of long_a,
    whose text the model cannot tell from its own: a perfect model scored tags_map 0.64, not 1.0."""
    image_tags = [[LONG_A]] * 3 + [["cat"]] * 2 + [[LONG_B]]
    tokenizer, tokenize = cut_alike_tokenizer(str(tmp_path))
    engine, batch = perfect_tag_model(tokenizer, tokenize, image_tags)
    metrics = evaluate(
        engine, [batch], [], templates, tokenize, torch.float32, "cpu", batch, tag_vocab_size=1
    )
    assert metrics["eval/tags_vocab"] == 1.0
    assert (metrics["eval/tags_map"], metrics["eval/tags_r1"]) == (1.0, 1.0)


def _stable_tokenize():
    """A lower-casing tokenizer that keeps a text's first 3 words (a context length); one word table
    across calls, so ids compare between calls."""
    vocab: dict[str, int] = {}

    def tokenize(texts: list[str]) -> dict:
        rows = [[vocab.setdefault(w, len(vocab) + 1) for w in t.lower().split()[:3]] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return dict(input_ids=ids, attention_mask=mask)

    return tokenize


@pytest.mark.parametrize("chunk", [1, 2, 3, 256])
def test_classes_past_the_cut_merge_only_into_kept_classes(monkeypatch, chunk):
    """max_distinct=2 over cat, dog, bird, CAT, p q r s, Dog, p q r t, p q x: distinct stays
    [cat, dog]; CAT and Dog (alike for every template) join them; bird, and p q r t (alike with
    p q r s only in the first template, which cuts every class to "a photo of"), stay out."""
    monkeypatch.setattr(evaluate_module, "MERGE_CHUNK_CLASSES", chunk)
    classes = ["cat", "dog", "bird", "CAT", "p q r s", "Dog", "p q r t", "p q x"]
    templates = ["a photo of {}", "{}"]
    distinct, index = merge_same_prompts(classes, templates, _stable_tokenize(), max_distinct=2)
    assert distinct == ["cat", "dog"]
    assert index == {"cat": 0, "dog": 1, "CAT": 0, "Dog": 1}


def test_a_kept_tag_of_a_long_name_takes_the_rarer_tags_cut_alike(monkeypatch):
    """merge_same_prompt_tags with max_tags=2: tags past the cut are renamed to the vocabulary tag
    they tokenise like, the others keep their own name (outside the vocabulary: ignored)."""
    monkeypatch.setattr(evaluate_module, "MERGE_CHUNK_CLASSES", 2)
    ranked = ["lets play minecraft", "cat", "dog", "lets play minecraft part 2", "lets play roblox"]
    tag_lists = [["lets play minecraft"], ["cat"], ["dog"], ["lets play minecraft part 2", "dog"]]
    renamed, vocab = merge_same_prompt_tags(tag_lists, ranked, ["{}"], _stable_tokenize(), max_tags=2)
    assert vocab == ["lets play minecraft", "cat"]
    assert renamed == [["lets play minecraft"], ["cat"], ["dog"], ["lets play minecraft", "dog"]]


def test_the_merge_of_an_eval_set_is_tokenised_once_per_run():
    """Every eval of a run merges the same tag vocabulary (10^5 tags of a large eval set took
    seconds to tokenise): the second merge tokenises nothing, and a caller that changes the
    returned list or index does not change the next one's."""
    tokenize = _stable_tokenize()
    calls = []

    def counting_tokenize(texts):
        calls.append(len(texts))
        return tokenize(texts)

    classes = ["cat", "dog", "bird", "CAT", "Dog", "fish"]
    first = merge_same_prompts(classes, ["{}"], counting_tokenize, max_distinct=2)
    assert calls
    calls.clear()
    first[0].append("changed")
    first[1]["changed"] = 9
    again = merge_same_prompts(list(classes), ["{}"], counting_tokenize, max_distinct=2)
    assert calls == []
    assert again == (["cat", "dog"], {"cat": 0, "dog": 1, "CAT": 0, "Dog": 1})
