"""Review of ``split --by channel`` on real shards where some samples name no channel (plain
img2dataset shards, old exports): every sample is still written once, and the result and stderr
say how many were placed by their video alone instead of by a channel.

Runtime: ~3 s on 2 busy cores.
"""

from __future__ import annotations

import pyarrow as pa
from tar_shards import write_built_shard

from dataset_tools import split

SCHEMA = pa.schema(
    [("key", pa.string()), ("status", pa.string()), ("video_id", pa.string()), ("channel_id", pa.string())]
)


def _folder(tmp_path) -> str:
    """Shard 0: 4 samples of channels UC0/UC1; shard 1: 3 samples without a channel."""
    src = tmp_path / "src"
    src.mkdir()
    with_channel = [
        {"key": f"00000{i:04d}", "status": "success", "video_id": f"vid{i:08d}", "channel_id": f"UC{i % 2}"}
        for i in range(4)
    ]
    without = [{"key": f"00001{i:04d}", "status": "success", "video_id": f"vidx{i:07d}"} for i in range(3)]
    write_built_shard(str(src), 0, with_channel, SCHEMA)
    write_built_shard(str(src), 1, without, SCHEMA)
    return str(src)


def test_a_channel_split_counts_and_names_the_samples_without_a_channel(tmp_path, capsys):
    # They went to a side by their video, as --by hash does, and the result read as a channel split
    # of every sample: nothing said that one channel's videos among them could be on both sides.
    src = _folder(tmp_path)
    result = split.split(src, str(tmp_path / "out"), by="channel", val_fraction=0.5)
    assert result["samples"] == result["train"] + result["val"] == 7
    assert result["no_channel"] == 3
    err = capsys.readouterr().err
    assert "split --by channel: 3 of 7 samples have no channel_id or channel_title" in err, err
    assert "(as --by hash)" in err


def test_a_hash_split_neither_counts_nor_names_samples_without_a_channel(tmp_path, capsys):
    src = _folder(tmp_path)
    result = split.split(src, str(tmp_path / "hash"), by="hash", val_fraction=0.5)
    assert "no_channel" not in result and result["samples"] == 7
    assert "no channel_id" not in capsys.readouterr().err
