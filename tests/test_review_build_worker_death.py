"""dataset_tools build when one download worker dies mid-shard (SIGKILL, as the OOM killer sends):
a real `python -m dataset_tools build` against the loopback fake host, one of its worker
processes killed, then the same command again.

Runtime: ~20 s on 2 busy cores.
"""

import os
import signal
import time

from small_builds import write_ids_csv
from test_review_build_resume import _args, _assert_every_row_once, _ids, _start

from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost

# Half the resume tests' request rate: a shard is still downloading when the worker is killed.
SLOW = ("--requests-per-second", "8")


def _download_workers(build_pid):
    """Pids of the build's spawned pool workers (not its multiprocessing resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == build_pid and b"spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


def _kill_one_worker_mid_shard(proc, host, log):
    deadline = time.monotonic() + 120
    workers = []
    while proc.poll() is None and time.monotonic() < deadline:
        workers = _download_workers(proc.pid)
        if len(workers) == 2 and len(host.requests) >= 4:
            break
        time.sleep(0.02)
    assert proc.poll() is None and len(workers) == 2, "no two workers to kill: " + log.read_text()
    assert len(host.requests) < 16, "a shard may be complete already: the kill would not be mid-shard"
    os.kill(workers[0], signal.SIGKILL)


def test_a_killed_download_worker_ends_the_build_with_a_resume_line(tmp_path):
    # img2dataset's Pool.imap_unordered never got the killed worker's shard back: the build
    # finished the other shard and then waited forever, with no message, until the job's limit.
    inp, out, log = tmp_path / "in.csv", tmp_path / "out", tmp_path / "build.log"
    write_ids_csv(inp, _ids())
    with FakeThumbnailHost(latency=0.1, max_lifetime=300) as host:
        proc = _start(host, inp, out, log, *SLOW)
        try:
            _kill_one_worker_mid_shard(proc, host, log)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()  # its workers die with it (PR_SET_PDEATHSIG)
                proc.wait()
        said = log.read_text()
        assert code == 2, said
        lines = [line for line in said.splitlines() if "download worker" in line]
        assert len(lines) == 1, said
        assert "SIGKILL" in lines[0] and "complete shards are kept" in lines[0]
        assert "run the same command again" in lines[0]
        assert "Traceback" not in said

        assert main(_args(host, inp, out, *SLOW)) == 0
    _assert_every_row_once(str(out), _ids())
