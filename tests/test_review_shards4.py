"""``inspect --verify`` on a real shard with bytes after its end-of-archive blocks: still a finding
(exit 1), worded as trailing data after the end of the archive, not as a truncated tar.

Runtime: ~2 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail

SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())])


def _one_shard(folder) -> str:
    """A whole shard 00000 of two samples, as the repo's writers write it; returns its tar path."""
    folder.mkdir()
    samples, rows = [], []
    for i in range(2):
        key = f"00000{i:04d}"
        members = {
            "jpg": render_thumbnail(key, "mqdefault"),
            "txt": b"t",
            "json": json.dumps({"key": key}).encode(),
        }
        samples.append((key, members))
        rows.append({"key": key, "status": "success"})
    tar = os.path.join(folder, "00000.tar")
    shards.write_tar(tar, samples)
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, SCHEMA)
    shards.write_stats(str(folder), 0, shards.stats_from_rows(rows, 0.0, 1.0))
    return tar


@pytest.mark.parametrize("extra", [b"garbage\n", b"\x01" * 1024], ids=["unaligned", "block-aligned"])
def test_verify_names_trailing_data_after_the_archive_not_truncation(tmp_path, capsys, extra):
    # Bytes appended to a whole tar were reported as "not a whole number of 512-byte tar blocks
    # (truncated)" or "no end-of-archive blocks (truncated)": the shard is whole, the file is longer.
    tar = _one_shard(tmp_path / "d")
    with open(tar, "ab") as f:
        f.write(extra)
    assert main(["inspect", str(tmp_path / "d"), "--verify"]) == 1
    out = capsys.readouterr().out
    assert f"00000.tar: {len(extra)} bytes of trailing data after the end of the archive" in out
    assert "truncated" not in out


def test_verify_still_calls_a_cut_tar_truncated(tmp_path, capsys):
    tar = _one_shard(tmp_path / "d")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2 + 100)  # inside a member
    assert main(["inspect", str(tmp_path / "d"), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "truncated" in out and "trailing data" not in out
