"""img2dataset hooks review: the sample writer and the fetch patch, run through img2dataset's own
download loop in this process (YouTubeDownloader.download_shard) against the loopback fake host.

Runtime: ~10 s on 2 busy cores (no worker processes; three small shards).
"""

import json
import os

import pyarrow.parquet as pq
import pytest
from img2dataset import downloader as i2d_downloader

from dataset_tools import img2dataset_hooks as hooks
from dataset_tools import plan as plan_mod
from dataset_tools import shards
from dataset_tools.build import BuildConfig, _make_downloader
from dataset_tools.fake_host import FakeThumbnailHost
from dataset_tools.politeness import PolitenessConfig

SHARD_SIZE = 12  # keys of 2 index digits: "000010" after "000009" as text and as a number


@pytest.fixture(autouse=True)
def _restore_img2dataset(monkeypatch):
    """The hooks patch img2dataset's module globals for good (right in a worker process); put the
    originals back after each test so that no other test in this process sees our fetch."""
    monkeypatch.setattr(i2d_downloader, "download_image_with_retry", i2d_downloader.download_image_with_retry)
    monkeypatch.setattr(i2d_downloader, "write_stats", i2d_downloader.write_stats)


def _planned_rows(ids, titles):
    return [
        {
            "video_id": vid,
            "title": title,
            "tags": ["tag é", "タグ"],
            "category_id": 10,
            "category_name": "Music",
            "channel_id": None,
            "channel_title": None,
            "publish_time": None,
            "trending_date": None,
            "caption": title,
            "url": None,  # set by _downloader's template below
            "sample_key": plan_mod.sample_key(0, i, SHARD_SIZE, 5),
            "shard_id": 0,
        }
        for i, (vid, title) in enumerate(zip(ids, titles))
    ]


def _download_shard(tmp_path, host, rows, resizer_wrapper=None):
    """Run img2dataset's loop on one planned shard with our Downloader and writer, in-process."""
    out = tmp_path / "out"
    os.makedirs(out, exist_ok=True)
    cfg = BuildConfig(
        inputs=[],
        output=str(out),
        url_template=host.url_template,
        variants=("mqdefault",),
        image_size=32,
        shard_size=SHARD_SIZE,
        threads=3,
        distributor="pyspark",  # no parent pid: this process is the worker
        politeness=PolitenessConfig(requests_per_second=0),
    )
    downloader = _make_downloader(
        cfg, str(out), [f.name for f in plan_mod.PLAN_SCHEMA if f.name != "shard_id"]
    )
    if resizer_wrapper is not None:
        downloader.resizer = resizer_wrapper(downloader.resizer)
    rows = [dict(r, url=host.url_template.format(video_id=r["video_id"], variant="mqdefault")) for r in rows]
    feather = str(tmp_path / "00000.feather")
    plan_mod.write_feather(feather, rows)
    assert downloader((0, feather)) == (True, (0, feather))
    assert not os.path.exists(feather)  # img2dataset removes a shard's input once it is done
    return str(out)


def _read_shard(out):
    parquet = pq.read_table(os.path.join(out, "00000.parquet"))
    with open(os.path.join(out, "00000_stats.json")) as f:
        stats = json.load(f)
    return parquet, shards.read_tar(os.path.join(out, "00000.tar")), stats


def _assert_shard_agrees(out, planned_keys):
    """Every planned row once in the parquet, sorted; tar samples = successes; stats = parquet."""
    parquet, samples, stats = _read_shard(out)
    rows = parquet.to_pylist()
    keys = [r["key"] for r in rows]
    assert keys == sorted(planned_keys) == sorted(planned_keys, key=int)
    successes = {r["key"] for r in rows if r["status"] == "success"}
    assert set(samples) == successes
    assert list(samples) == sorted(samples)  # tar members in key order
    assert shards.tar_problem(os.path.join(out, "00000.tar"), expected_samples=len(successes)) is None
    assert stats["count"] == len(rows) and stats["successes"] == len(successes)
    assert stats["failed_to_download"] + stats["failed_to_resize"] + stats["successes"] == len(rows)
    assert sum(stats["status_dict"].values()) == len(rows)
    assert "sample_key" not in parquet.column_names
    assert {"variant", "thumbnail_trail", "fetch_attempts"} <= set(parquet.column_names)
    names = {n for n in os.listdir(out) if n != plan_mod.BUILD_DIR}
    assert names == {"00000.parquet", "00000.tar", "00000_stats.json"}  # no temporary file left
    return rows, samples


def test_mixed_shard_is_sorted_and_its_counts_agree(tmp_path):
    ids = [f"vid{i:08d}" for i in range(SHARD_SIZE)]
    long_title = "Ünïcödé 日本語 🎵 " * 400  # ~6 KB of non-ASCII text
    titles = [f"{long_title}{i}" for i in range(SHARD_SIZE)]
    rows = _planned_rows(ids, titles)[::-1]  # input order is not key order
    missing = {ids[3]: "missing", ids[10]: "missing"}
    with FakeThumbnailHost(missing, max_lifetime=120) as host:
        out = _download_shard(tmp_path, host, rows)
    parquet_rows, samples = _assert_shard_agrees(out, [r["sample_key"] for r in rows])
    assert {r["video_id"] for r in parquet_rows if r["status"] != "success"} == {ids[3], ids[10]}
    for row in parquet_rows:
        if row["status"] == "success":
            assert (row["variant"], row["fetch_attempts"]) == ("mqdefault", 1)
            member_meta = json.loads(samples[row["key"]]["json"].decode("utf-8"))
            assert member_meta["key"] == row["key"] and member_meta["title"] == row["title"]
            assert member_meta["tags"] == ["tag é", "タグ"]
            assert samples[row["key"]]["txt"].decode("utf-8") == row["caption"]
        else:
            assert row["error_message"] and row["thumbnail_trail"]


def test_shard_whose_every_row_fails_is_an_empty_tar_and_a_full_parquet(tmp_path):
    ids = [f"bad{i:08d}" for i in range(5)]
    rows = _planned_rows(ids, [f"t{i}" for i in range(5)])
    with FakeThumbnailHost({v: "missing" for v in ids}, max_lifetime=120) as host:
        out = _download_shard(tmp_path, host, rows)
    parquet_rows, samples = _assert_shard_agrees(out, [r["sample_key"] for r in rows])
    assert samples == {} and {r["status"] for r in parquet_rows} == {"failed_to_download"}
    _, _, stats = _read_shard(out)
    assert stats["failed_to_download"] == 5


class _RaisingResizer:
    """The real resizer, except that it raises on its second image (an exception
    img2dataset's loop prints and continues on, dropping the row)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, 0

    def __call__(self, img_stream, bbox_list=None):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("resizer crashed")
        return self.inner(img_stream, bbox_list)


def test_row_dropped_by_the_download_loop_is_counted_as_a_failure(tmp_path, capsys):
    ids = [f"vid{i:08d}" for i in range(6)]
    rows = _planned_rows(ids, [f"t{i}" for i in range(6)])
    with FakeThumbnailHost(max_lifetime=120) as host:
        out = _download_shard(tmp_path, host, rows, _RaisingResizer)
    assert "resizer crashed" in capsys.readouterr().out  # img2dataset printed it and went on
    parquet_rows, samples = _assert_shard_agrees(out, [r["sample_key"] for r in rows])
    lost = [r for r in parquet_rows if r["error_message"] == hooks.ERR_LOST]
    assert len(lost) == 1 and lost[0]["status"] == "failed_to_download" and lost[0]["video_id"] in ids
    assert len(samples) == 5
    _, _, stats = _read_shard(out)
    assert stats["status_dict"][hooks.ERR_LOST] == 1


def test_fetch_patch_and_limiter_are_installed_once_per_process(tmp_path):
    ids = [f"vid{i:08d}" for i in range(3)]
    with FakeThumbnailHost(max_lifetime=120) as host:
        _download_shard(tmp_path / "a", host, _planned_rows(ids, ids))
        limiter = hooks._FETCH["limiter"]
        assert i2d_downloader.download_image_with_retry is hooks._ladder_download
        assert i2d_downloader.write_stats is hooks._write_our_stats
        _download_shard(tmp_path / "a", host, _planned_rows(ids, ids))  # same output, same config
        assert hooks._FETCH["limiter"] is limiter  # one host limiter for the worker's shards
