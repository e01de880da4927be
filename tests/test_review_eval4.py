"""Review of the eval area (4): the zero-shot class list read once, the eval of an empty held-out set."""

from __future__ import annotations

import logging
import sys

import torch
from tar_shards import break_jpegs
from tiny_eval import evals_on_rank, train_tokenizer

from helpers_dist import run_distributed


def _classes_and_tar_opens(rank: int, world_size: int, val_shards: str) -> tuple[list[str], int]:
    from vutrain.config import RunConfig
    from vutrain.evaluate import Evaluator
    from vutrain.model import preset_image_processor

    opened: list[str] = []

    def count_tar_opens(event, args):  # every open() of this process: how often this rank reads a shard
        if event == "open" and str(args[0]).endswith(".tar"):
            opened.append(str(args[0]))

    sys.addaudithook(count_tar_opens)
    cfg = RunConfig()
    cfg.data.val_shards = val_shards
    processor = preset_image_processor(64)
    evaluator = Evaluator(cfg, rank, world_size, None, None, processor, torch.float32, torch.device("cpu"))
    return evaluator.classes(), len(opened)


def test_zero_shot_classes_are_read_by_rank_0_only_and_shared(tmp_path):
    """Every rank read every validation tar in full (images included) to list the zero-shot
    classes: 64 ranks read a 2 GB held-out set 64 times at the first eval. Now rank 0 reads each
    shard once and rank 1 opens none, and both hold the single-process class list, in its order."""
    from vutrain.data.synthetic import write_synthetic
    from vutrain.data.val import collect_label_values

    info = write_synthetic(str(tmp_path / "data"), num_samples=8, shard_size=4, val_samples=12, seed=0)
    shards = sorted((tmp_path / "data" / "val").glob("*.tar"))
    expected = collect_label_values(info["val_shards"])
    assert len(expected) > 1
    results = run_distributed(_classes_and_tar_opens, 2, info["val_shards"])
    assert [classes for classes, _ in results] == [expected, expected]
    assert [opens for _, opens in results] == [len(shards), 0]


def _eval_with_warnings(rank: int, world_size: int, val_shards: str, tok_dir: str) -> tuple[dict, list[str]]:
    class Collect(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.lines: list[str] = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    collect = Collect()
    logging.getLogger("vutrain").addHandler(collect)
    (metrics,) = evals_on_rank(rank, world_size, val_shards, tok_dir)
    return metrics, [line for line in collect.lines if line.startswith("eval:")]


def test_an_eval_without_a_readable_sample_says_so_in_one_line_on_rank_0(tmp_path):
    """Every validation image is unreadable: the eval row held only num_samples 0 and the skip
    count, and the log's eval line showed the same, without a word on why recall and zero-shot
    were missing. Now both ranks return the same counts-only row (no NaN metric) and rank 0 alone
    warns once, naming data.val_shards and the skip count."""
    from vutrain.data.synthetic import write_synthetic

    info = write_synthetic(str(tmp_path / "data"), num_samples=8, shard_size=8, val_samples=5, seed=0)
    broken = sum(break_jpegs(str(p)) for p in (tmp_path / "data" / "val").glob("*.tar"))
    assert broken == 5
    tok_dir = train_tokenizer(info["train_shards"], str(tmp_path / "tok"))
    results = run_distributed(_eval_with_warnings, 2, info["val_shards"], tok_dir)
    rows = [metrics for metrics, _ in results]
    assert rows[0] == rows[1] == {"eval/num_samples": 0.0, "eval/skipped_samples": 5.0}
    rank0_lines, rank1_lines = (lines for _, lines in results)
    assert len(rank0_lines) == 1 and rank1_lines == []
    assert "no validation sample" in rank0_lines[0] and "5 skipped" in rank0_lines[0]
    assert info["val_shards"] in rank0_lines[0]
