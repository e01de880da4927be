"""``dedup`` and ``vocab`` on real tar shards (JPEG, .txt, .json, parquet, stats as the build writes
them): a shard that a running build completes while they run is reported as what they did with it
(each step listed the shards anew: dedup reported it neither skipped nor hashed, vocab counted its
tags while naming it skipped); and an input member name of over 100 characters without a ``/``, as
GNU and PAX tars of other tools hold, is written to the output (it was ``ValueError: name is too
long`` from the USTAR writer, after the output was claimed), read back by the training stream and
webdataset; a short name is written byte for byte as before.

Runtime: ~3 s on 2 busy cores.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pyarrow as pa
import pytest
import webdataset as wds

from dataset_tools import dedup, shards, split, vocab
from dataset_tools.fake_host import render_thumbnail
from vutrain.data.samples import iter_tar_files

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("video_id", pa.string()),
        ("tags", pa.string()),
    ]
)


def _shard(folder, shard_id: int, videos: list[str], key_of=None, tar_format=tarfile.USTAR_FORMAT) -> None:
    """Shard ``shard_id``: one sample per video tagged ``tag<shard_id>``, keys named after the shard
    (or ``key_of(i)``), its tar written by ``tarfile`` in ``tar_format``."""
    name = shards.shard_name(shard_id)
    rows = []
    with tarfile.open(os.path.join(folder, f"{name}.tar"), "w", format=tar_format) as tar:
        for i, vid in enumerate(videos):
            key = key_of(i) if key_of else f"{name}{i:04d}"
            meta = {"key": key, "video_id": vid, "tags": f"tag{shard_id}"}
            members = {
                "jpg": render_thumbnail(vid, "mqdefault"),
                "json": json.dumps(meta).encode(),
                "txt": f"caption {vid}".encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            rows.append({**meta, "status": shards.SUCCESS})
    shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
    shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))


def _crawl_with_shard_2_being_built(tmp_path):
    """Three shards of 3 videos; shard 00002's stats not written yet. Returns (folder, the function
    that writes them: the running build completing it)."""
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    for shard_id in range(3):
        _shard(crawl, shard_id, [f"vid{shard_id}{n:07d}" for n in range(3)])
    stats_path = crawl / "00002_stats.json"
    stats = stats_path.read_text()
    stats_path.unlink()
    return crawl, lambda: stats_path.write_text(stats)


def test_dedup_reports_a_shard_completed_during_the_run_as_what_it_did_with_it(tmp_path, monkeypatch):
    crawl, build_completes_shard_2 = _crawl_with_shard_2_being_built(tmp_path)
    real_check = dedup.require_whole_shards

    def check_then_build_completes(*args, **kwargs):
        real_check(*args, **kwargs)
        build_completes_shard_2()

    monkeypatch.setattr(dedup, "require_whole_shards", check_then_build_completes)
    report = dedup.dedup(str(crawl), filter_output=str(tmp_path / "out"), shard_size=4)
    # Shards 00000 and 00001 hashed and written; 00002 said skipped (it was in neither list).
    assert report["skipped_incomplete_shards"] == ["00002"]
    assert report["samples"] == report["kept"] == 6
    out = {}
    for name in shards.iter_shard_names(str(tmp_path / "out")):
        out.update(shards.read_tar(os.path.join(tmp_path, "out", f"{name}.tar")))
    assert len(out) == 6 and not any(key.startswith("00002") for key in out)


def test_vocab_reports_a_shard_completed_during_the_run_as_what_it_did_with_it(tmp_path, monkeypatch):
    crawl, build_completes_shard_2 = _crawl_with_shard_2_being_built(tmp_path)
    real_skipped = vocab.skipped_shards

    def skipped_then_build_completes(*args, **kwargs):
        skipped = real_skipped(*args, **kwargs)
        build_completes_shard_2()
        return skipped

    monkeypatch.setattr(vocab, "skipped_shards", skipped_then_build_completes)
    result = vocab.build_vocab(str(crawl), min_count=1)
    assert result["skipped_incomplete_shards"] == ["00002"]
    assert result["samples"] == 6  # its tags were counted while it was named skipped
    assert [t["name"] for t in result["tags"]] == ["tag0", "tag1"]


LONG_KEY = "k" * 120  # with ".jpg": over ustar's 100-character name field, and no "/" to split at
# Also a name USTAR fitted into its prefix field and one that is not ASCII: now in a pax header too.
KEYS = [LONG_KEY, f"{'d' * 60}/{'k' * 60}", "clé"]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
@pytest.mark.parametrize("command", ["split", "dedup"])
def test_an_input_member_name_over_100_characters_is_written_and_read_back(tmp_path, tar_format, command):
    crawl = tmp_path / "crawl"
    crawl.mkdir()
    videos = [f"vid000000{i}" for i in range(len(KEYS))]
    _shard(crawl, 0, videos, key_of=KEYS.__getitem__, tar_format=tar_format)
    out = tmp_path / "out"
    if command == "split":
        split.split(str(crawl), str(out), by="hash", val_fraction=0.5, shard_size=4)
        tars = sorted(str(p) for p in out.glob("*/*.tar"))
    else:
        dedup.dedup(str(crawl), filter_output=str(out), shard_size=4)
        tars = sorted(str(p) for p in out.glob("*.tar"))
    expected = shards.read_tar(str(crawl / "00000.tar"))
    assert sorted(expected) == sorted(KEYS)
    written = {}
    for tar in tars:
        written.update(shards.read_tar(tar))
    assert written == expected
    # The training stream's own tar reader and webdataset 0.2.x read the long names whole.
    streamed = {}
    for tar in tars:
        with open(tar, "rb") as f:
            streamed.update(dict(iter_tar_files(f)))
    assert sorted(streamed) == sorted(f"{key}.{ext}" for key in expected for ext in expected[key])
    loaded = {s["__key__"]: s for s in wds.WebDataset(tars, shardshuffle=False)}
    assert sorted(loaded) == sorted(expected)
    assert all(loaded[key]["jpg"] == expected[key]["jpg"] for key in expected)


def test_short_names_are_written_byte_for_byte_as_the_ustar_writer_wrote_them(tmp_path):
    samples = [
        ("000000001", {"jpg": b"\xff\xd8 image", "txt": "caption é".encode()}),
        ("000000000", {"json": b"{}"}),
    ]
    path = str(tmp_path / "00000.tar")
    shards.write_tar(path, samples)
    reference = io.BytesIO()
    with tarfile.open(fileobj=reference, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in sorted(samples):
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mode, info.mtime = len(members[ext]), 0o444, 0
                info.uname = info.gname = "bigdata"
                tar.addfile(info, io.BytesIO(members[ext]))
    with open(path, "rb") as f:
        assert f.read() == reference.getvalue()
