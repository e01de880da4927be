"""dataset_tools build under interruption: real `python -m dataset_tools build` processes killed
(SIGKILL, SIGTERM) while they download from the loopback fake host, then the same command again.

Runtime: ~30 s per kill test on 2 busy cores (a spawned build process, then an in-process resume).
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROWS = 32


def _ids(n=ROWS):
    return [f"vid{i:08d}" for i in range(n)]


def _args(host, inp, out, *extra):
    extra = ("--max-connections", "4", "--image-size", "32", *extra)
    return build_args(host.url_template, inp, out, *extra, shard_size=16, processes=2, rate=16)


def _start(host, inp, out, log, *extra):
    # Output to a file, not a pipe: orphaned workers would hold a pipe open, and reading it
    # would wait for them to finish.
    # BUILD_TEST_OUT: every process of this build, its spawned workers too, carries it (_build_pids).
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", BUILD_TEST_OUT=str(out))
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "dataset_tools", *_args(host, inp, out, *extra)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )


def _kill_after_requests(proc, host, sig, log, requests=6):
    deadline = time.monotonic() + 120
    while len(host.requests) < requests and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the build ended before it could be killed: " + log.read_text()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    return proc.returncode


def _build_pids(out) -> list[int]:
    """The processes of the build started by _start on `out` still running (zombies have no environ)."""
    marker = f"BUILD_TEST_OUT={out}".encode() + b"\0"
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if marker in fh.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


def _shard_files(out):
    return {p: os.path.getmtime(p) for p in glob.glob(os.path.join(out, "0*"))}


def _plan_keys(out):
    path = os.path.join(out, "_build", "plan.parquet")
    if not os.path.exists(path):
        return {}
    return {r["video_id"]: r["sample_key"] for r in pq.read_table(path).to_pylist()}


def _assert_every_row_once(out, ids):
    """Each input id is in exactly one parquet row; successes are the tar samples; stats and
    summary agree with the files."""
    _assert_every_row_once_planned(out, ids)
    with open(os.path.join(out, "_build", "summary.json")) as f:
        summary = json.load(f)
    assert summary["rows"] == summary["input_rows"] == summary["planned"] == len(ids)
    assert summary["incomplete_shards"] == 0


def _assert_every_row_once_planned(out, ids):
    """Each planned id is in exactly one parquet row, and the tars and stats agree with them."""
    seen, keys = [], set()
    for name in shards.iter_shard_names(out):
        rows, _ = shards.read_parquet_rows(os.path.join(out, f"{name}.parquet"))
        seen += [r["video_id"] for r in rows]
        ok = {r["key"] for r in rows if r["status"] == shards.SUCCESS}
        assert set(shards.read_tar(os.path.join(out, f"{name}.tar"))) == ok
        with open(os.path.join(out, f"{name}_stats.json")) as f:
            stats = json.load(f)
        assert (stats["count"], stats["successes"]) == (len(rows), len(ok))
        assert not keys & {r["key"] for r in rows}
        keys |= {r["key"] for r in rows}
    assert sorted(seen) == sorted(ids)


@pytest.fixture
def host():
    with FakeThumbnailHost(latency=0.1, max_lifetime=300) as h:
        yield h


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_build_stops_its_workers_and_resumes_exactly(tmp_path, host, sig):
    # The spawned download workers outlived a killed build: they finished their shards against
    # the host (more connections than --max-connections once the resume started) and wrote the
    # same shard files as the resumed build. SIGTERM also printed a BrokenPipeError traceback
    # from every worker instead of saying how to resume.
    inp, out, log = tmp_path / "in.csv", tmp_path / "out", tmp_path / "build.log"
    write_ids_csv(inp, _ids())
    code = _kill_after_requests(_start(host, inp, out, log), host, sig, log)
    requests_at_kill, files_at_kill = len(host.requests), _shard_files(out)
    keys_at_kill = _plan_keys(out)
    # An orphan worker would go on downloading (0.1 s a request) and writing: 2 s to show it, ended
    # early once no process of the killed build is left (none can download or write any more).
    deadline = time.monotonic() + 2.0
    while _build_pids(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(host.requests) == requests_at_kill, "workers of the killed build kept downloading"
    assert _shard_files(out) == files_at_kill
    if sig == signal.SIGTERM:
        assert code == 128 + signal.SIGTERM
        assert "run the same command again" in log.read_text()
        assert "Traceback" not in log.read_text()
    assert keys_at_kill, "the plan is written before any download"

    done = shards.complete_shards(str(out))
    assert main(_args(host, inp, out)) == 0
    redone = len(host.requests) - requests_at_kill
    assert redone == ROWS - 16 * len(done)  # one request per row of each incomplete shard
    assert _plan_keys(out) == keys_at_kill
    _assert_every_row_once(str(out), _ids())
    before = len(host.requests)
    assert main(_args(host, inp, out)) == 0  # a finished build downloads nothing
    assert len(host.requests) == before


def test_resume_on_a_changed_input_says_what_it_keeps(tmp_path, capsys):
    # A resume on an input edited since the plan (rows removed, a title changed, rows added,
    # reordered) kept the old plan without a word: removed videos were still built, the old
    # title stayed the caption, and summary.json's input_rows no longer matched its rows.
    ids = _ids(10)
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as fast:
        args = _args(fast, inp, out, "--processes", "1", "--shard-size", "4", "--requests-per-second", "0")
        assert main(args) == 0
        keys = _plan_keys(out)
        capsys.readouterr()
        edited = [*reversed(ids[2:]), "newvideo001", "newvideo002"]
        inp.write_text(
            "video_id,title\n"
            + "".join(f"{vid},{'a new title' if vid == ids[5] else 'title ' + vid}\n" for vid in edited)
        )
        assert main(args) == 0
    said = capsys.readouterr().out
    assert "the input changed since the plan was made" in said
    assert "2 planned videos are not in the input any more" in said
    assert "1 have another title or caption now" in said and "2 are new" in said
    with open(out / "_build" / "summary.json") as f:
        summary = json.load(f)
    assert (summary["planned_not_in_input"], summary["captions_changed_since_plan"]) == (2, 1)
    assert summary["new_in_plan"] == 2 and summary["input_rows"] == 10
    assert summary["rows"] == summary["planned"] == 12 == summary["input_rows"] + 2
    assert {k: v for k, v in _plan_keys(out).items() if k in keys} == keys  # keys never move
    _assert_every_row_once_planned(str(out), [*ids, "newvideo001", "newvideo002"])


def test_a_second_build_on_a_running_output_is_refused(tmp_path, host):
    # Two builds on one output (a requeued job while the first instance still runs, the same
    # command in two terminals) both downloaded the same shards, doubling the load on the host,
    # and each deleted the other's temporary files.
    inp, out, log = tmp_path / "in.csv", tmp_path / "out", tmp_path / "build.log"
    write_ids_csv(inp, _ids(16))
    first = _start(host, inp, out, log)
    try:
        deadline = time.monotonic() + 120
        while not host.requests and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, log.read_text()
        with pytest.raises(
            SystemExit, match=f"another build is running on this output \\(pid {first.pid}\\)"
        ):
            main(_args(host, inp, out))
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
    assert main(_args(host, inp, out)) == 0  # the lock went with the stopped build
    _assert_every_row_once(str(out), _ids(16))
