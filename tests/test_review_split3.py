"""``split --val-fraction`` that leaves a side empty: a small set split at 0.01 exited 0 with
``"val": 0`` and an empty OUT/val, silently; training that then named OUT/val as its val shards
failed later, far from the cause. Now stderr names the empty side and a fraction that fills it
(checked by splitting again at that fraction), and the exit stays 0 (a train-only split is legal).

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import re

import pyarrow as pa
from tar_shards import write_built_shard

from dataset_tools import split
from dataset_tools.cli import main

SCHEMA = pa.schema(
    [("key", pa.string()), ("status", pa.string()), ("video_id", pa.string()), ("channel_id", pa.string())]
)


def _folder(tmp_path, channels: list[str]) -> str:
    """One shard of one sample per entry of `channels` (its channel id), videos vid00000000..."""
    src = tmp_path / "src"
    src.mkdir()
    rows = [
        {"key": f"00000{i:04d}", "status": "success", "video_id": f"vid{i:08d}", "channel_id": channel}
        for i, channel in enumerate(channels)
    ]
    write_built_shard(str(src), 0, rows, SCHEMA)
    return str(src)


def _suggested(err: str, side: str) -> float:
    match = re.search(rf"left {side} empty \(0 of \d+ samples\); --val-fraction ([0-9.]+) or", err)
    assert match, err
    return float(match.group(1))


def test_an_empty_val_is_named_with_a_fraction_that_fills_it(tmp_path, capsys):
    src = _folder(tmp_path, [f"UC{i}" for i in range(6)])
    result = split.split(src, str(tmp_path / "small"), by="hash", val_fraction=0.01)
    assert result["val"] == 0 and result["train"] == 6  # the set this test needs (deterministic)
    fraction = _suggested(capsys.readouterr().err, "val")
    again = split.split(src, str(tmp_path / "again"), by="hash", val_fraction=fraction)
    assert again["val"] >= 1 and again["train"] >= 1, (fraction, again)


def test_an_empty_train_is_named_with_a_fraction_that_fills_it(tmp_path, capsys):
    src = _folder(tmp_path, [f"UC{i}" for i in range(6)])
    result = split.split(src, str(tmp_path / "big"), by="channel", val_fraction=0.99)
    assert result["train"] == 0 and result["val"] == 6
    fraction = _suggested(capsys.readouterr().err, "train")
    again = split.split(src, str(tmp_path / "again"), by="channel", val_fraction=fraction)
    assert again["train"] >= 1, (fraction, again)


def test_one_channel_is_said_to_be_unsplittable_by_channel(tmp_path, capsys):
    src = _folder(tmp_path, ["UC0"] * 3)
    result = split.split(src, str(tmp_path / "out"), by="channel", val_fraction=0.5)
    assert 0 in (result["train"], result["val"])
    err = capsys.readouterr().err
    assert "empty (0 of 3 samples); they are all one channel" in err and "use --by hash" in err, err


def test_the_cli_still_exits_0_and_a_split_with_both_sides_says_nothing(tmp_path, capsys):
    src = _folder(tmp_path, [f"UC{i}" for i in range(6)])
    out = str(tmp_path / "cli")
    assert main(["split", src, "--output", out, "--by", "hash", "--val-fraction", "0.01"]) == 0
    assert "left val empty" in capsys.readouterr().err
    split.split(src, str(tmp_path / "half"), by="hash", val_fraction=0.5)
    assert "empty" not in capsys.readouterr().err
