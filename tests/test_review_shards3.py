"""Review of ``dedup`` on many near-identical thumbnails: a blank frame shared by hundreds of
videos (one pHash, each file different, so no exact match) put every copy in the same pHash chunk
buckets, and each new copy was compared with every earlier one (O(n^2): 4,000 samples took
~200 s, 20,000 hours). A repeated pHash now joins its first sample's group uncompared; the groups
and the report are the same (real shards, real pHashes).

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import io
import json
import os

import imagehash
import numpy as np
from PIL import Image
from test_faults_dataset_tools import SCHEMA

from dataset_tools import dedup, shards

BLANK = 400  # copies of the blank frame
OTHERS = 20  # distinct thumbnails beside them


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def _blank_frame(i: int) -> bytes:
    """A black 160x90 frame with one dim pixel placed by ``i``: another file (sha256) each time,
    the same pHash."""
    pixels = np.zeros((90, 160, 3), np.uint8)
    pixels[i % 90, (i // 90) % 160] = 1
    return _png(pixels)


def _distinct(i: int) -> bytes:
    return _png(np.random.default_rng(i).integers(0, 256, (90, 160, 3), dtype=np.uint8))


def _folder(path, images: list[bytes], per_shard: int = 200) -> str:
    """Shards of ``per_shard`` samples (each its own video id) holding ``images``."""
    path.mkdir()
    for shard_id in range(0, len(images), per_shard):
        name = shards.shard_name(shard_id // per_shard)
        samples, rows = [], []
        for i in range(shard_id, min(len(images), shard_id + per_shard)):
            key, vid = f"{name}{i:04d}", f"vid{i:08d}"
            meta = json.dumps({"key": key, "video_id": vid}).encode()
            samples.append((key, {"png": images[i], "txt": b"t", "json": meta}))
            rows.append(
                {"key": key, "status": "success", "video_id": vid, "variant": "mqdefault", "tags": ["a"]}
            )
        shards.write_tar(os.path.join(path, f"{name}.tar"), samples)
        shards.write_parquet(os.path.join(path, f"{name}.parquet"), rows, SCHEMA)
        shards.write_stats(str(path), shard_id // per_shard, shards.stats_from_rows(rows, 0.0, 1.0))
    return str(path)


def test_a_blank_frame_shared_by_hundreds_is_not_compared_pairwise(tmp_path, monkeypatch):
    images = [_blank_frame(i) for i in range(BLANK)] + [_distinct(i) for i in range(OTHERS)]
    folder = _folder(tmp_path / "src", images)
    comparisons = []
    distance = imagehash.ImageHash.__sub__

    def counted(a, b):
        comparisons.append(1)
        return distance(a, b)

    monkeypatch.setattr(imagehash.ImageHash, "__sub__", counted)
    # Since 404692d the search compares integer pHashes with dedup._distance: count those too.
    integer_distance = dedup._distance

    def counted_int(a, b):
        comparisons.append(1)
        return integer_distance(a, b)

    monkeypatch.setattr(dedup, "_distance", counted_int)
    report = dedup.dedup(folder, filter_output=str(tmp_path / "out"))
    blank_hashes = {str(imagehash.phash(Image.open(io.BytesIO(b)))) for b in images[:BLANK]}
    assert len(blank_hashes) == 1  # the premise: one pHash, BLANK different files
    # Linear, not pairwise: it was BLANK * (BLANK - 1) / 2 = 79,800 comparisons.
    assert len(comparisons) <= 10 * len(images)
    # Every sample is accounted for: one blank frame and the distinct thumbnails kept.
    assert report["samples"] == len(images)
    assert report["duplicates"] == report["perceptual"] == BLANK - 1
    assert report["kept"] == OTHERS + 1 == report["samples"] - report["duplicates"]
    [group] = report["groups"]
    assert len(group) == BLANK and [g["match"] for g in group].count(dedup.KEPT) == 1
    with open(tmp_path / "out" / "sizes.json") as f:
        assert sum(json.load(f).values()) == OTHERS + 1
