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

import imagehash
import numpy as np
from dedup_shards import count_phash_comparisons, write_png_shards
from PIL import Image

from dataset_tools import dedup

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


def test_a_blank_frame_shared_by_hundreds_is_not_compared_pairwise(tmp_path, monkeypatch):
    images = [_blank_frame(i) for i in range(BLANK)] + [_distinct(i) for i in range(OTHERS)]
    folder = write_png_shards(tmp_path / "src", images, per_shard=200)
    comparisons = count_phash_comparisons(monkeypatch)
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
