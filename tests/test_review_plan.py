"""The build plan's save under a full disk, and a shard's stats under a kill: real files, a real
img2dataset download from the loopback fake host, faults made in a subprocess (a per-file size
limit for the full disk, ``os._exit`` for the kill).

Runtime: ~10 s on 2 busy cores.
"""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq

from dataset_tools import plan, shards
from dataset_tools.fake_host import FakeThumbnailHost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1")


def _plan_rows(n, title_len=8):
    rows = [{"video_id": f"vid{i:08d}", "title": os.urandom(title_len).hex()} for i in range(n)]
    return plan.extend_plan(
        [],
        rows,
        shard_size=4,
        oom_shard_count=5,
        caption_template="{title}",
        url_template="http://127.0.0.1:9/vi/{video_id}/{variant}.jpg",
        first_variant="mqdefault",
    )


_SAVE_ON_A_FULL_DISK = """
import json, resource, signal, sys
from dataset_tools import plan
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit is then an OSError (EFBIG)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
plan.save_plan(sys.argv[1], json.load(sys.stdin), 4)
"""


def test_a_plan_the_disk_cuts_short_is_one_line_and_leaves_the_earlier_plan_whole(tmp_path):
    # save_plan wrote plan.parquet.tmp with no error handling: a full disk was an OSError
    # traceback out of pyarrow, and the half-written plan.parquet.tmp stayed in _build/.
    out = str(tmp_path / "out")
    earlier = _plan_rows(8)
    plan.save_plan(out, earlier, 4)
    before = open(plan.plan_path(out), "rb").read()
    bigger = _plan_rows(2000, title_len=32)  # random titles: well over 20 KB of parquet
    proc = subprocess.run(
        [sys.executable, "-c", _SAVE_ON_A_FULL_DISK, out],
        input=json.dumps(bigger),
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "plan.parquet: could not write the build plan" in lines[0]
    assert "run the same build again" in lines[0]
    assert open(plan.plan_path(out), "rb").read() == before
    assert plan.load_plan(out) == earlier
    assert sorted(os.listdir(os.path.dirname(plan.plan_path(out)))) == ["plan.parquet"]


_DOWNLOAD_ONE_SHARD_KILLED_AT_ITS_STATS = """
import os, sys
from dataset_tools import build, plan, shards
out, url_template = sys.argv[1:3]

def killed(*args, **kwargs):
    os._exit(137)  # the build killed (SIGKILL, pre-emption) just as the shard's own stats are written

shards.write_stats = killed
cfg = build.BuildConfig(inputs=[], output=out, url_template=url_template, variants=("mqdefault",),
                        shard_size=4, threads=2)
rows = plan.load_plan(out)
columns = [f.name for f in plan.PLAN_SCHEMA if f.name != "shard_id"]
feather = os.path.join(out, "00000.feather")
plan.write_feather(feather, rows)
build._make_downloader(cfg, out, columns).download_shard((0, feather))
"""


def test_a_shard_killed_before_its_stats_are_ours_is_not_taken_as_complete(tmp_path):
    # img2dataset wrote its own _stats.json (its loop's counts, in place) once the tar and
    # parquet were renamed in, and ours replaced it only afterwards: a build killed in between
    # left a shard that looked complete with counts that were not the parquet's, and the resume
    # skipped it.
    out = str(tmp_path / "out")
    plan.save_plan(out, _plan_rows(4), 4)
    with FakeThumbnailHost(max_lifetime=120) as host:
        proc = subprocess.run(
            [sys.executable, "-c", _DOWNLOAD_ONE_SHARD_KILLED_AT_ITS_STATS, out, host.url_template],
            cwd=ROOT,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 137, proc.stderr
    assert os.path.exists(os.path.join(out, "00000.tar")), proc.stderr  # the kill came after the shard
    assert pq.read_table(os.path.join(out, "00000.parquet")).num_rows == 4
    assert not os.path.exists(os.path.join(out, "00000_stats.json"))
    assert shards.complete_shards(out) == {}
