"""A video stored twice in the validation set under other image bytes (a shard rebuilt at another
thumbnail size) is scored once; two builds' samples that share a key but not a video are both scored."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image
from tar_shards import image_bytes, write_members
from tiny_eval import tiny_engine, tiny_evaluator, train_tokenizer

FOURTH = ("0101", "vidDDDDDDD4", "Music", image_bytes(grey=250))


def _reencoded(grey: int, size: int = 24) -> bytes:
    """The thumbnail `image_bytes(grey=grey)` shows, written again at `size` px (other bytes)."""
    out = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), grey, np.uint8)).save(out, "JPEG", quality=70)
    return out.getvalue()


def _sample(key: str, video: str, category: str, image: bytes) -> list[tuple[str, bytes]]:
    meta = {"video_id": video, "title": f"a {category.lower()} video {video}", "category_name": category}
    return [(f"{key}.jpg", image), (f"{key}.json", json.dumps(meta).encode())]


def _shards(folder, second: list[tuple[str, str, str, bytes]]) -> str:
    """Shard 0: three videos; shard 1: `second` then a fourth video. A spec of both."""
    first = [("0000", "vidAAAAAAA1", "Autos", 10), ("0001", "vidBBBBBBB2", "Music", 90)]
    first.append(("0002", "vidCCCCCCC3", "Autos", 170))
    folder.mkdir()
    first = [(k, v, c, image_bytes(grey=g)) for k, v, c, g in first]
    write_members(folder / "0.tar", [m for s in first for m in _sample(*s)])
    rest = [*second, FOURTH]
    write_members(folder / "1.tar", [m for s in rest for m in _sample(*s)])
    return f"{folder}/{{0..1}}.tar"


def _evaluate(spec: str, tokenizer, engine) -> dict:
    return tiny_evaluator(spec, tokenizer, data__num_workers=0)(engine)


def test_a_video_reencoded_in_another_shard_is_scored_once(tmp_path, caplog):
    """Shard 1 holds shard 0's first video again, with its video_id, title and category but its
    thumbnail written at another size (other bytes). Copies were found by image bytes only, so it
    was scored twice (eval/num_samples 5, no eval/duplicate_samples). Now the metrics are those of
    the 4 distinct videos, eval/duplicate_samples is 1 and the warning says the bytes differ."""
    copy = ("0100", "vidAAAAAAA1", "Autos", _reencoded(10))
    with_copy = _shards(tmp_path / "copied", [copy])
    distinct = _shards(tmp_path / "alone", [])
    engine, tokenizer = tiny_engine(train_tokenizer(with_copy, str(tmp_path / "tok")))

    with caplog.at_level("WARNING", logger="vutrain"):
        copied = _evaluate(with_copy, tokenizer, engine)
    alone = _evaluate(distinct, tokenizer, engine)
    assert copied.pop("eval/duplicate_samples", None) == 1
    assert copied["eval/num_samples"] == 4
    assert copied == pytest.approx(alone, abs=1e-6)
    assert "1 of them with other image bytes" in caplog.text


def test_a_shared_key_of_another_video_is_no_copy(tmp_path):
    """Two builds number their samples alike: shard 1's "0000" is another video (its own video_id)
    with the same title and category as shard 0's "0000". It is scored: 5 samples, no copy."""
    other = ("0000", "vidEEEEEEE5", "Autos", _reencoded(10))
    other_meta = {"video_id": "vidEEEEEEE5", "title": "a autos video vidAAAAAAA1", "category_name": "Autos"}
    folder = tmp_path / "two_builds"
    spec = _shards(folder, [other])
    members = [("0000.jpg", other[3]), ("0000.json", json.dumps(other_meta).encode())]
    write_members(folder / "1.tar", [*members, *_sample(*FOURTH)])
    engine, tokenizer = tiny_engine(train_tokenizer(spec, str(tmp_path / "tok")))

    metrics = _evaluate(spec, tokenizer, engine)
    assert metrics["eval/num_samples"] == 5
    assert "eval/duplicate_samples" not in metrics
