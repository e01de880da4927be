"""A forward that raises on one rank during eval: under ZeRO-3 (a forward holds the parameter
gathers) that rank raises its own error at once; under ZeRO-2 every rank stops at the same batch."""

from __future__ import annotations

import torch
from tiny_eval import tiny_engine, tiny_evaluator, train_tokenizer

from helpers_dist import run_distributed

GROUP_TIMEOUT_S = 45.0
"""Bounds each collective of the test's group (DeepSpeed's ZeRO-3 gathers included): on the old
code both ranks waited here, paired in the wrong collectives, for the group's 30 minutes."""

IMAGE_SIZE_ERROR = "Input image size (32*32) doesn't match model (64*64)"


def _outcome(rank: int, world_size: int, val_shards: str, tok_dir: str, stage: int) -> tuple[str, str, str]:
    """(type name, message, notes) of this rank's eval error, ("metrics", ...) without one, on a real fp32
    DeepSpeed engine of ZeRO `stage`. Rank 1's images are preprocessed at 32 px, so the vision
    tower raises its image-size ValueError inside the forward."""
    from vutrain.config import TrainConfig
    from vutrain.data.preprocess import make_preprocess
    from vutrain.engine import build_engine
    from vutrain.model import preset_image_processor

    plain, tokenizer = tiny_engine(tok_dir)
    cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision="fp32", warmup_steps=0)
    engine = build_engine(plain.module, cfg, world_size, torch.device("cpu"))
    preprocess = make_preprocess(preset_image_processor(32 if rank == 1 else 64))
    evaluator = tiny_evaluator(val_shards, tokenizer, rank, world_size, preprocess, data__num_workers=0)
    try:
        return "metrics", str(evaluator(engine)), ""
    except Exception as e:
        return type(e).__name__, str(e), " ".join(getattr(e, "__notes__", []))


def _zero2_then_zero3(rank: int, world_size: int, val_shards: str, tok_dir: str) -> list:
    """The outcomes of a ZeRO-2 eval, then of a ZeRO-3 eval, in the same processes (one start-up:
    the ZeRO-2 failure leaves the group in step, the ZeRO-3 one leaves it broken)."""
    return [_outcome(rank, world_size, val_shards, tok_dir, stage) for stage in (2, 3)]


def test_a_forward_that_raises_under_zero3_ends_that_rank_with_its_own_error(tmp_path):
    """Rank 1's forward raised inside the vision tower after the ranks' first parameter gathers
    (ZeRO-3); rank 1 then entered the per-batch failure all-reduce while rank 0 was in its forward's
    next gather, and both waited until the group timeout: rank 1 ended with a gloo timeout, not its
    error. Now rank 1 raises its ValueError at once (noting that the others are left in the
    gather); rank 0, left in its gather, fails when rank 1 is gone. Under ZeRO-2 (no collective in
    a forward) rank 1 raises its error and rank 0 EvalFailedOnAnotherRank naming it, as before."""
    from vutrain.data.synthetic import write_synthetic

    info = write_synthetic(str(tmp_path / "data"), num_samples=8, shard_size=4, val_samples=12, seed=0)
    tok_dir = train_tokenizer(info["train_shards"], str(tmp_path / "tok"))
    (zero2_0, zero3_0), (zero2_1, zero3_1) = run_distributed(
        _zero2_then_zero3, 2, info["val_shards"], tok_dir, timeout_s=GROUP_TIMEOUT_S
    )

    assert zero2_1[0] == "ValueError" and zero2_1[1].startswith(IMAGE_SIZE_ERROR) and not zero2_1[2]
    assert zero2_0[0] == "EvalFailedOnAnotherRank" and f"rank 1: ValueError: {IMAGE_SIZE_ERROR}" in zero2_0[1]

    assert zero3_1[0] == "ValueError" and zero3_1[1].startswith(IMAGE_SIZE_ERROR), zero3_1
    assert "other ranks wait in that forward's gather" in zero3_1[2]
    assert zero3_0[0] not in ("metrics", "EvalFailedOnAnotherRank")
