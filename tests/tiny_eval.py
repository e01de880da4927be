"""The eval tests' set-up on the real tiny model: a BPE tokenizer trained on shard titles, the tiny
preset (torch seed 0) behind the wrapper the Evaluator expects, and an Evaluator of a validation spec
(batches of 2, the 64 px preset processor, CLIP-exact preprocessing, captions cut at 32 tokens, fp32
on the CPU). `evals_on_rank` is the `helpers_dist.run_distributed` worker of the multi-rank tests."""

from __future__ import annotations

import torch


class Engine(torch.nn.Module):
    """What the Evaluator calls, as a DeepSpeed engine offers it: `engine(**inputs)` and
    `engine.module` (the model itself), without DeepSpeed."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, **inputs):
        return self.module(**inputs)


def train_tokenizer(shards: str, tok_dir: str) -> str:
    """A 300-token BPE tokenizer trained on the titles of `shards` (a spec), saved in `tok_dir`."""
    from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer

    train_bpe_tokenizer(iter_shard_texts(shards, "{title}"), tok_dir, vocab_size=300)
    return tok_dir


def tiny_engine(tok_dir: str):
    """(Engine around the tiny preset built with torch seed 0, the tokenizer saved in `tok_dir`)."""
    from transformers import AutoTokenizer

    from vutrain.config import ModelConfig
    from vutrain.model import build_model

    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    return Engine(build_model(ModelConfig(preset="tiny"), tokenizer)), tokenizer


def tiny_evaluator(val_shards: str, tokenizer, rank: int = 0, world_size: int = 1, preprocess=None, **fields):
    """An Evaluator of `val_shards` on `rank` of `world_size`, eval.batch_size 2. `fields` sets more
    config fields, `__` for the dot (`data__num_workers=2`); `preprocess` replaces the CLIP-exact one."""
    from vutrain.config import RunConfig
    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.tokenizer import make_tokenize
    from vutrain.evaluate import Evaluator
    from vutrain.model import preset_image_processor

    cfg = RunConfig()
    cfg.data.val_shards = val_shards
    cfg.eval.batch_size = 2
    for key, value in fields.items():
        section, name = getattr(cfg, key.split("__")[0]), key.split("__")[1]
        if not hasattr(section, name):  # a misspelt field would be set on the side, silently unused
            raise AttributeError(f"tiny_evaluator: the config has no field {key.replace('__', '.')}")
        setattr(section, name, value)
    processor = preset_image_processor(64)
    preprocess = preprocess or make_preprocess(processor)
    tokenize = make_tokenize(tokenizer, 32)
    return Evaluator(cfg, rank, world_size, preprocess, tokenize, processor, torch.float32, "cpu")


def evals_on_rank(rank: int, world_size: int, val_shards: str, tok_dir: str, evals: int = 1) -> list[dict]:
    """run_distributed worker: the metrics of `evals` evals in a row by one Evaluator of this rank."""
    engine, tokenizer = tiny_engine(tok_dir)
    evaluator = tiny_evaluator(val_shards, tokenizer, rank, world_size)
    return [evaluator(engine) for _ in range(evals)]
