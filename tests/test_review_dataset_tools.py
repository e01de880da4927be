"""dataset_tools inspect/split/dedup/vocab on a folder with nothing to check or a parquet cut short:
one finding or one line naming the shard, never "verify: OK" over nothing or a pyarrow traceback."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest
from test_dataset_tools_subcommands import _keys, _plain_shard
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, inspect_shards, shards
from dataset_tools.cli import main


def test_inspect_verify_of_a_folder_without_shards_is_not_ok(tmp_path, capsys):
    # `inspect OUT --verify` on split's OUT (shards are in OUT/train, OUT/val) or on a mistyped
    # empty folder printed "verify: OK" and exited 0 with nothing checked.
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(2):
        _shard(src, shard_id, 4)
    out = tmp_path / "out"
    assert main(["split", str(src), "--output", str(out), "--by", "hash", "--val-fraction", "0.5"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--verify"]) == 1
    printed = capsys.readouterr().out
    assert "verify: OK" not in printed and "no shards here, nothing verified" in printed
    assert main(["inspect", str(out / "train"), "--verify"]) == 0  # a real shard folder still passes


def _cut_parquet(folder, name: str = "00001") -> None:
    path = os.path.join(folder, f"{name}.parquet")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def test_inspect_counts_an_unreadable_parquet_as_a_finding(tmp_path):
    # A parquet cut short (an interrupted copy) was an ArrowInvalid traceback out of --verify.
    for shard_id in range(3):
        _shard(tmp_path, shard_id, 5)
    _cut_parquet(tmp_path)
    report = inspect_shards.inspect_dir(str(tmp_path), verify=True)
    assert len(report["corrupt"]) == 1 and report["corrupt"][0].startswith("00001.parquet: unreadable")
    assert report["shards"] == 3 and report["successes"] == 10  # the other shards still counted
    plain = inspect_shards.inspect_dir(str(tmp_path))  # without --verify: a finding too, exit 1
    assert "problems: 1" in inspect_shards.format_report(plain)


@pytest.mark.parametrize("command", ["split", "dedup", "vocab"])
def test_split_dedup_vocab_refuse_an_unreadable_parquet_in_one_line(tmp_path, command):
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(3):
        _shard(src, shard_id, 5)
    _cut_parquet(src)
    out = tmp_path / "out"
    args = {
        "split": ["--output", str(out), "--by", "hash"],
        "dedup": ["--filter-output", str(out)],
        "vocab": ["--output", str(tmp_path / "vocab.json")],
    }[command]
    with pytest.raises(SystemExit) as err:
        main([command, str(src), *args])
    message = str(err.value.code)
    assert f"refusing to {command}: 00001.parquet: unreadable" in message
    assert "Delete 00001_stats.json" in message and "\n" not in message
    assert not out.exists()


def test_dedup_drops_repeats_of_one_video(tmp_path):
    # Plain img2dataset keeps every repeated url (a trending CSV lists a video once per day): the
    # repeats were "the same video", never compared, so dedup found none and kept every copy.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3)
    _plain_shard(src, 1, 3)
    rows, schema = shards.read_parquet_rows(str(src / "00001.parquet"))
    rows[2]["url"] = rows[0]["url"].replace("/1/", "/0/")  # 000010002 repeats 000000000's url
    shards.write_parquet(str(src / "00001.parquet"), rows, schema)
    samples = shards.read_tar(str(src / "00001.tar"))
    samples["000010002"]["jpg"] = shards.read_tar(str(src / "00000.tar"))["000000000"]["jpg"]
    shards.write_tar(str(src / "00001.tar"), samples.items())
    report = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert [[m["key"] for m in g] for g in report["groups"]] == [["000000000", "000010002"]]
    assert report["duplicates"] == 1 and report["kept"] == 5
    assert "000010002" not in _keys(tmp_path / "out")


def test_dedup_drops_an_exact_repeat_of_one_video_id(tmp_path):
    # The same video id twice with the same bytes (sha256): kept twice, as "the same video".
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(2):
        _shard(src, shard_id, 3)
    first = shards.read_tar(str(src / "00000.tar"))["000000000"]["jpg"]
    for name in ("00000", "00001"):
        rows, schema = shards.read_parquet_rows(str(src / f"{name}.parquet"))
        for row in rows:
            row["sha256"] = row["key"]
        if name == "00001":
            rows[2]["video_id"], rows[2]["sha256"] = "vid00000000", "000000000"  # 000000000 again
        shards.write_parquet(
            str(src / f"{name}.parquet"), rows, schema.append(pa.field("sha256", pa.string()))
        )
    samples = shards.read_tar(str(src / "00001.tar"))
    samples["000010002"]["jpg"] = first
    shards.write_tar(str(src / "00001.tar"), samples.items())
    report = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert [[m["key"] for m in g] for g in report["groups"]] == [["000000000", "000010002"]]
    assert report["groups"][0][0]["video_id"] == report["groups"][0][1]["video_id"] == "vid00000000"
    assert report["exact"] == 1 and report["kept"] == 5
    assert "000010002" not in _keys(tmp_path / "out")
