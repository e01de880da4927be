"""One rank's eval fails partway (a batch pull or a forward raises): every rank stops at once.
A zero-shot class whose every sample is unreadable is no candidate. A video stored in two
validation shards is scored once."""

from __future__ import annotations

import json

import pytest
import torch
from tar_shards import image_bytes, write_members
from tiny_eval import Engine, tiny_engine, tiny_evaluator, train_tokenizer

from helpers_dist import run_distributed

GROUP_TIMEOUT_S = 90.0
"""Bounds each collective of the test's group: on the old code the healthy rank's wait ends here."""


def _failing_preprocess(preprocess, fail_at: int):
    """`preprocess`, raising (as a shard whose reader raises instead of skipping) at call `fail_at`."""
    calls = [0]

    def run(image):
        calls[0] += 1
        if calls[0] == fail_at:
            raise RuntimeError("val shard 00001.tar: read error at byte 81920")
        return preprocess(image)

    return run


class _OomEngine(Engine):
    """The tiny engine whose image forward raises an out-of-memory error at call `fail_at`."""

    def __init__(self, module: torch.nn.Module, fail_at: int):
        super().__init__(module)
        self.fail_at, self.image_calls = fail_at, 0

    def forward(self, **inputs):
        if inputs.get("pixel_values") is not None:
            self.image_calls += 1
            if self.image_calls == self.fail_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(**inputs)


def _outcome(evaluator, engine) -> tuple[str, str] | dict:
    try:
        return evaluator(engine)
    except Exception as e:
        return type(e).__name__, str(e)


def _three_evals(rank: int, world_size: int, val_shards: str, tok_dir: str) -> list:
    """Rank 1's third image fails to read; then rank 0's second image forward runs out of memory;
    then an eval where nothing fails (the group must still be in step)."""
    from vutrain.data.preprocess import make_preprocess
    from vutrain.model import preset_image_processor

    engine, tokenizer = tiny_engine(tok_dir)
    preprocess = make_preprocess(preset_image_processor(64))
    fields = dict(data__num_workers=0)
    pull_fails = _failing_preprocess(preprocess, 3) if rank == 1 else preprocess
    read_error = _outcome(
        tiny_evaluator(val_shards, tokenizer, rank, world_size, pull_fails, **fields), engine
    )
    oom_engine = _OomEngine(engine.module, 2 if rank == 0 else 0)
    evaluator = tiny_evaluator(val_shards, tokenizer, rank, world_size, preprocess, **fields)
    oom = _outcome(evaluator, oom_engine)
    return [read_error, oom, _outcome(evaluator, engine)]


def test_a_rank_whose_eval_fails_stops_every_rank_with_its_error(tmp_path):
    """Three val shards of 4 over 2 ranks: rank 0 has 4 batches, rank 1 has 2. Rank 1's second
    batch pull raises: rank 1 re-raises its own error and rank 0 raises EvalFailedOnAnotherRank
    naming rank 1 and that error (it waited in the all-reduce until the group timeout). Rank 0's
    forward running out of memory stops rank 1 the same way. The next eval of the same group
    runs to the end on both ranks, with equal metrics over all 12 samples."""
    from vutrain.data.synthetic import write_synthetic

    info = write_synthetic(str(tmp_path / "data"), num_samples=8, shard_size=4, val_samples=12, seed=0)
    tok_dir = train_tokenizer(info["train_shards"], str(tmp_path / "tok"))
    (read0, oom0, ok0), (read1, oom1, ok1) = run_distributed(
        _three_evals, 2, info["val_shards"], tok_dir, timeout_s=GROUP_TIMEOUT_S
    )

    assert read1 == ("RuntimeError", "val shard 00001.tar: read error at byte 81920")
    name, message = read0
    assert name == "EvalFailedOnAnotherRank"
    assert "rank 1: RuntimeError: val shard 00001.tar: read error at byte 81920" in message

    assert oom0[0] == "OutOfMemoryError" and "Tried to allocate 2.00 GiB" in oom0[1]
    name, message = oom1
    assert name == "EvalFailedOnAnotherRank"
    assert "rank 0: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in message

    assert ok0 == ok1 and ok0["eval/num_samples"] == 12


def _sample(key: str, category: str, grey: int | None) -> list[tuple[str, bytes]]:
    """The members of one validation sample; grey None: an image that does not decode."""
    meta = {"title": f"a {category.lower()} video with grey {grey}", "category_name": category}
    image = image_bytes(grey=grey) if grey is not None else b"not a jpeg"
    return [(f"{key}.jpg", image), (f"{key}.json", json.dumps(meta).encode())]


def test_a_class_whose_every_sample_is_unreadable_is_no_zero_shot_class(tmp_path):
    """The class list is read from every sample's metadata, so "Comedy", whose one image does not
    decode, was a candidate: eval/zeroshot_classes said 3 and the chance 1/3 for a set whose scored
    samples hold 2 classes. Now 2 classes and chance 1/2; the unreadable sample is counted as skipped."""
    samples = [("Autos", 10), ("Autos", 90), ("Music", 170), ("Comedy", None)]
    members = [m for i, (category, grey) in enumerate(samples) for m in _sample(f"{i:04d}", category, grey)]
    shard = write_members(tmp_path / "val.tar", members)
    engine, tokenizer = tiny_engine(train_tokenizer(shard, str(tmp_path / "tok")))

    metrics = tiny_evaluator(shard, tokenizer, data__num_workers=0)(engine)
    assert metrics["eval/num_samples"] == 3 and metrics["eval/skipped_samples"] == 1
    assert metrics["eval/zeroshot_classes"] == 2 and metrics["eval/zeroshot_samples"] == 3
    assert metrics["eval/zeroshot_chance"] == pytest.approx(1 / 2)


def test_a_video_in_two_validation_shards_is_scored_once(tmp_path):
    """Shard 1 holds a copy of shard 0's first video (another key, as a second download of one
    URL list gets). It was scored twice: eval/num_samples 5, its pair weighted double and, as a wrong
    column, counted twice against the other rows. Now the metrics are those of the 4 distinct
    samples, and eval/duplicate_samples says 1 copy was left out."""
    first = [("0000", "Autos", 10), ("0001", "Music", 90), ("0002", "Autos", 170)]
    second = [("0003", "Music", 250)]
    copied, alone = tmp_path / "copied", tmp_path / "alone"
    for folder, extra in ((copied, [("0100", "Autos", 10)]), (alone, [])):
        folder.mkdir()
        write_members(folder / "0.tar", [m for s in first for m in _sample(*s)])
        write_members(folder / "1.tar", [m for s in extra + second for m in _sample(*s)])
    engine, tokenizer = tiny_engine(train_tokenizer(f"{copied}/{{0..1}}.tar", str(tmp_path / "tok")))

    with_copy = tiny_evaluator(f"{copied}/{{0..1}}.tar", tokenizer, data__num_workers=0)(engine)
    distinct = tiny_evaluator(f"{alone}/{{0..1}}.tar", tokenizer, data__num_workers=0)(engine)
    copies = with_copy.pop("eval/duplicate_samples", None)
    assert with_copy["eval/num_samples"] == 4
    assert with_copy == pytest.approx(distinct, abs=1e-6)
    assert copies == 1 and "eval/duplicate_samples" not in distinct
