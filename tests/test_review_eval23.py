"""After the image loop an eval gathers every per-sample field (labels, caption tokens, image ids,
video ids, tags) in one object collective, not one each: each object collective pickles its lists
and, with NCCL, copies them through the device."""

from __future__ import annotations

import json

import torch.distributed as dist
from tar_shards import image_bytes, write_members
from tiny_eval import tiny_engine, tiny_evaluator, train_tokenizer

from helpers_dist import run_distributed

SHARDS = (
    [("0000", "Autos", ["cat"], 10, "a"), ("0001", "Music", ["cat", "dog"], 90, "b")],  # read by rank 0
    [("0002", "Music", ["dog"], 170, "c"), ("0003", "Autos", ["cat"], 30, "a")],  # read by rank 1
)
"""Per shard (one per rank): key, category, tags, grey and video_id of each sample. 0003 is 0000's
video re-encoded (other bytes, the same caption, labels and tags): a copy only the gathered video
ids of both ranks reveal."""


def _write_shards(folder) -> str:
    for index, samples in enumerate(SHARDS):
        members = []
        for key, category, tags, grey, video in samples:
            meta = {"title": f"a {category.lower()} video of {' '.join(tags)}", "category_name": category}
            meta.update(tags=tags, video_id=video)
            members += [(f"{key}.jpg", image_bytes(grey=grey)), (f"{key}.json", json.dumps(meta).encode())]
        write_members(folder / f"{index}.tar", members)
    return f"{folder}/{{0..1}}.tar"


def _eval_counting_object_gathers(
    rank: int, world_size: int, val_shards: str, tok_dir: str, tag_vocab_size: int
):
    """(metrics, calls of all_gather_object) of this rank's eval (its class list comes by an object
    broadcast, not counted; no worker count to agree on: data.num_workers=0); the real collective
    runs, wrapped by a counter."""
    real = dist.all_gather_object
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    engine, tokenizer = tiny_engine(tok_dir)
    evaluator = tiny_evaluator(
        val_shards, tokenizer, rank, world_size, data__num_workers=0, eval__tag_vocab_size=tag_vocab_size
    )
    dist.all_gather_object = counted
    try:
        return evaluator(engine), len(calls)
    finally:
        dist.all_gather_object = real


def _both_tag_settings(rank: int, world_size: int, val_shards: str, tok_dir: str) -> list:
    return [_eval_counting_object_gathers(rank, world_size, val_shards, tok_dir, size) for size in (8, 0)]


def test_one_object_gather_per_eval_gives_the_one_rank_metrics(tmp_path):
    """Two gloo ranks, one shard each, with and without the tag metrics: each eval makes one
    all_gather_object (five with the tags, four without, before), and its metrics are those of one
    rank reading both shards, the cross-rank video copy found and the tag metrics scored."""
    val_shards = _write_shards(tmp_path)
    tok_dir = train_tokenizer(val_shards, str(tmp_path / "tok"))
    ranks = run_distributed(_both_tag_settings, 2, val_shards, tok_dir, timeout_s=60.0)
    alone = _both_tag_settings(0, 1, val_shards, tok_dir)

    for setting, (one_rank_metrics, _) in enumerate(alone):
        (metrics0, gathers0), (metrics1, gathers1) = (ranks[0][setting], ranks[1][setting])
        assert gathers0 == gathers1 == 1
        assert metrics0 == metrics1 == one_rank_metrics
        assert metrics0["eval/num_samples"] == 3 and metrics0["eval/duplicate_samples"] == 1
    assert any(key.startswith("eval/tag") for key in alone[0][0]), alone[0][0]
    assert not any(key.startswith("eval/tag") for key in alone[1][0])
