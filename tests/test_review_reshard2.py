"""``split`` as a user who re-shards a crawl and splits off a val set runs it, on real tar shards
(JPEG, .txt, .json and an extra member, parquet, stats as the build writes them): every sample
accounted for with all its members, ``sizes.json`` agreeing with the tars; a hash split that keeps
one video's samples together and each video on its side as the crawl grows; a stats file that
parses but is no build stats file refused in one line (it was a KeyError traceback); a shard that a
running build completes during the split reported as what split did with it (it went into the
output while the result said it was skipped).

Runtime: ~3 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from dataset_tools import shards, split, vocab
from dataset_tools.fake_host import render_thumbnail

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("video_id", pa.string()),
        ("variant", pa.string()),
        ("channel_id", pa.string()),
    ]
)
MEMBERS = ("jpg", "json", "seg.png", "txt")


def _shard(folder, shard_id: int, videos: list[str], variants=("mqdefault", "hqdefault")) -> None:
    """Shard ``shard_id``: one sample per video and variant, keys named after the shard."""
    name = shards.shard_name(shard_id)
    samples, rows = [], []
    for i, (vid, variant) in enumerate((v, var) for v in videos for var in variants):
        key = f"{name}{i:04d}"
        meta = {"key": key, "video_id": vid, "variant": variant, "channel_id": f"UC{vid[-1]}"}
        members = {
            "jpg": render_thumbnail(vid, variant),
            "txt": f"caption {vid}".encode(),
            "json": json.dumps(meta).encode(),
            "seg.png": f"mask {key}".encode(),
        }
        samples.append((key, members))
        rows.append({**meta, "status": shards.SUCCESS})
    rows.append({"key": f"{name}9999", "status": "failed_to_download", "error_message": "404"})
    os.makedirs(folder, exist_ok=True)
    shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
    shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
    shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))


def _videos(first: int, count: int) -> list[str]:
    return [f"vid{n:08d}" for n in range(first, first + count)]


def _read_side(folder) -> dict[str, dict[str, bytes]]:
    """Every sample of an output folder, checking its sizes.json and stats against its tars."""
    with open(os.path.join(folder, "sizes.json")) as f:
        sizes = json.load(f)
    samples = {}
    for name in shards.iter_shard_names(str(folder)):
        tar = shards.read_tar(os.path.join(folder, f"{name}.tar"))
        stats, problem = shards.read_stats(str(folder), name)
        assert problem is None and sizes[f"{name}.tar"] == stats["successes"] == len(tar)
        assert not samples.keys() & tar.keys()
        samples.update(tar)
    assert sum(sizes.values()) == len(samples)
    return samples


def _sides_of_videos(output) -> dict[str, set[str]]:
    """video id -> the sides its samples are on."""
    sides: dict[str, set[str]] = {}
    for side in ("train", "val"):
        for members in _read_side(output / side).values():
            sides.setdefault(json.loads(members["json"])["video_id"], set()).add(side)
    return sides


def test_hash_split_keeps_every_sample_whole_and_each_video_on_one_side_as_the_crawl_grows(tmp_path):
    crawl = tmp_path / "crawl"
    for shard_id in range(3):
        _shard(crawl, shard_id, _videos(shard_id * 5, 5))
    result = split.split(str(crawl), str(tmp_path / "v1"), by="hash", val_fraction=0.3, shard_size=4)
    inputs = {}
    for name in shards.iter_shard_names(str(crawl)):
        inputs.update(shards.read_tar(os.path.join(crawl, f"{name}.tar")))
    out = {**_read_side(tmp_path / "v1" / "train"), **_read_side(tmp_path / "v1" / "val")}
    assert result["samples"] == result["train"] + result["val"] == len(inputs) == 30
    assert out == inputs  # every member of every sample, byte for byte
    assert all(sorted(members) == list(MEMBERS) for members in out.values())
    first = _sides_of_videos(tmp_path / "v1")
    assert all(len(sides) == 1 for sides in first.values())  # a video's variants stay together
    assert {"train"} in first.values() and {"val"} in first.values()

    for shard_id in range(3, 6):  # the crawl grows; a later shard adds a variant of an old video
        _shard(crawl, shard_id, _videos(shard_id * 5, 5) + ["vid00000001"], variants=("sddefault",))
    split.split(str(crawl), str(tmp_path / "v2"), by="hash", val_fraction=0.3, shard_size=4)
    second = _sides_of_videos(tmp_path / "v2")
    assert all(len(sides) == 1 for sides in second.values())
    assert {vid: second[vid] for vid in first} == first


@pytest.mark.parametrize(
    "stats",
    ["{}", "[]", json.dumps({"successes": "4", "count": 5})],
    ids=["empty-object", "list", "string-count"],
)
def test_a_stats_file_that_is_no_build_stats_file_is_refused_in_one_line(tmp_path, stats):
    crawl = tmp_path / "crawl"
    for shard_id in range(2):
        _shard(crawl, shard_id, _videos(shard_id * 2, 2))
    (crawl / "00001_stats.json").write_text(stats)
    with pytest.raises(SystemExit) as err:
        split.split(str(crawl), str(tmp_path / "out"), by="hash")
    message = str(err.value)
    assert "refusing to split" in message and "00001_stats.json" in message
    assert "not a build stats file" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit, match="refusing to vocab: 00001_stats.json"):
        vocab.build_vocab(str(crawl))


def test_a_shard_a_running_build_completes_during_the_split_is_reported_as_what_split_did(
    tmp_path, monkeypatch
):
    crawl = tmp_path / "crawl"
    for shard_id in range(3):
        _shard(crawl, shard_id, _videos(shard_id * 3, 3))
    stats_path = crawl / "00002_stats.json"
    stats = stats_path.read_text()
    stats_path.unlink()  # shard 00002 is still being built when the split starts

    real_sink = split.ShardSink

    def build_finishes_shard_then_sink(*args, **kwargs):
        stats_path.write_text(stats)  # the running build completes it while split is under way
        return real_sink(*args, **kwargs)

    monkeypatch.setattr(split, "ShardSink", build_finishes_shard_then_sink)
    result = split.split(str(crawl), str(tmp_path / "out"), by="hash", val_fraction=0.3, shard_size=4)
    out = {**_read_side(tmp_path / "out" / "train"), **_read_side(tmp_path / "out" / "val")}
    assert result["skipped_incomplete_shards"] == ["00002"]
    assert result["samples"] == len(out) == 12  # shards 00000 and 00001: 2 x 3 videos x 2 variants
    assert not any(key.startswith("00002") for key in out)
