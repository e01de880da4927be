"""``split --by date``: a temporal train/validation split on real tar shards (JPEG, .json, parquet,
stats as the build writes them, ``publish_time`` in both). Published before ``--cut`` -> train, on or
after it -> val, in UTC whatever the stored format; ``--val-fraction`` picks the cut that puts the
newest share in val, ties at the cut together; undated samples go to train, counted; a date split
that cannot split is refused in one line before any output exists. ``--by channel|hash`` keep
their result keys.

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dataset_tools import shards, split
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail

SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("video_id", pa.string()),
        ("title", pa.string()),
        ("channel_id", pa.string()),
        ("publish_time", pa.string()),
    ]
)


def _shards(folder, publish_times: list[str], per_shard: int = 3) -> dict[str, str]:
    """Shards of one sample per publish time (``vidNNNNNNNN``, in order); returns video id -> time."""
    folder.mkdir()
    by_video = {}
    for shard_id, start in enumerate(range(0, len(publish_times), per_shard)):
        name = shards.shard_name(shard_id)
        samples, rows = [], []
        for i, when in enumerate(publish_times[start : start + per_shard]):
            key, vid = f"{name}{i:04d}", f"vid{start + i:08d}"
            meta = {"key": key, "video_id": vid, "title": f"t{i}", "channel_id": "UC1", "publish_time": when}
            members = {
                "jpg": render_thumbnail(vid, "mqdefault"),
                "txt": b"t",
                "json": json.dumps(meta).encode(),
            }
            samples.append((key, members))
            rows.append({**meta, "status": "success"})
            by_video[vid] = when
        shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
        shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
        shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))
    return by_video


def _videos(folder) -> set[str]:
    """Video ids in the output shards, from the tars' .json (what training reads)."""
    found = set()
    for name in shards.iter_shard_names(str(folder)):
        for members in shards.read_tar(os.path.join(folder, f"{name}.tar")).values():
            found.add(json.loads(members["json"])["video_id"])
    return found


def test_cli_split_by_date_puts_samples_before_the_cut_in_train_and_the_rest_in_val(tmp_path, capsys):
    # --by date was refused by argparse (choices channel, hash): no split by time existed, so a model
    # could not be measured on videos newer than its training data.
    times = [
        "2023-06-01T10:00:00.000Z",  # Kaggle's format
        "20231231",  # yt-dlp's upload_date
        "2024-01-01T00:30:00+02:00",  # 2023-12-31 22:30 UTC: before the cut
        "2024-01-01",  # at the cut: val
        "2024-03-05T12:00:00Z",  # the Data API's publishedAt
        "2024-01-01 00:00:01",  # no zone: UTC
        "",  # undated: train
        "yesterday",  # unreadable: train
    ]
    by_video = _shards(tmp_path / "src", times)
    out = tmp_path / "out"
    assert (
        main(["split", str(tmp_path / "src"), "--output", str(out), "--by", "date", "--cut", "2024-01-01"])
        == 0
    )
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["by"] == "date" and result["cut"] == "2024-01-01T00:00:00+00:00"
    assert result["val_fraction"] is None
    assert (result["train"], result["val"]) == (5, 3)
    assert (result["no_publish_time"], result["unreadable_publish_time"]) == (2, 1)
    val = {
        v for v, t in by_video.items() if t in ("2024-01-01", "2024-03-05T12:00:00Z", "2024-01-01 00:00:01")
    }
    assert _videos(out / "val") == val
    assert _videos(out / "train") == set(by_video) - val
    assert "2 of 8 samples have no publish time" in captured.err and "'yesterday'" in captured.err
    assert "they go to train" in captured.err
    # The parquet rows travel with their samples, publish_time included.
    val_rows = pq.read_table(out / "val" / "00000.parquet").to_pylist()
    assert {row["video_id"]: row["publish_time"] for row in val_rows} == {v: by_video[v] for v in val}


def test_val_fraction_chooses_the_cut_of_the_newest_share_with_ties_together(tmp_path):
    # Day-resolution dates tie; the cut is a publish time, and every sample at it lands in val.
    days = ["2024-01-01"] * 3 + ["2024-01-02"] * 2 + ["2024-01-03"] * 3 + ["2024-01-04"] * 2
    random.Random(0).shuffle(days)
    by_video = _shards(tmp_path / "src", days)
    # 0.4 of 10 -> 4: 2024-01-04 alone gives 2, with 2024-01-03 it gives 5 (closer): both days in val.
    res = split.split(str(tmp_path / "src"), str(tmp_path / "a"), by="date", val_fraction=0.4)
    assert res["cut"] == "2024-01-03T00:00:00+00:00"
    assert (res["train"], res["val"], res["no_publish_time"]) == (5, 5, 0)
    assert _videos(tmp_path / "a" / "val") == {v for v, d in by_video.items() if d >= "2024-01-03"}
    # 0.3 -> 3: 2 (the newest day) is as close as 5 is not: only the newest day.
    res = split.split(str(tmp_path / "src"), str(tmp_path / "b"), by="date", val_fraction=0.3)
    assert (res["cut"], res["val"]) == ("2024-01-04T00:00:00+00:00", 2)
    # The same cut as --cut gives the same sides (deterministic, no seed involved).
    again = split.split(str(tmp_path / "src"), str(tmp_path / "c"), by="date", cut="2024-01-04", seed="7")
    assert _videos(tmp_path / "c" / "val") == _videos(tmp_path / "b" / "val")
    # A share no cut reaches still keeps a dated sample on each side.
    res = split.split(str(tmp_path / "src"), str(tmp_path / "d"), by="date", val_fraction=0.99)
    assert (res["cut"], res["train"]) == ("2024-01-02T00:00:00+00:00", 3)
    assert again["val"] == 2


@pytest.mark.parametrize(
    ("kwargs", "times", "message"),
    [
        ({"cut": "2025-01-01"}, ["2024-01-01", "2024-02-01"], "after the newest publish time"),
        ({"cut": "2024-01-01"}, ["2024-01-01", "2024-02-01"], "on or before the oldest publish time"),
        ({"cut": "1st of May"}, ["2024-01-01", "2024-02-01"], "not an ISO date or date time"),
        ({"val_fraction": 0.5}, ["", "", ""], "none of the 3 samples has a publish time"),
        ({"val_fraction": 0.5}, ["2024-01-01", "2024-01-01", ""], "every dated sample has one publish time"),
        ({"cut": "2024-01-15", "val_fraction": 0.2}, ["2024-01-01", "2024-02-01"], "give one"),
    ],
)
def test_a_date_split_that_cannot_split_is_refused_before_any_output(tmp_path, kwargs, times, message):
    _shards(tmp_path / "src", times)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        split.split(str(tmp_path / "src"), str(out), by="date", **kwargs)
    assert not out.exists()


def test_cut_with_channel_or_hash_is_refused_and_their_results_keep_their_keys(tmp_path, capsys):
    _shards(tmp_path / "src", ["2024-01-01", "2024-02-01", "2024-03-01"])
    with pytest.raises(SystemExit, match="only --by date has a cut"):
        split.split(str(tmp_path / "src"), str(tmp_path / "x"), by="hash", cut="2024-01-15")
    assert not (tmp_path / "x").exists()
    assert main(["split", str(tmp_path / "src"), "--output", str(tmp_path / "h"), "--by", "hash"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == {
        "by",
        "val_fraction",
        "samples",  # added 2026-12-07: train + val, as dedup's report and vocab's result name it
        "train",
        "val",
        "skipped_incomplete_shards",
        "skipped_not_shards",
    }
    assert result["val_fraction"] == 0.1  # the default, as before
