"""Retrieval recall when validation captions repeat (the synthetic set: 416 of 480 titles are
shared). Identical captions are one caption: retrieving any of them (i2t), or any image of that
caption (t2i), is right. Before, each duplicate tied the true pair and counted against it: a
perfect model scored R@1 = 1/3 below, and at most 0.13 on the synthetic validation set."""

from __future__ import annotations

import pytest
import torch

from vutrain.evaluate import evaluate, recall_at_k


class _CaptionEngine(torch.nn.Module):
    """Image and text features: one-hot of the caption id (an image's first pixel holds it)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": dim})})()
        self.dim = dim

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None
        if pixel_values is not None:
            img = torch.nn.functional.one_hot(pixel_values[:, 0, 0, 0].long(), self.dim).float()
        return img, torch.nn.functional.one_hot(input_ids[:, 0], self.dim).float(), None, None


def _batch(image_ids, caption_ids):
    n = len(image_ids)
    ids = torch.tensor(caption_ids).view(n, 1)
    return dict(
        pixel_values=torch.tensor(image_ids, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        input_ids=torch.cat([ids, torch.full((n, 2), 7)], dim=1),  # padding after the caption
        attention_mask=torch.tensor([[1, 0, 0]] * n),
        labels=[""] * n,
    )


def test_a_perfect_model_scores_one_with_repeated_captions():
    captions = [0, 0, 1, 2, 3, 3]
    metrics = evaluate(
        _CaptionEngine(),
        [_batch(captions[:4], captions[:4]), _batch(captions[4:], captions[4:])],
        [],
        [],
        None,
        torch.float32,
        "cpu",
        {},
    )
    assert metrics["eval/num_samples"] == 6
    assert metrics["eval/i2t_r1"] == 1.0 and metrics["eval/t2i_r1"] == 1.0


def test_repeated_captions_do_not_lift_a_model_that_confuses_them_with_others():
    # image 0 looks like caption 1: for its own (repeated) caption it is a miss at R@1
    metrics = evaluate(
        _CaptionEngine(), [_batch([1, 0, 1, 2], [0, 0, 1, 2])], [], [], None, torch.float32, "cpu", {}
    )
    # i2t: image 0 scores caption 1 above both copies of its own caption -> miss
    assert metrics["eval/i2t_r1"] == pytest.approx(3 / 4)
    # t2i: caption 0 (rows 0 and 1) finds image 1, of its group: hits; caption 1 ties image 0 -> miss
    assert metrics["eval/t2i_r1"] == pytest.approx(3 / 4)


def test_groups_keep_ties_and_nan_against_the_model():
    collapsed = torch.zeros(4, 4)
    groups = torch.tensor([0, 0, 1, 2])
    # a collapsed model: every other column ties; only rows 0 and 1 have one fewer competitor
    assert recall_at_k(collapsed, ks=(1, 3, 4), groups=groups) == pytest.approx({1: 0.0, 3: 0.5, 4: 1.0})
    nan = torch.full((4, 4), float("nan"))
    assert recall_at_k(nan, ks=(1, 4), groups=groups) == pytest.approx({1: 0.0, 4: 0.0})


def _perfect_on_two_ranks(rank: int, world_size: int) -> dict:
    # rank 0 holds captions 0, 1, 2; rank 1 holds another image of caption 0, and caption 3
    captions = [[0, 1, 2], [0, 3]][rank]
    return evaluate(_CaptionEngine(), [_batch(captions, captions)], [], [], None, torch.float32, "cpu", {})


def test_repeated_captions_on_different_ranks():
    from helpers_dist import run_distributed

    metrics = run_distributed(_perfect_on_two_ranks, 2)
    assert metrics[0] == metrics[1]
    assert metrics[0]["eval/num_samples"] == 5
    assert metrics[0]["eval/i2t_r1"] == 1.0 and metrics[0]["eval/t2i_r1"] == 1.0
