"""Evaluation, third review: the tag and zero-shot scores are ranked a block at a time (never the
whole [N, V] or [N, C] matrix, with the same metrics), and `{tags}` captions render the tags that
training reads whatever form the field has."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vutrain import eval_multilabel, evaluate
from vutrain.data.captions import render_caption
from vutrain.data.labels import sample_label
from vutrain.tag_text import tag_values


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[int, ...]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.seen.add(tuple(t.shape))
        return out


def _quarter_grid(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Unit rows of +-1/sqrt(dim) with dim = 16: normalising and every dot product are exact in fp32,
    so blocks of rows score bit for bit as the whole matrix, and many scores tie."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (rows, dim), generator=gen).float() * 2 - 1) / dim**0.5


def test_tag_metrics_rank_blocks_never_the_whole_matrix_with_the_same_values(monkeypatch):
    """The [N, V] image-tag scores (and their [N, V] targets and sorts) were made whole: 4 GB each
    at 50k validation images and 20k tags. Now blocks of at most SCORE_CHUNK_ELEMENTS scores (here
    2 tags x 40 images, shared by mAP and recall), and mAP and recall equal the whole matrix's."""
    n, v = 40, 30
    vocab = [f"tag{j}" for j in range(v)]
    gen = torch.Generator().manual_seed(1)
    tag_lists = [[vocab[j] for j in torch.randperm(v, generator=gen)[: i % 4].tolist()] for i in range(n)]
    images, tags = _quarter_grid(n, 16, 2), _quarter_grid(v, 16, 3)
    images[5] = float("nan")  # a diverged row: ranked against the model, as before
    encode = lambda prompts: tags[[vocab.index(p) for p in prompts]]  # noqa: E731

    scores = images @ tags.T  # the whole-matrix reference, through the metric's own pieces
    targets = eval_multilabel.multilabel_targets(tag_lists, vocab)
    per_tag = eval_multilabel.average_precision(scores.T, targets.T)
    expected = {"eval/tags_vocab": float(v), "eval/tags_map": per_tag[~per_tag.isnan()].mean().item()}
    expected.update({f"eval/tags_r{k}": r for k, r in eval_multilabel.recall_at_k(scores, targets).items()})

    monkeypatch.setattr(eval_multilabel, "SCORE_CHUNK_ELEMENTS", 100, raising=False)
    with _Shapes() as shapes:
        metrics = eval_multilabel.multilabel_retrieval(images, tag_lists, encode, ["{}"], vocab=vocab)
    assert metrics == expected
    assert 0 < metrics["eval/tags_map"] < 1
    assert (40, 2) in shapes.seen
    assert max(torch.Size(s).numel() for s in shapes.seen) < n * v  # before: the [40, 30] scores


class _TableEngine(torch.nn.Module):
    """Image features: row `pixel_values[:, 0, 0, 0]` of `images`; text features: row
    `input_ids[:, 0]` of `texts` (a class prompt is tokenised to its class index)."""

    def __init__(self, images: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.module = torch.nn.Module()
        dim = images.shape[1]
        self.module.base = type("Base", (), {"config": type("C", (), {"projection_dim": dim})})()
        self.images, self.texts = images, texts

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None):
        img = None if pixel_values is None else self.images[pixel_values[:, 0, 0, 0].long()]
        return img, self.texts[input_ids[:, 0]], None, None


def test_zero_shot_scores_blocks_of_images_never_the_whole_matrix(monkeypatch):
    """Zero-shot made the whole [N, C] scores: 4 GB at 50k images and 20k classes
    (eval.zeroshot_field=tags). Now 5 images at a time here, with the hits of a brute-force
    reference (ties and a NaN row against the model)."""
    n, c = 40, 12
    classes = [f"class {j:02d}" for j in range(c)]
    images, texts = _quarter_grid(n, 16, 4), _quarter_grid(c, 16, 5)
    images[3] = float("nan")
    gen = torch.Generator().manual_seed(6)
    label_sets = [[classes[j] for j in torch.randperm(c, generator=gen)[: i % 3].tolist()] for i in range(n)]

    def tokenize(prompts):
        ids = torch.tensor([[classes.index(p) if p in classes else 0] for p in prompts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    batch = dict(
        tokenize([f"video {i}" for i in range(n)]),
        pixel_values=torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2),
        labels=[", ".join(s) for s in label_sets],
        label_sets=label_sets,
    )
    monkeypatch.setattr(evaluate, "RECALL_CHUNK_ELEMENTS", 5 * c)
    with _Shapes() as shapes:
        metrics = evaluate.evaluate(
            _TableEngine(images, texts), [batch], classes, ["{}"], tokenize, torch.float32, "cpu", {}
        )
    hits = 0
    for image, labels in zip(images, label_sets, strict=True):
        row = (image @ texts.T).tolist()
        mine = [s for cls, s in zip(classes, row, strict=True) if cls in labels]
        others = [s for cls, s in zip(classes, row, strict=True) if cls not in labels]
        hits += bool(labels) and not any(s != s for s in row) and all(max(mine) > s for s in others)
    known = sum(1 for s in label_sets if s)
    assert metrics["eval/zeroshot_samples"] == known
    assert metrics["eval/zeroshot_top1"] == hits / known and 0 < hits < known
    assert (5, c) in shapes.seen
    score_rows = [s[0] for s in shapes.seen if len(s) == 2 and s[1] == c and s != (16, c)]  # not emb.T
    assert max(score_rows) == 5  # before: the [26, 12] scores of every labelled image


def test_tags_captions_render_what_training_reads_whatever_the_field_form():
    """`{tags}` rendered a comma-separated string or a lone number verbatim ("cats,, funny ,2024",
    "2024") while training, the tag metrics and the vocabulary read "cats", "funny", "2024" and no
    tag; lists were already read alike."""
    for tags in ("cats,, funny ,2024", ["cats", "", " funny", 2024], 2024, "", []):
        meta = {"tags": tags}
        assert render_caption("{tags}", meta, None) == ", ".join(t.strip() for t in tag_values(tags))
        assert len(sample_label(meta, "tags")) == len(tag_values(tags))
    assert render_caption("{title}. tags: {tags}", {"title": "T", "tags": "cats,, funny"}, None) == (
        "T. tags: cats, funny"
    )
