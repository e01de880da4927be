"""dataset_tools build and split, fourth review: a plan that does not read, a split killed after
staging its shards (while publishing them, or before ``sizes.json``).

Runtime: ~10 s on 2 busy cores (one real build against the loopback fake host; two splits killed
by SIGKILL in a child process, each finished by the rerun).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from small_builds import write_ids_csv
from test_faults_dataset_tools import _shard
from test_review_dataset_build3 import _args as _build_args

from dataset_tools import shards, split
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def test_a_plan_that_does_not_read_stops_the_build_in_one_line(tmp_path):
    # A plan.parquet cut short (a copy of the output that stopped midway, a disk error) was a
    # pyarrow ArrowInvalid traceback, after the build had already rewritten rejected_input.jsonl.
    ids = [f"vid{i:08d}" for i in range(6)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_build_args(host.url_template, inp, out)) == 0
        plan = out / "_build" / "plan.parquet"
        plan.write_bytes(plan.read_bytes()[:100])
        rejected = (out / "_build" / "rejected_input.jsonl").stat().st_mtime_ns
        before = len(host.requests)
        with pytest.raises(SystemExit) as exc:
            main(_build_args(host.url_template, inp, out))
        assert len(host.requests) == before
    message = str(exc.value)
    assert message.startswith(f"{plan}: the build plan does not read") and "\n" not in message
    assert "new --output" in message
    assert (out / "_build" / "rejected_input.jsonl").stat().st_mtime_ns == rejected
    assert sorted(shards.complete_shards(str(out))) == [0, 1]  # the shards are left as they were


_KILLED_SPLIT = """
import os, signal, sys
from dataset_tools import reshard, split

src, out, where = sys.argv[1:]
publish = reshard.ShardSink.publish
calls = []

def publish_then_die_before_the_second(sink):
    if calls:
        os.kill(os.getpid(), signal.SIGKILL)
    calls.append(sink)
    publish(sink)

if where == "between_publishes":
    reshard.ShardSink.publish = publish_then_die_before_the_second
else:
    split.finalize_mod.finalize = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
split.split(src, out, by="hash", val_fraction=0.5, shard_size=2)
"""


def _kill_a_split(src, out, where):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_KILLED_SPLIT), str(src), str(out), where],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr


def _keys(folder) -> set[str]:
    return {k for n in shards.iter_shard_names(str(folder)) for k in shards.read_tar(f"{folder}/{n}.tar")}


@pytest.mark.parametrize("where", ["before_finalize", "between_publishes"])
def test_a_split_killed_after_staging_is_finished_by_the_rerun(tmp_path, where):
    # Killed after publishing, before finalize, train and val had shards but no sizes.json (the
    # trainer and open_clip size the folder from it); killed between the two sides' publish, val
    # had no shards at all. The rerun refused the folder as "not empty" either way.
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    for shard_id in range(3):
        _shard(src, shard_id, 4)
    expected = split.split(str(src), str(tmp_path / "reference"), by="hash", val_fraction=0.5, shard_size=2)
    assert expected["train"] and expected["val"]
    _kill_a_split(src, out, where)
    result = split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=2)
    assert result == expected
    for side in ("train", "val"):
        assert _keys(out / side) == _keys(tmp_path / "reference" / side)
        with open(out / side / "sizes.json") as f:
            assert sum(json.load(f).values()) == expected[side]
        assert (out / side / "__len__").read_text() == f"{expected[side]}\n"
        assert sorted(os.listdir(out / side / "_build")) == ["lock"]  # nothing staged, no marker


def test_a_killed_split_rerun_with_other_settings_is_one_line(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    _shard(src, 0, 4)
    _kill_a_split(src, out, "before_finalize")
    with pytest.raises(SystemExit) as exc:
        split.split(str(src), str(out), by="hash", val_fraction=0.3, shard_size=2)
    message = str(exc.value)
    assert "stopped before it finished" in message and "--val-fraction 0.5" in message
    assert "\n" not in message
    assert not (out / "train" / "sizes.json").exists()  # nothing finished with the wrong settings
