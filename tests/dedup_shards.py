"""Shared by the dedup review tests (test_review_dedup1.py, test_review_shards3.py): a dataset_tools
folder of real shards holding given PNG thumbnails, and a counter of the pHash comparisons dedup
makes (the cost those tests bound)."""

from __future__ import annotations

import json
import os

import imagehash
from test_faults_dataset_tools import SCHEMA

from dataset_tools import dedup, shards


def write_png_shards(path, images: list[bytes], per_shard: int) -> str:
    """Shards (tar, parquet, stats) of ``per_shard`` samples at ``path`` (created), holding ``images``
    in order: sample i is key f"{shard name}{i:04d}", video id f"vid{i:08d}" (each its own video and
    file), caption "t". Returns the folder."""
    path.mkdir()
    for first in range(0, len(images), per_shard):
        number = first // per_shard
        name = shards.shard_name(number)
        samples, rows = [], []
        for i in range(first, min(len(images), first + per_shard)):
            key, vid = f"{name}{i:04d}", f"vid{i:08d}"
            meta = json.dumps({"key": key, "video_id": vid}).encode()
            samples.append((key, {"png": images[i], "txt": b"t", "json": meta}))
            rows.append(
                {"key": key, "status": "success", "video_id": vid, "variant": "mqdefault", "tags": ["a"]}
            )
        shards.write_tar(os.path.join(path, f"{name}.tar"), samples)
        shards.write_parquet(os.path.join(path, f"{name}.parquet"), rows, SCHEMA)
        shards.write_stats(str(path), number, shards.stats_from_rows(rows, 0.0, 1.0))
    return str(path)


def count_phash_comparisons(monkeypatch) -> list:
    """A list that grows by one at each pHash comparison dedup makes from now on (in this test): of
    ImageHash objects, and, since 404692d, of integer pHashes through dedup._distance."""
    comparisons = []
    subtract, distance = imagehash.ImageHash.__sub__, dedup._distance
    monkeypatch.setattr(imagehash.ImageHash, "__sub__", lambda a, b: comparisons.append(1) or subtract(a, b))
    monkeypatch.setattr(dedup, "_distance", lambda a, b: comparisons.append(1) or distance(a, b))
    return comparisons
