"""Review of the eval area (18): data.num_workers=-1 (auto) in eval, both recall directions from one
pass over the similarities, and the zero-shot classes of validation shards that change in a run."""

from __future__ import annotations

import json

import pytest
import torch
from tar_shards import image_bytes, write_members
from tiny_eval import tiny_engine, tiny_evaluator, train_tokenizer

from vutrain import evaluate as evaluate_mod
from vutrain.data.epoch_plan import auto_num_workers
from vutrain.data.val import ValStream, iter_val_batches


def _tokenize(captions):
    ids = torch.tensor([[len(c)] for c in captions], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _val_shards(folder, categories: list[list[str]]) -> str:
    """One tar per entry of ``categories``, a sample per category name in it; the spec of them."""
    paths = []
    for s, names in enumerate(categories):
        members = []
        for i, name in enumerate(names):
            meta = {"title": f"video {s} {i} of {name}", "category_name": name}
            members += [
                (f"s{s}_{i}.jpg", image_bytes(grey=10 * i)),
                (f"s{s}_{i}.json", json.dumps(meta).encode()),
            ]
        paths.append(write_members(folder / f"{s:05d}.tar", members))
    return "::".join(paths)


@pytest.mark.parametrize("world_size, local_world_size", [(1, 1), (2, 2), (4, 2)])
def test_auto_workers_in_eval_are_training_auto_count(tmp_path, world_size, local_world_size):
    """data.num_workers=-1 (the config default) read every validation image in the training process,
    while training's loader resolved -1 to a share of the cores (and an explicit 8 gave eval 8
    workers). Now ValStream resolves -1 as training does (``auto_num_workers``, never resampled)."""
    spec = _val_shards(tmp_path, [["a"]] * 8)
    for rank in range(world_size):
        stream = ValStream(
            spec,
            preprocess=lambda image: image,
            tokenize=_tokenize,
            batch_size=2,
            rank=rank,
            world_size=world_size,
            num_workers=-1,
            local_world_size=local_world_size,
        )
        assert stream.num_workers == auto_num_workers(8, world_size, local_world_size, resampled=False)
        assert stream.loader_workers() == (stream.num_workers if stream.num_workers >= 2 else 0)
    with pytest.raises(ValueError, match="num_workers must be >= -1"):
        ValStream(spec, preprocess=lambda image: image, tokenize=_tokenize, batch_size=2, num_workers=-2)


def test_evaluator_and_iter_val_batches_pass_the_worker_count(tmp_path):
    """The Evaluator's stream resolves -1 with its ranks on this host (counted at the first eval:
    one here), an explicit count is kept; iter_val_batches takes a worker count too."""
    spec = _val_shards(tmp_path, [["a", "b"]] * 4)
    for workers, expected in ((-1, auto_num_workers(4, 1, 1, resampled=False)), (0, 0), (3, 3)):
        evaluator = tiny_evaluator(spec, None, data__num_workers=workers)
        assert evaluator.val_stream().num_workers == expected
    assert evaluator.local_world_size is None  # an explicit count needs no collective
    auto = tiny_evaluator(spec, None)
    auto.val_stream()
    assert auto.local_world_size == 1  # counted once, kept for the later evals
    keys = [
        key
        for batch in iter_val_batches(
            spec, preprocess=lambda image: torch.zeros(1), tokenize=_tokenize, batch_size=3, num_workers=2
        )
        for key in batch["keys"]
    ]
    assert sorted(keys) == sorted(f"s{s}_{i}" for s in range(4) for i in range(2))


def _two_passes(images, texts, ks, image_groups, caption_groups):
    """The recall of both directions as evaluate() scored it until 2026-12-07: a product each."""
    rows = caption_groups if caption_groups is not None else image_groups
    return (
        evaluate_mod.feature_recall_at_k(images, texts, ks, image_groups, caption_groups),
        evaluate_mod.feature_recall_at_k(texts, images, ks, rows, image_groups),
    )


def _case(seed: int):
    """Features with exact ties (small integers), shared image and caption groups, NaN and inf rows."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 30, (1,), generator=gen))
    if seed % 3:
        images = torch.randint(-2, 3, (n, 3), generator=gen).float()
        texts = torch.randint(-2, 3, (n, 3), generator=gen).float()
    else:
        images, texts = torch.randn(n, 3, generator=gen), torch.randn(n, 3, generator=gen)
    if seed % 5 == 0 and n > 2:
        texts[1] = float("nan")  # a NaN pair, and a NaN wrong score in every other row
    if seed % 7 == 0 and n > 3:
        images[2] = float("nan")
    if seed % 11 == 0:
        images[:] = float("inf")  # -inf, +inf and NaN scores: a best of -inf
        texts[:, 0] = -1
    image_groups = torch.randint(0, max(1, n // 2), (n,), generator=gen) if seed % 2 else None
    caption_groups = torch.randint(0, max(1, n // 3), (n,), generator=gen) if seed % 4 < 2 else None
    return images, texts, image_groups, caption_groups


@pytest.mark.parametrize("chunk", ["whole", "blocks of 5 rows", "blocks of 1 row, 1 pair each"])
def test_one_pass_recall_equals_the_two_passes(monkeypatch, chunk):
    """i2t and t2i each made the whole image x text product and ranked it. paired_recall_at_k makes
    it once, and gives exactly (==, not approx) the two-pass recall: ties counted against the model,
    duplicate image and caption groups, NaN and infinite scores, k above the number of samples, k
    past the one-pass limit (two passes then), row blocks and pieces of a few pairs."""
    rows, pairs = {"whole": (None, None), "blocks of 5 rows": (5, 3), "blocks of 1 row, 1 pair each": (1, 1)}[
        chunk
    ]
    for seed in range(45):  # every special case of _case at least twice
        images, texts, image_groups, caption_groups = _case(seed)
        n = images.shape[0]
        if rows is not None:
            monkeypatch.setattr(evaluate_mod, "RECALL_CHUNK_ELEMENTS", rows * n)
            monkeypatch.setattr(evaluate_mod, "RECALL_CHUNK_PAIRS", pairs)
        ks = (1, 5, 10) if seed % 6 else (1, 2, 3, evaluate_mod.ONE_PASS_MAX_K + 1)
        expected = _two_passes(images, texts, ks, image_groups, caption_groups)
        got = evaluate_mod.paired_recall_at_k(images, texts, ks, image_groups, caption_groups)
        assert got == expected, (seed, n)


def test_one_pass_makes_the_product_once(monkeypatch):
    """The saving itself, counted by the profiler: one [rows, D] x [D, N] product per row block
    instead of one per block and direction."""
    monkeypatch.setattr(evaluate_mod, "RECALL_CHUNK_ELEMENTS", 10 * 40)  # blocks of 10 rows
    images, texts = torch.randn(40, 8), torch.randn(40, 8)

    def products(score) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            score()
        return sum(event.count for event in prof.key_averages() if event.key == "aten::mm")

    assert products(lambda: _two_passes(images, texts, (1, 5, 10), None, None)) == 8
    assert products(lambda: evaluate_mod.paired_recall_at_k(images, texts)) == 4


def test_classes_are_read_again_when_the_validation_shards_change(tmp_path):
    """The zero-shot class list was read at the first eval only: a validation shard rewritten during
    the run (here with samples of a new category, "cooking") had those samples left out of zero-shot
    without a word (eval/zeroshot_samples and eval/zeroshot_classes those of the first eval). Now the
    classes are read again when the shards' names or sizes change, and only then."""
    folder = tmp_path / "val"
    folder.mkdir()
    spec = _val_shards(folder, [["gaming", "music"]])
    engine, tokenizer = tiny_engine(train_tokenizer(spec, str(tmp_path / "tok")))
    evaluator = tiny_evaluator(spec, tokenizer, data__num_workers=0)
    first = evaluator(engine)
    assert (first["eval/zeroshot_classes"], first["eval/zeroshot_samples"]) == (2, 2)
    read = evaluator._classes
    assert evaluator(engine) == first and evaluator._classes is read  # unchanged shards: not read again
    _val_shards(folder, [["gaming", "music", "cooking", "cooking"]])  # the same path, rewritten
    second = evaluator(engine)
    assert second["eval/num_samples"] == 4
    assert (second["eval/zeroshot_classes"], second["eval/zeroshot_samples"]) == (3, 4)
