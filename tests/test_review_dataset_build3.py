"""dataset_tools build, third review: what a killed build leaves in ``_build/``, odd ``--output``.

Runtime: ~6 s on 2 busy cores (one real build against the loopback fake host, one process).
"""

import json
import os

import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def _args(url_template, inp, out):
    return build_args(url_template, inp, out, "--image-size", "32")


def test_a_build_removes_the_temporary_files_a_killed_build_left_in_build_dir(tmp_path):
    # A build killed between writing summary.json's (or rejected_input.jsonl's, plan.parquet's)
    # temporary file and renaming it left that file in _build/ for good: only the output's own
    # top-level *.tmp were cleaned at the next start.
    ids = [f"vid{i:08d}" for i in range(3)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    build_dir = out / "_build"
    build_dir.mkdir(parents=True)
    stale = [
        "summary.json.4242-0123456789ab.tmp",
        "rejected_input.jsonl.7-abcdef012345.tmp",
        "plan.parquet.tmp",
    ]
    for name in stale:
        (build_dir / name).write_text("{half a fi")
    # Not the build's: a dedup may be writing its report there now (the build lock does not cover it).
    (build_dir / "dedup.json.99-abcdefabcdef.tmp").write_text("{")
    (build_dir / "notes.tmp").write_text("mine")
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(_args(host.url_template, inp, f"{out}/")) == 0
    left = sorted(os.listdir(build_dir))
    assert not set(stale) & set(left), left
    assert "dedup.json.99-abcdefabcdef.tmp" in left and "notes.tmp" in left
    with open(build_dir / "summary.json") as f:
        summary = json.load(f)
    assert summary["successes"] == summary["planned"] == len(ids)


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_that_is_a_file_is_one_line(tmp_path, inside):
    # `--output in.csv` (or a path under a file) was a NotADirectoryError traceback out of the lock.
    inp = tmp_path / "in.csv"
    write_ids_csv(inp, ["vid00000000"])
    out = inp / "shards" if inside else inp
    with pytest.raises(SystemExit) as exc:
        main(_args("http://127.0.0.1:9/vi/{video_id}/{variant}.jpg", inp, out))
    message = str(exc.value)
    assert message.startswith(f"--output {out}: cannot create the output folder") and "\n" not in message
    assert inp.read_text().startswith("video_id,title\n")  # the input is untouched
