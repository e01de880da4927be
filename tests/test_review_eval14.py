"""evaluate() streams the validation set, but kept every batch whole until the eval ended: each
batch's pixel_values stayed in host memory (120 MB for 200 samples at 224 px, ~30 GB per rank for a
50k-sample set). Only what the metrics read of a batch (labels, tags, caption tokens, image ids)
outlives it now; the metrics are unchanged."""

from __future__ import annotations

import weakref

import pytest
import torch

from helpers_dist import run_distributed

BATCH_SIZE = 2


class _Engine(torch.nn.Module):
    """DeepSpeed's engine as evaluate() sees it: `.module`, a forward."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def _tracked(batches, earlier_alive: list[int]):
    """Yield `batches`; each time the next batch is asked for (the previous one has gone through the
    model by then), record how many tensors of the batches before the previous one are still alive."""
    refs: list[list] = []
    for batch in batches:
        refs.append([weakref.ref(t) for t in batch.values() if torch.is_tensor(t)])
        yield batch
        del batch
        earlier_alive.append(sum(ref() is not None for batch_refs in refs[:-1] for ref in batch_refs))


def _eval_alive(rank: int, world_size: int, val_shards: str, tok_dir: str) -> tuple[dict, list[int]]:
    """A tiny CLIP's eval of `val_shards` through the real validation stream: (metrics, per batch
    the earlier batches' tensors still alive)."""
    from transformers import AutoTokenizer

    from vutrain.config import ModelConfig
    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.tokenizer import make_tokenize
    from vutrain.data.val import ValStream
    from vutrain.evaluate import evaluate
    from vutrain.model import build_model, preset_image_processor

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    engine = _Engine(build_model(ModelConfig(preset="tiny"), tokenizer))
    tokenize = make_tokenize(tokenizer, 32)
    stream = ValStream(
        val_shards,
        preprocess=make_preprocess(preset_image_processor(64)),
        tokenize=tokenize,
        batch_size=BATCH_SIZE,
        rank=rank,
        world_size=world_size,
    )
    dummy = dict(tokenize([""]), pixel_values=torch.zeros(1, 3, 64, 64), labels=[""], label_sets=[[]])
    alive: list[int] = []
    metrics = evaluate(
        engine,
        _tracked(stream, alive),
        ["red circle", "blue square"],
        ["a photo of a {}"],
        tokenize,
        torch.float32,
        torch.device("cpu"),
        dummy,
        tag_vocab_size=8,
    )
    return metrics, alive


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    from vutrain.data.synthetic import write_synthetic
    from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer

    out = tmp_path_factory.mktemp("eval14")
    info = write_synthetic(str(out / "data"), num_samples=16, shard_size=16, val_samples=12, seed=0)
    tok_dir = str(out / "tok")
    train_bpe_tokenizer(iter_shard_texts(info["train_shards"], "{title}"), tok_dir, vocab_size=300)
    return info["val_shards"], tok_dir


def test_one_rank_eval_keeps_no_tensor_of_an_evaluated_batch(val_set):
    """Before: at the end of the stream every earlier batch (5 of 6 here) was still alive."""
    metrics, alive = _eval_alive(0, 1, *val_set)
    assert (
        metrics["eval/num_samples"] == 12
        and "eval/i2t_r1" in metrics
        and any(k.startswith("eval/tags_") for k in metrics)
    )
    assert len(alive) == 12 // BATCH_SIZE
    assert alive == [0] * len(alive)


@pytest.mark.slow
def test_two_rank_eval_keeps_no_tensor_of_an_evaluated_batch(val_set):
    """2 gloo ranks, 6 samples each in 3 batches: before, both earlier batches were alive at the end."""
    (metrics0, alive0), (metrics1, alive1) = run_distributed(_eval_alive, 2, *val_set)
    assert metrics0 == metrics1 and metrics0["eval/num_samples"] == 12
    for alive in (alive0, alive1):
        assert len(alive) == 12 // 2 // BATCH_SIZE
        assert alive == [0] * len(alive)
