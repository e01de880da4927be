"""build --retry-failed, eighth review: a cap on attempts per row, and a damaged shard that
stopped the merge of every retried shard after it.

Runtime: ~15 s on 2 busy cores (real builds through img2dataset against the loopback fake host,
one process each).
"""

import json
import tarfile

import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

GONE = ["gonegonego1", "gonegonego2"]


def _build(host, inp, out, *extra, shard_size=4):
    return main(build_args(host.url_template, inp, out, "--retries", "0", *extra, shard_size=shard_size))


def _rows_by_id(out, name="00000"):
    return {r["video_id"]: r for r in pq.read_table(out / f"{name}.parquet").to_pylist()}


def _summary(out):
    return json.loads((out / "_build" / "summary.json").read_text())


def _asked(host, video_id):
    return sum(1 for r in host.requests if video_id in r["path"])


def test_max_attempts_stops_retrying_rows_downloaded_that_often(tmp_path, capsys):
    """Rows downloaded --max-attempts times are not asked for again (their failure and count
    stay), counted in the summary as retries_exhausted beside the failures, and said; rows
    downloaded fewer times are retried under the same cap."""
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ["okokokokok1", *GONE, "okokokokok2"])
    with FakeThumbnailHost(dict.fromkeys(GONE, "missing"), max_lifetime=120) as host:
        assert _build(host, inp, out) == 0
        host.behaviours["gonegonego1"] = "ok"  # would succeed now: a retry would show
        asked = _asked(host, "gonegonego1")
        capsys.readouterr()
        assert _build(host, inp, out, "--retry-failed", "--max-attempts", "1") == 0
        assert _asked(host, "gonegonego1") == asked
        summary = _summary(out)
        assert summary["retried_rows"] == 0 and summary["retries_exhausted"] == 2
        assert summary["failures"] == 2 and summary["rows"] == 4
        assert "2 failed rows not retried" in capsys.readouterr().out
        assert {v: r.get("attempts") or 1 for v, r in _rows_by_id(out).items()} == dict.fromkeys(
            ["okokokokok1", *GONE, "okokokokok2"], 1
        )
        assert _build(host, inp, out, "--retry-failed", "--max-attempts", "2") == 0
    rows = _rows_by_id(out)
    assert rows["gonegonego1"]["status"] == shards.SUCCESS
    assert rows["gonegonego1"]["attempts"] == rows["gonegonego2"]["attempts"] == 2
    assert _summary(out)["retried_rows"] == 2 and _summary(out)["retries_exhausted"] == 0


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--retry-failed", "--max-attempts", "0"], "--max-attempts 0: must be at least 1"),
        (["--max-attempts", "3"], "--max-attempts 3 only limits build --retry-failed"),
    ],
)
def test_bad_max_attempts_is_one_line_before_anything_is_written(tmp_path, extra, expected):
    """--max-attempts below 1, or without --retry-failed (where it would be ignored), is refused
    with one line before the output folder is made."""
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ["okokokokok1"])
    with FakeThumbnailHost({}, max_lifetime=60) as host, pytest.raises(SystemExit) as refused:
        _build(host, inp, out, *extra)
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)
    assert not out.exists()


def _cut_last_sample(tar_path):
    """Cut the tar at the member boundary before its last sample (a copy cut short)."""
    with tarfile.open(tar_path) as tar:
        members = tar.getmembers()
    last_key = members[-1].name.split(".")[0]
    cut = min(m.offset for m in members if m.name.startswith(last_key + "."))
    with open(tar_path, "r+b") as f:
        f.truncate(cut)


def test_damaged_shard_does_not_stop_the_merge_of_the_others(tmp_path, capsys):
    """A retried shard whose tar is damaged is not merged, but the retried shards after it are,
    the summary is written with that shard as an incomplete retry and its reason, and the build
    exits 2 with one stderr line naming the shard's tar and what to do (the refusal stopped the
    whole build: no later merge, no summary)."""
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ["okokokokok1", "gonegonego1", "okokokokok2", "gonegonego2"])
    with FakeThumbnailHost(dict.fromkeys(GONE, "missing"), max_lifetime=120) as host:
        assert _build(host, inp, out, shard_size=2) == 0
        _cut_last_sample(out / "00000.tar")
        damaged = (out / "00000.parquet").read_bytes()
        for vid in GONE:
            host.behaviours[vid] = "ok"
        capsys.readouterr()
        assert _build(host, inp, out, "--retry-failed", shard_size=2) == 2
    assert _rows_by_id(out, "00001")["gonegonego2"]["status"] == shards.SUCCESS
    assert (out / "00000.parquet").read_bytes() == damaged
    summary = _summary(out)
    assert summary["incomplete_retries"] == 1 and summary["successes"] == 3
    assert list(summary["incomplete_retry_reasons"]) == ["00000"]
    lines = [line for line in capsys.readouterr().err.splitlines() if "00000.tar" in line]
    assert len(lines) == 1 and "retry of shard 00000 not merged" in lines[0] and "--retry-failed" in lines[0]
