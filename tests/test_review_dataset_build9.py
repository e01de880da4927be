"""build, ninth review: a --retry-failed merge stopped midway, and a build stopped by SIGTERM.

Runtime: ~30 s on 2 busy cores (real builds through img2dataset against the loopback fake host,
one process each; one build in a subprocess with a spawn pool of 2).
"""

import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import retry, shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ["okokokokok1", "okokokokok2", "gonegonego1", "flakyflaky1"]


def _build(host, inp, out, *extra):
    return main(build_args(host.url_template, inp, out, "--retries", "0", *extra))


def _rows_by_id(out):
    return {r["video_id"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}


def _asked(host, video_id):
    return sum(1 for r in host.requests if video_id in r["path"])


def _stop_at_first(monkeypatch, name):
    """Ctrl-C (a KeyboardInterrupt) at the first call of ``shards.<name>`` in this process: the
    merge of a retry runs here, the downloads run in the spawn workers."""
    real = getattr(shards, name)
    calls = []

    def stop(*args, **kwargs):
        if not calls:
            calls.append(args)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(shards, name, stop)
    return calls


@pytest.mark.slow
@pytest.mark.parametrize("stopped_at", ["write_parquet", "write_stats"])
def test_a_merge_stopped_midway_keeps_counting_attempts(tmp_path, monkeypatch, stopped_at):
    """A --retry-failed stopped while it merges into a shard (after the tar, before the parquet
    or the stats): the next build finishes the merge from the files on disk (until 2026-12-07 it
    downloaded the shard again), and each row's attempts count on from the merge instead of
    starting again at 1, so --max-attempts holds. Before: every row read 1 attempt and the failed
    row was retried past the cap on every stopped merge."""
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, IDS)
    with FakeThumbnailHost({"gonegonego1": "missing", "flakyflaky1": "missing"}, max_lifetime=180) as host:
        assert _build(host, inp, out) == 0
        host.behaviours["flakyflaky1"] = "ok"
        calls = _stop_at_first(monkeypatch, stopped_at)
        assert _build(host, inp, out, "--retry-failed") == 130  # stopped inside the merge
        assert calls, f"the merge never called shards.{stopped_at}"
        monkeypatch.undo()
        assert _build(host, inp, out, "--retry-failed", "--max-attempts", "3") == 0
        rows = _rows_by_id(out)
        # The next build finishes the stopped merge from the files on disk (retry.finish_stopped_merges),
        # no download of the shard: the ok rows stay at 1, flakyflaky1 (merged as a success) at 2, and
        # gonegonego1 is retried once more to 3. Until 2026-12-07 the shard was downloaded again: 2 2 3 3.
        assert {v: r.get("attempts") for v, r in rows.items()} == {
            "okokokokok1": 1,
            "okokokokok2": 1,
            "gonegonego1": 3,
            "flakyflaky1": 2,
        }
        asked_gone = _asked(host, "gonegonego1")
        assert _build(host, inp, out, "--retry-failed", "--max-attempts", "3") == 0
        assert _asked(host, "gonegonego1") == asked_gone  # three attempts: not asked for a fourth
    assert rows["flakyflaky1"]["status"] == shards.SUCCESS and rows["gonegonego1"]["status"] != shards.SUCCESS
    stats, problem = shards.read_stats(str(out), "00000")
    assert problem is None and stats["count"] == 4 and stats["successes"] == 3
    assert sorted(shards.read_tar(str(out / "00000.tar"))) == sorted(
        r["key"] for r in rows.values() if r["status"] == shards.SUCCESS
    )
    assert os.listdir(out / "_build" / "attempts") == []


def _shard(folder, failed):
    """A real shard 00000 of three rows, ``failed`` of them failed, as a first build writes it
    (no attempts column)."""
    rows = [
        {"key": f"0000{i}", "status": "failed_to_download" if i < failed else shards.SUCCESS}
        for i in range(3)
    ]
    schema = pa.schema([("key", pa.string()), ("status", pa.string())])
    ok = [(r["key"], {"jpg": b"image", "txt": b"caption"}) for r in rows if r["status"] == shards.SUCCESS]
    os.makedirs(folder, exist_ok=True)
    shards.write_tar(os.path.join(folder, "00000.tar"), ok)
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, schema)
    shards.write_stats(folder, 0, shards.stats_from_rows(rows, 0.0, 1.0))


def test_a_merge_stopped_before_it_touched_the_shard_counts_nothing(tmp_path, monkeypatch):
    """Stopped after the merge saved the attempts, before it removed the old stats: the shard is
    complete as it was, so its attempts stay (nothing was downloaded again) and the saved record
    goes."""
    out, retry_dir = str(tmp_path / "out"), str(tmp_path / "retry")
    _shard(out, failed=1)
    _shard(retry_dir, failed=0)
    before = open(os.path.join(out, "00000.parquet"), "rb").read()
    real_remove = os.remove

    def stopped(path):
        if path.endswith("_stats.json"):
            raise KeyboardInterrupt
        real_remove(path)

    monkeypatch.setattr(os, "remove", stopped)
    with pytest.raises(KeyboardInterrupt):
        retry.merge_retry(out, retry_dir, "00000")
    monkeypatch.undo()
    assert shards.complete_shards(out) == {0: "00000"}
    assert retry.apply_attempt_records(out, {0: "00000"}) == []
    assert open(os.path.join(out, "00000.parquet"), "rb").read() == before
    assert os.listdir(os.path.join(out, "_build", "attempts")) == []


@pytest.mark.slow
def test_a_build_stopped_by_sigterm_leaks_no_semaphores(tmp_path):
    """SIGTERM (kill, timeout, a scheduler) while both spawn workers download: the build's one
    line, exit 143, and no "resource_tracker: There appear to be 4 leaked semaphore objects"
    warning after it (each worker's thread pool made two named semaphores that only its own
    exit unlinked, and the build ends its workers with SIGTERM)."""
    ids = [f"vid{i:08d}" for i in range(4)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(dict.fromkeys(ids, "slow"), slow_seconds=20, max_lifetime=180) as host:
        args = build_args(host.url_template, inp, out, "--deadline", "30", shard_size=2, processes=2)
        proc = subprocess.Popen(
            [sys.executable, "-m", "dataset_tools", *args],
            cwd=ROOT,
            env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120
            while len(host.requests) < 2:  # both workers are inside a download
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "the build never reached the host"
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 143, err
    assert "build stopped by SIGTERM" in err
    assert "leaked" not in err and "resource_tracker" not in err, err
