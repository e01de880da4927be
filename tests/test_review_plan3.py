"""dataset_tools build, plan review 3: a resume against a changed input and changed options.

Runtime: ~20 s on 2 busy cores (real builds against the loopback fake host, one process each).
"""

import json
import os

import pyarrow.parquet as pq
from small_builds import build_args, write_ids_csv

from dataset_tools import plan as plan_mod
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def _shard_rows(out):
    rows = []
    for name in sorted(os.listdir(out)):
        if name.endswith(".parquet"):
            rows += pq.read_table(out / name).to_pylist()
    return rows


def _summary(out):
    with open(out / "_build" / "summary.json") as f:
        return json.load(f)


def test_resume_with_another_variant_ladder_keeps_the_planned_one(tmp_path, capsys):
    # A resume with --variants hqdefault after mqdefault fetched the new shard's thumbnails from
    # hqdefault (4:3) beside the old mqdefault (16:9) ones, and from other URLs than the plan's.
    ids = [f"vid{i:08d}" for i in range(3)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(build_args(host.url_template, inp, out)) == 0
        write_ids_csv(inp, ids + [f"new{i:08d}" for i in range(3)])
        capsys.readouterr()
        args = build_args(host.url_template, inp, out, "--retry-failed")
        args[args.index("--variants") + 1] = "hqdefault,mqdefault"
        assert main(args) == 0
    printed = capsys.readouterr().out
    assert "--variants mqdefault (given hqdefault,mqdefault)" in printed
    rows = _shard_rows(out)
    assert len(rows) == 6 and {r["variant"] for r in rows} == {"mqdefault"}
    assert {r["url"].rsplit("/", 1)[1] for r in rows} == {"mqdefault.jpg"}
    assert _summary(out)["image_options"]["variants"] == ["mqdefault"]
    assert plan_mod.planned_image_options(str(out))["variants"] == ("mqdefault",)


def test_resume_after_input_edits_accounts_for_every_row(tmp_path, capsys):
    # Rows removed, added, reordered, a title changed, a second input file (overlapping, one bad
    # id): every input row is a video or a collapsed duplicate or rejected; every planned video
    # is in exactly one shard row, the removed one still built and counted as such.
    ids = [f"vid{i:08d}" for i in range(5)]
    inp, inp2, out = tmp_path / "in.csv", tmp_path / "in2.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    with FakeThumbnailHost(max_lifetime=120) as host:
        assert main(build_args(host.url_template, inp, out)) == 0
        kept = [v for v in ids if v != ids[1]][::-1]
        titles = {v: "NEW TITLE" if v == ids[2] else f"title {v}" for v in kept}
        inp.write_text("video_id,title\n" + "".join(f"{v},{t}\n" for v, t in titles.items()))
        inp2.write_text(f"video_id,title\n{ids[3]},title {ids[3]}\nadded000001,added\nbad id!,x\n")
        args = build_args(host.url_template, inp, out)
        args[args.index("--input") + 1 : args.index("--input") + 2] = [str(inp), str(inp2)]
        assert main(args) == 0
    s = _summary(out)
    assert (s["input_rows"], s["duplicates_collapsed"], s["invalid_ids"]) == (7, 1, 1)
    videos = s["input_rows"] - s["duplicates_collapsed"] - s["invalid_ids"]
    assert (s["planned_not_in_input"], s["captions_changed_since_plan"], s["new_in_plan"]) == (1, 1, 1)
    assert s["planned"] == videos + s["planned_not_in_input"] == 6
    rows = _shard_rows(out)
    assert sorted(r["key"] for r in rows) == sorted({r["key"] for r in rows})  # one row per key
    assert s["rows"] == len(rows) == s["planned"] and s["successes"] + s["failures"] == s["rows"]
    captions = {r["video_id"]: r["caption"] for r in plan_mod.load_plan(str(out))}
    assert captions[ids[2]] == f"title {ids[2]}"  # the plan's caption is kept
