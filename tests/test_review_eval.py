"""Zero-shot top-1 (`vutrain.evaluate.evaluate`): ties count against the model, as in recall, and
the chance level is that of a random guess when a sample carries several classes."""

from __future__ import annotations

import pytest
import torch

from vutrain.evaluate import class_embeddings, evaluate


class _TableEngine(torch.nn.Module):
    """Image features: row `pixel_values[:, 0, 0, 0]` of `images`; text features: row `input_ids[:, 0]`
    of `texts` (the class prompts are tokenised to their class index)."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        dim = images.shape[1]
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": dim})})()
        self.images, self.texts = images, texts

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, self.texts[input_ids[:, 0]], None, None


def _zero_shot(images, texts, classes, label_sets):
    def tokenize(prompts):
        ids = torch.tensor([[classes.index(p)] for p in prompts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    n = len(label_sets)
    batch = dict(
        pixel_values=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        input_ids=torch.zeros(n, 1, dtype=torch.long),
        attention_mask=torch.ones(n, 1, dtype=torch.long),
        labels=[", ".join(s) for s in label_sets],
        label_sets=label_sets,
    )
    engine = _TableEngine(images, texts)
    return evaluate(engine, [batch], classes, ["{}"], tokenize, torch.float32, "cpu", {})


def test_a_collapsed_model_gets_no_zero_shot_hits_from_ties():
    """argmax took the first of tied classes: a collapsed model (every embedding equal) 'predicted'
    the alphabetically first class and scored 5/6 here (and 1.0 on a set of that class alone)."""
    classes = ["Autos", "Comedy", "Gaming"]
    metrics = _zero_shot(torch.ones(6, 4), torch.ones(3, 4), classes, [["Autos"]] * 5 + [["Gaming"]])
    assert metrics["eval/zeroshot_top1"] == 0.0
    assert metrics["eval/zeroshot_chance"] == pytest.approx(1 / 3)


def test_zero_shot_matches_a_brute_force_reference_with_ties():
    """Features on a coarse grid make many tied scores; a hit needs one of the sample's classes
    strictly above every other class and no NaN in the row."""
    gen = torch.Generator().manual_seed(0)
    classes = ["a", "b", "c", "d", "e"]
    images = torch.randint(0, 2, (40, 3), generator=gen).float()
    texts = torch.randint(0, 2, (5, 3), generator=gen).float() + 0.5 * torch.eye(5, 3)
    images[3] = float("nan")
    label_sets = [
        [classes[j] for j in torch.randperm(5, generator=gen)[: 1 + i % 3].tolist()] for i in range(40)
    ]
    label_sets[7] = []  # no label: out of zero-shot
    metrics = _zero_shot(images, texts, classes, label_sets)

    scores = images @ class_embeddings(lambda prompts: texts, classes, ["{}"]).T  # as evaluate does
    hits, known, labelled = 0, 0, 0
    for row, labels in zip(scores.tolist(), label_sets, strict=True):
        if not labels:
            continue
        known += 1
        labelled += len(labels)
        mine = max(s for c, s in zip(classes, row, strict=True) if c in labels)
        others = [s for c, s in zip(classes, row, strict=True) if c not in labels]
        nan = any(s != s for s in row)
        hits += not nan and all(mine > s for s in others)
    assert metrics["eval/zeroshot_samples"] == known == 39
    assert metrics["eval/zeroshot_top1"] == pytest.approx(hits / known)
    # a random guess hits a sample with m of the C classes with probability m / C
    assert metrics["eval/zeroshot_chance"] == pytest.approx(labelled / (known * len(classes)))


def test_zero_shot_chance_counts_every_label_of_a_list_field():
    """With a list-valued field (tags) the chance was 1 / C whatever the number of labels: here a
    random guess hits half the time, and 0.25 was reported."""
    classes = ["a", "b", "c", "d"]
    images = torch.eye(4)
    metrics = _zero_shot(images, torch.eye(4), classes, [["a", "b"], ["b", "c"], ["c", "d"], ["a", "d"]])
    assert metrics["eval/zeroshot_chance"] == pytest.approx(0.5)
    assert metrics["eval/zeroshot_top1"] == 1.0  # each image scores one of its own classes highest


def test_a_single_class_is_always_right():
    metrics = _zero_shot(torch.randn(3, 4), torch.randn(1, 4), ["only"], [["only"]] * 3)
    assert metrics["eval/zeroshot_top1"] == 1.0 and metrics["eval/zeroshot_chance"] == 1.0


def test_the_tag_vocabulary_counts_a_tag_once_per_image():
    """A tag repeated in other cases inside one video's list ("Minecraft", "minecraft") counted
    once per copy: "cat" (one image) took the only vocabulary slot from "dog" (two images)."""
    from vutrain.eval_multilabel import tag_vocabulary

    tag_lists = [["Cat", "cat", "CAT "], ["dog"], ["Dog", "bird"]]
    assert tag_vocabulary(tag_lists, max_tags=1) == ["dog"]
    assert tag_vocabulary(tag_lists, min_count=2) == ["dog"]
    assert tag_vocabulary(tag_lists) == ["dog", "bird", "cat"]
