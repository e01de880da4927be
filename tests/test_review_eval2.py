"""Evaluation, second review: zero-shot classes the tokenizer cannot tell apart are one class, and
undecodable validation samples are counted in the eval row."""

from __future__ import annotations

import pytest
import torch
from tar_shards import break_jpegs
from tiny_eval import evals_on_rank, train_tokenizer

from vutrain.evaluate import class_embeddings, evaluate

from helpers_dist import run_distributed


class _WordEngine(torch.nn.Module):
    """Text features: the masked mean of fixed random token vectors (so equal tokens give equal
    features); image features: row `pixel_values[:, 0, 0, 0]` of `images`."""

    def __init__(self, vocab_size: int, dim: int = 8):
        super().__init__()
        self.module = torch.nn.Module()
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": dim})})()
        self.words = torch.randn(vocab_size, dim, generator=torch.Generator().manual_seed(0))
        self.images = torch.zeros(0, dim)

    def text(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        return (self.words[input_ids] * mask).sum(dim=1) / mask.sum(dim=1)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, self.text(input_ids, attention_mask), None, None


def test_classes_that_differ_only_in_case_are_one_class(tmp_path):
    """With eval.zeroshot_field=tags, "Minecraft" and "minecraft" were two classes; the lower-casing
    tokenizer (CLIP's, and ours) gives them one embedding, so they tied exactly and a perfect model
    (each image equal to its class embedding) scored 0.5 here instead of 1.0."""
    from vutrain.data.tokenizer import make_tokenize, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["a thumbnail of minecraft cooking"], str(tmp_path / "tok"), 300)
    tokenize = make_tokenize(tokenizer, 16)
    engine = _WordEngine(len(tokenizer))
    classes, templates = ["Minecraft", "cooking", "minecraft"], ["a thumbnail of {}."]

    def encode(prompts):
        tok = tokenize(prompts)
        return engine.text(tok["input_ids"], tok["attention_mask"])

    emb = class_embeddings(encode, classes, templates)
    label_sets = [["minecraft"], ["Minecraft"], ["cooking"], ["Minecraft", "minecraft", "cooking"]]
    engine.images = torch.stack([emb[classes.index(labels[0])] for labels in label_sets])
    n = len(label_sets)
    batch = dict(
        tokenize([f"video {i}" for i in range(n)]),
        pixel_values=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        labels=[", ".join(s) for s in label_sets],
        label_sets=label_sets,
    )
    metrics = evaluate(engine, [batch], classes, templates, tokenize, torch.float32, "cpu", {})
    assert metrics["eval/zeroshot_top1"] == 1.0
    assert metrics["eval/zeroshot_classes"] == 2
    # a guess among the 2 classes hits each of the first three half the time, the last always
    assert metrics["eval/zeroshot_chance"] == pytest.approx((0.5 * 3 + 1.0) / 4)


def test_undecodable_validation_samples_are_counted_in_the_eval_row(tmp_path):
    """3 of 7 validation images do not decode: the eval row said num_samples 4 and nothing else (a
    warning per sample in the log of the rank that read it), so a held-out set that lost a share of
    its images was scored on the rest unnoticed. Now every rank reports eval/skipped_samples 3."""
    from vutrain.data.synthetic import write_synthetic

    info = write_synthetic(str(tmp_path / "data"), num_samples=8, shard_size=8, val_samples=7, seed=0)
    val_shard = sorted((tmp_path / "data" / "val").glob("*.tar"))
    assert len(val_shard) == 1
    assert break_jpegs(str(val_shard[0]), 3) == 3
    tok_dir = train_tokenizer(info["train_shards"], str(tmp_path / "tok"))
    metrics = [evals[0] for evals in run_distributed(evals_on_rank, 2, info["val_shards"], tok_dir)]
    assert metrics[0] == metrics[1]
    assert metrics[0]["eval/num_samples"] == 4
    assert metrics[0]["eval/skipped_samples"] == 3
