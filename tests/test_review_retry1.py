"""--retry-failed, first review: how often each row was attempted, and merges of odd shards.

Runtime: ~15 s on 2 busy cores (real builds through img2dataset against the loopback fake host,
one process each; the merge tests work on real shard files).
"""

import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import retry, shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost
from dataset_tools.inspect_shards import inspect_dir

IDS = ["okokokokok1", "okokokokok2", "gonegonego1", "flakyflaky1"]


def _build(host, inp, out, *extra):
    return main(build_args(host.url_template, inp, out, "--retries", "0", *extra))


def _rows_by_id(out):
    return {r["video_id"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}


def test_attempts_count_every_try_of_a_row(tmp_path):
    """A retried row counts its attempts in the shard parquet (a first build's parquet, without
    the column, reads as 1): a row that fails again and one that succeeds on retry both read 2,
    rows never retried 1; the shard still verifies (tar and parquet agree)."""
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, IDS)
    behaviours = {"gonegonego1": "missing", "flakyflaky1": "missing"}
    with FakeThumbnailHost(behaviours, max_lifetime=120) as host:
        assert _build(host, inp, out) == 0
        assert _rows_by_id(out)["gonegonego1"]["status"] != shards.SUCCESS
        host.behaviours["flakyflaky1"] = "ok"
        assert _build(host, inp, out, "--retry-failed") == 0
    rows = _rows_by_id(out)
    assert {v: r["attempts"] for v, r in rows.items()} == {
        "okokokokok1": 1,
        "okokokokok2": 1,
        "gonegonego1": 2,
        "flakyflaky1": 2,
    }
    assert rows["flakyflaky1"]["status"] == shards.SUCCESS and rows["gonegonego1"]["status"] != shards.SUCCESS
    assert pq.read_table(out / "00000.parquet").to_pandas()["attempts"].tolist() == [1, 1, 2, 2]
    report = inspect_dir(str(out), verify=True)
    assert report["corrupt"] == [] and report["successes"] == 3


SCHEMA = pa.schema([("key", pa.string()), ("status", pa.string()), ("error_message", pa.string())])


def _sample(key):
    return key, {"jpg": f"image {key}".encode(), "txt": b"caption", "json": b"{}"}


def _write_shard(folder, rows, schema=SCHEMA):
    """A real shard 00000 in ``folder``: tar of the success rows, parquet, stats last."""
    os.makedirs(folder, exist_ok=True)
    ok = [r["key"] for r in rows if r["status"] == shards.SUCCESS]
    shards.write_tar(os.path.join(folder, "00000.tar"), [_sample(k) for k in ok])
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, schema)
    shards.write_stats(folder, 0, shards.stats_from_rows(rows, 0.0, 1.0))


def _row(key, status=shards.SUCCESS, **extra):
    return {
        "key": key,
        "status": status,
        "error_message": None if status == shards.SUCCESS else "gone",
        **extra,
    }


def test_merge_counts_on_from_the_recorded_attempts_when_every_row_fails_again(tmp_path):
    """A shard whose rows already count attempts: a retry where every row fails again adds one
    to each retried row, takes the new error, keeps the other rows' counts, and the tar still
    holds exactly the parquet's successes."""
    out, retry_dir = str(tmp_path / "out"), str(tmp_path / "retry")
    with_attempts = SCHEMA.append(pa.field("attempts", pa.int64()))
    _write_shard(
        out,
        [
            _row("00000", attempts=1),
            _row("00001", "failed_to_download", attempts=4),
            _row("00002", "failed_to_download"),
        ],
        with_attempts,
    )
    again = [{**_row(k, "failed_to_download"), "error_message": "still gone"} for k in ("00001", "00002")]
    _write_shard(retry_dir, again)
    stats = retry.merge_retry(out, retry_dir, "00000")
    rows = {r["key"]: r for r in pq.read_table(os.path.join(out, "00000.parquet")).to_pylist()}
    assert {k: r["attempts"] for k, r in rows.items()} == {"00000": 1, "00001": 5, "00002": 2}
    assert rows["00001"]["error_message"] == "still gone"
    assert stats["successes"] == 1 and stats["count"] == 3
    assert set(shards.read_tar(os.path.join(out, "00000.tar"))) == {"00000"}


def _cut_last_sample(tar_path):
    """Cut the tar at the member boundary before its last sample, as a copy cut short does:
    Python's tarfile reads the rest without a word."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".")[0]
    cut = min(m.offset for m in members if m.name.startswith(last_key + "."))
    with open(tar_path, "r+b") as f:
        f.truncate(cut)
    return last_key


def test_merge_into_a_damaged_tar_is_refused_and_leaves_the_shard(tmp_path):
    """A shard whose tar lost samples its parquet calls successes (a copy cut short) is not merged:
    one line naming the tar and what to do, and the shard's tar, parquet and stats stay as they
    were (the merge rewrote the tar without those samples while the parquet kept them as
    successes, and wrote stats that agreed with the parquet)."""
    out, retry_dir = str(tmp_path / "out"), str(tmp_path / "retry")
    _write_shard(out, [_row("00000"), _row("00001"), _row("00002", "failed_to_download")])
    _write_shard(retry_dir, [_row("00002")])
    lost = _cut_last_sample(os.path.join(out, "00000.tar"))
    before = {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))}
    with pytest.raises(SystemExit) as refused:
        retry.merge_retry(out, retry_dir, "00000")
    message = str(refused.value)
    assert "\n" not in message and "00000.tar" in message and "00000_stats.json" in message
    assert {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out))} == before
    assert lost == "00001"
