"""dataset_tools build outputs, second review: resumes with other options, temporary files.

Runtime: ~15 s on 2 busy cores (two real builds against the loopback fake host, one process each).
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import plan as plan_mod
from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def _args(host, inp, out, shard_size):
    return build_args(host.url_template, inp, out, "--image-size", "32", shard_size=shard_size)


def _forget_recorded_shard_size(out):
    """Rewrite plan.parquet as a build from before the shard size was recorded saved it."""
    path = plan_mod.plan_path(str(out))
    table = pq.read_table(path)
    pq.write_table(table.replace_schema_metadata(None), path)
    assert plan_mod.SHARD_SIZE_KEY not in (pq.read_schema(path).metadata or {})


def test_resume_with_another_shard_size_keeps_the_planned_one(tmp_path, capsys):
    # A resume with another --shard-size (a requeue script, a changed default) planned the new
    # videos in shards of the new size, with keys one digit wider than the old ones, silently.
    ids = [f"vid{i:08d}" for i in range(10)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_args(host, inp, out, 4)) == 0
        ids += [f"new{i:08d}" for i in range(6)]
        write_ids_csv(inp, ids)
        capsys.readouterr()
        assert main(_args(host, inp, out, 20)) == 0
    assert "--shard-size 20 ignored: this output was planned with --shard-size 4" in capsys.readouterr().out
    plan = plan_mod.load_plan(str(out))
    sizes = {sid: len(rows) for sid, rows in plan_mod.by_shard(plan).items()}
    assert sizes == {0: 4, 1: 4, 2: 2, 3: 4, 4: 2}
    assert {len(r["sample_key"]) for r in plan} == {6}  # one key width for the whole build
    assert sorted(r["video_id"] for r in plan) == sorted(ids)
    with open(out / "_build" / "summary.json") as f:
        summary = json.load(f)
    assert summary["shard_size"] == 4 and summary["rows"] == summary["successes"] == len(ids)
    # A plan saved before the size was recorded: read from its shards (a full one holds 4).
    _forget_recorded_shard_size(out)
    assert plan_mod.planned_shard_size(str(out), plan, requested=20, oom_shard_count=5) == 4
    assert plan_mod.planned_shard_size(str(out), plan, requested=7, oom_shard_count=5) == 7  # can't tell


def _samples(n, tag):
    return [(f"{i:06d}", {"jpg": tag * 600, "txt": b"caption"}) for i in range(n)]


def test_two_writers_of_one_shard_do_not_share_a_temporary_file(tmp_path):
    # Every writer of a shard wrote through the one name `00000.tar.tmp`: a second writer of
    # the same shard (an orphaned pyspark/ray worker of a killed build beside its resume, two
    # splits into one folder) truncated the first one's file mid-write and renamed it into
    # place; the first one's rename then failed with FileNotFoundError.
    path = str(tmp_path / "00000.tar")

    def first_writer_samples():
        shards.write_tar(path, _samples(3, b"b"))  # the second writer, while the first writes
        yield from _samples(5, b"a")

    shards.write_tar(path, first_writer_samples())
    assert shards.tar_problem(path, expected_samples=5) is None
    assert {m["jpg"][:1] for m in shards.read_tar(path).values()} == {b"a"}
    parquet = str(tmp_path / "00000.parquet")
    schema = pa.schema([("key", pa.string()), ("status", pa.string())])
    shards.write_parquet(parquet, [{"key": "000000", "status": "success"}], schema)
    assert shards.read_parquet_rows(parquet)[0] == [{"key": "000000", "status": "success"}]
    assert sorted(os.listdir(tmp_path)) == ["00000.parquet", "00000.tar"]  # no temporary file left


def _write_foreign_shard(folder, ids):
    """One complete shard as img2dataset (or a split, or another build) leaves it, no plan."""
    os.makedirs(folder, exist_ok=True)
    keys = [f"{i:09d}" for i in range(len(ids))]
    shards.write_tar(os.path.join(folder, "00000.tar"), _samples(len(ids), b"x"))
    rows = [{"key": k, "status": "success", "video_id": v} for k, v in zip(keys, ids)]
    schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("video_id", pa.string())])
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, schema)
    shards.write_stats(str(folder), 0, shards.stats_from_rows(rows, 0.0, 1.0))


def test_build_into_a_folder_of_shards_without_a_plan_is_refused(tmp_path):
    # `_build` deleted, or --output a folder of other shards: the new plan numbered its shards
    # from 00000, took each shard already there as built from it and downloaded nothing, and
    # the summary said "3 / 3 rows succeeded" (exit 0) while no input video was in the output.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    _write_foreign_shard(out, ["old00000000", "old00000001", "old00000002"])
    before = sorted(os.listdir(out))
    write_ids_csv(inp, ["new00000000", "new00000001", "new00000002"])
    with FakeThumbnailHost(max_lifetime=60) as host:
        with pytest.raises(SystemExit, match=r"holds shards \(00000\.parquet, 3 files\) but no _build/plan"):
            main(_args(host, inp, out, 4))
        assert not host.requests
    assert sorted(n for n in os.listdir(out) if n != "_build") == before
