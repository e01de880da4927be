"""build, eleventh review: a --retry-failed merge killed at each of its steps is finished by the
next build from what is on disk, without one request to the host for that shard.

Runtime: ~40 s idle, ~110 s on 2 busy cores (one first build, then per case a --retry-failed build in a child
process that SIGKILLs itself at a marked point of the merge, and the next build in process).
"""

import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import retry, shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDS = ["okokokokok1", "okokokokok2", "gonegonego1", "flakyflaky1"]

# The child build: ``shards.<fn>`` (or ``retry.<fn>``) SIGKILLs the build before (or after) its
# first call on the output's shard 00000, where the merge of the retried rows runs (the downloads
# run in spawn workers, which import the real functions).
_KILLED_BUILD = """
import os, signal, sys
from dataset_tools import retry, shards
from dataset_tools.cli import main
module, fn, when, out = sys.argv[1:5]
target = {"shards": shards, "retry": retry}[module]
real = getattr(target, fn)
def marked(*args, **kwargs):
    ours = any(str(a) in (out, os.path.join(out, "00000.tar"), os.path.join(out, "00000.parquet"))
               for a in args)
    if ours and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = real(*args, **kwargs)
    if ours and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(target, fn, marked)
sys.exit(main(sys.argv[5:]))
"""

# (module, function, before/after): each step of retry.merge_retry, in order.
STEPS = {
    "record_saved": ("retry", "_save_attempt_record", "after"),
    "stats_removed": ("shards", "write_tar", "before"),
    "tar_written": ("shards", "write_parquet", "before"),
    "parquet_written": ("shards", "write_stats", "before"),
    "stats_written": ("shards", "write_stats", "after"),
}


@pytest.fixture(scope="module")
def host():
    with FakeThumbnailHost({"gonegonego1": "missing", "flakyflaky1": "missing"}, max_lifetime=300) as fake:
        yield fake


@pytest.fixture(scope="module")
def first_build(host, tmp_path_factory):
    """One shard of 4 rows, 2 failed; then the flaky video comes back for the retries."""
    folder = tmp_path_factory.mktemp("first")
    inp, out = folder / "in.csv", folder / "out"
    write_ids_csv(inp, IDS)
    assert main(build_args(host.url_template, inp, out, "--retries", "0")) == 0
    host.behaviours["flakyflaky1"] = "ok"
    return inp, out


def _copy(first_build, tmp_path):
    inp, out = first_build
    shutil.copytree(out, tmp_path / "out")
    return inp, tmp_path / "out"


def _requests(host):
    return sum(1 for r in host.requests if any(v in r["path"] for v in IDS))


def _killed_retry(host, inp, out, step):
    module, fn, when = STEPS[step]
    args = build_args(host.url_template, inp, out, "--retries", "0", "--retry-failed")
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_BUILD, module, fn, when, str(out), *args],
        cwd=ROOT,
        env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr


def _check_merged(out):
    """Shard 00000 as one uninterrupted --retry-failed leaves it."""
    rows = {r["video_id"]: r for r in pq.read_table(out / "00000.parquet").to_pylist()}
    assert {v: r["attempts"] for v, r in rows.items()} == {
        "okokokokok1": 1,
        "okokokokok2": 1,
        "gonegonego1": 2,
        "flakyflaky1": 2,
    }
    assert rows["flakyflaky1"]["status"] == shards.SUCCESS and rows["gonegonego1"]["status"] != shards.SUCCESS
    successes = {r["key"] for r in rows.values() if r["status"] == shards.SUCCESS}
    assert shards.tar_check(str(out / "00000.tar"), 3) == (None, successes)
    stats, problem = shards.read_stats(str(out), "00000")
    assert problem is None and stats["count"] == 4 and stats["successes"] == 3
    assert os.listdir(out / "_build" / "attempts") == []
    retried = out / "_build" / "retry"
    assert not retried.exists() or os.listdir(retried) == []
    summary = json.loads((out / "_build" / "summary.json").read_text())
    assert (summary["rows"], summary["successes"], summary["incomplete_shards"]) == (4, 3, 0)


@pytest.mark.slow
@pytest.mark.parametrize("step", list(STEPS))
def test_a_merge_killed_at_any_step_is_finished_without_a_download(host, first_build, tmp_path, capsys, step):
    """SIGKILL inside the merge of a --retry-failed, at each step: the same command run again (with
    --max-attempts 2, which leaves no row to retry once the merge is done) finishes the merge and
    asks the host for nothing. Before: a shard killed after its stats were removed was downloaded
    again in full, all 4 rows asked again, and the retried success was fetched once more."""
    inp, out = _copy(first_build, tmp_path)
    _killed_retry(host, inp, out, step)
    asked = _requests(host)
    args = build_args(host.url_template, inp, out, "--retries", "0", "--retry-failed", "--max-attempts", "2")
    assert main(args) == 0
    assert _requests(host) == asked  # not one request for the shard
    if step != "stats_written":  # (complete again then: its stats and parquet were merged)
        assert "shard 00000: finished the --retry-failed merge" in capsys.readouterr().out
    _check_merged(out)


@pytest.mark.slow
def test_a_merge_that_cannot_be_finished_is_downloaded_again(host, first_build, tmp_path, capsys):
    """Killed after the tar, and _build/retry/ lost: the shard is downloaded again from the plan
    (one line says why), its attempts count on from the saved record."""
    inp, out = _copy(first_build, tmp_path)
    rows, _ = shards.read_parquet_rows(str(out / "00000.parquet"))
    before = shards.read_stats(str(out), "00000")[0]
    retry._save_attempt_record(str(out), "00000", [{**r, "attempts": 2} for r in rows])
    os.remove(out / "00000_stats.json")
    asked = _requests(host)
    assert main(build_args(host.url_template, inp, out, "--retries", "0")) == 0
    assert "cannot be finished (its retried rows are not in _build/retry/)" in capsys.readouterr().out
    assert _requests(host) > asked
    rows = pq.read_table(out / "00000.parquet").to_pylist()
    assert [r["attempts"] for r in rows] == [3, 3, 3, 3]
    assert shards.read_stats(str(out), "00000")[0]["count"] == before["count"] == 4
    assert os.listdir(out / "_build" / "attempts") == []
