"""Shard listing and the folder tools' paths: a stats file that cannot be read (a folder of that
name, a dangling symlink standing for one deleted by a concurrent build) is one line or an
incomplete shard, never an OSError traceback; `vocab --output` under a file is one line; `split`
into the folder holding its input is refused before anything is written. Real shards, real CLI.

Runtime: ~6 s on 2 busy cores.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from tar_shards import write_built_shard

from dataset_tools import cli, shards, split

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("video_id", pa.string()),
        ("tags", pa.list_(pa.string())),
    ]
)


def _two_shards(folder) -> str:
    """Shards 00000 and 00001 of three samples each; returns the folder."""
    os.makedirs(folder)
    for shard_id in range(2):
        keys = [f"{shard_id:05d}{i:04d}" for i in range(3)]
        rows = [{"key": k, "status": "success", "video_id": f"v{k}", "tags": ["a"]} for k in keys]
        write_built_shard(str(folder), shard_id, rows, SCHEMA)
    return str(folder)


def _one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as caught:
        cli.main(argv)
    message = str(caught.value.code)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "command", [["inspect"], ["finalize"], ["vocab", "--output", "V"], ["split", "--output", "S"]]
)
def test_a_stats_file_that_is_a_folder_is_one_line(tmp_path, command):
    folder = _two_shards(tmp_path / "in")
    stats = os.path.join(folder, "00001_stats.json")
    os.remove(stats)
    os.mkdir(stats)  # unreadable as a file, as one without read permission is (root ignores those)
    argv = [command[0], folder, *(str(tmp_path / a) if a.isupper() else a for a in command[1:])]
    message = _one_line_exit(argv)
    assert stats in message and "readable" in message


def test_a_stats_file_gone_since_the_listing_is_an_incomplete_shard(tmp_path, capsys):
    # A dangling symlink reads as a stats file deleted between os.listdir and open (a build or
    # reshard replacing it): its shard is not complete, and the tools name it skipped.
    folder = _two_shards(tmp_path / "in")
    stats = os.path.join(folder, "00001_stats.json")
    os.remove(stats)
    os.symlink(os.path.join(folder, "gone.json"), stats)
    assert shards.complete_shards(folder) == {0: "00000"}
    result = split.split(folder, str(tmp_path / "out"), by="hash", val_fraction=0.5)
    assert result["samples"] == 3 and result["skipped_incomplete_shards"] == ["00001"]
    assert "00001" in capsys.readouterr().err


def test_vocab_output_under_a_file_is_one_line(tmp_path):
    folder = _two_shards(tmp_path / "in")
    a_file = tmp_path / "videos.csv"
    a_file.write_text("video_id\n")
    message = _one_line_exit(["vocab", folder, "--output", str(a_file / "vocab.json")])
    assert f"{a_file} is a file, not a folder" in message
    assert a_file.read_text() == "video_id\n"


@pytest.mark.parametrize("inside", ["train", "val/older"])
def test_split_into_the_folder_holding_its_input_is_refused(tmp_path, inside):
    out = tmp_path / "data"
    folder = _two_shards(out / inside)
    before = sorted(os.listdir(folder))
    message = _one_line_exit(["split", folder, "--output", str(out)])
    assert "holds it" in message and "delete" not in message  # not "delete this one first"
    assert sorted(os.listdir(folder)) == before
    assert sorted(os.listdir(out)) == [inside.split("/")[0]]  # the other side was not created


@pytest.mark.parametrize("output", [".", ".."])
def test_dedup_filter_output_holding_its_input_is_refused(tmp_path, output):
    """`dedup DIR --filter-output DIR` (or a folder holding DIR) got split's old advice too."""
    folder = _two_shards(tmp_path / "data" / "train")
    before = sorted(os.listdir(folder))
    message = _one_line_exit(["dedup", folder, "--filter-output", os.path.join(folder, output)])
    assert "holds it" in message and "delete" not in message, message
    assert sorted(os.listdir(folder)) == before
