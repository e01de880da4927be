"""dataset_tools build, twelfth review: a resume with another ``--url-template`` (the thumbnail
host moved). The download asked the new template, but nothing said so, and every row that failed
on the new host was recorded with the old host's URL, as if the old host had still been asked.

Runtime: ~25 s on 2 busy cores (two real builds against two loopback fake hosts, one process each).
"""

import os

import pyarrow.parquet as pq
import pytest
from small_builds import build_args, write_ids_csv

from dataset_tools import plan as plan_mod
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost


def _urls(out, name):
    return {
        r["video_id"]: (r["status"], r["url"]) for r in pq.read_table(out / f"{name}.parquet").to_pylist()
    }


def _url(host, vid):
    return host.url_template.format(video_id=vid, variant="mqdefault")


@pytest.mark.slow
def test_resume_with_a_new_url_template_fetches_the_rest_from_it_and_says_so(tmp_path, capsys):
    ids = [f"vid{i:08d}" for i in range(8)]
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ids)
    # ids[1] fails on both hosts (retried on the new one), ids[5] fails on the new host only.
    old_host = FakeThumbnailHost({ids[1]: "missing"}, max_lifetime=120)
    new_host = FakeThumbnailHost({ids[1]: "missing", ids[5]: "missing"}, max_lifetime=120)
    with old_host, new_host:
        assert main(build_args(old_host.url_template, inp, out)) == 0
        # A build stopped while shard 00001 downloaded leaves none of its files complete.
        for suffix in (".tar", ".parquet", "_stats.json"):
            os.remove(out / f"00001{suffix}")
        asked_before = len(old_host.requests)
        capsys.readouterr()
        assert main(build_args(new_host.url_template, inp, out, "--retry-failed")) == 0
        printed = capsys.readouterr().out
        # The rows still to fetch (shard 00001) and the retried row go to the new host alone.
        assert len(old_host.requests) == asked_before
        assert sorted(r["video_id"] for r in new_host.requests) == [ids[1], *ids[4:]]
        change = [line for line in printed.splitlines() if "--url-template changed" in line]
        assert change == [
            f"[dataset_tools] --url-template changed since this output was planned: "
            f"{old_host.url_template} -> {new_host.url_template}; rows already downloaded keep their "
            "images and URLs, the rows still to download (and those --retry-failed retries) are "
            "fetched from the new one"
        ]
        # Rows already fetched keep the URL they came from; each row asked now names the new host,
        # the failed ones included (they named the old host's URL, from the plan).
        assert _urls(out, "00000") == {
            ids[0]: ("success", _url(old_host, ids[0])),
            ids[1]: ("failed_to_download", _url(new_host, ids[1])),
            ids[2]: ("success", _url(old_host, ids[2])),
            ids[3]: ("success", _url(old_host, ids[3])),
        }
        assert _urls(out, "00001") == {
            vid: ("failed_to_download" if vid == ids[5] else "success", _url(new_host, vid))
            for vid in ids[4:]
        }
        assert {r["url"] for r in plan_mod.load_plan(str(out))} == {_url(new_host, vid) for vid in ids}
        # The same command again: nothing changed, nothing said.
        capsys.readouterr()
        assert main(build_args(new_host.url_template, inp, out)) == 0
        assert "--url-template changed" not in capsys.readouterr().out


def test_a_plan_saved_before_the_template_was_recorded_is_read_from_its_urls(tmp_path):
    out = str(tmp_path / "out")
    old, new = "http://old.example/vi/{video_id}/{variant}.jpg", "http://new.example/{variant}/{video_id}.jpg"
    rows = [{"video_id": "vid00000000", "title": "t", "tags": []}]
    plan = plan_mod.extend_plan(
        [], rows, shard_size=4, oom_shard_count=5, caption_template="{title}", url_template=old,
        first_variant="mqdefault",
    )  # fmt: skip
    plan_mod.save_plan(out, plan, 4, None, old)
    assert plan_mod.planned_url_template(out, plan, old, "mqdefault") is None
    assert plan_mod.planned_url_template(out, plan, new, "mqdefault") == old
    plan_mod.save_plan(out, plan, 4)  # as a build from before the template was recorded
    assert plan_mod.planned_url_template(out, plan, old, "mqdefault") is None
    assert plan_mod.planned_url_template(out, plan, new, "mqdefault") == plan[0]["url"]
    moved = plan_mod.with_url_template(plan, new, "mqdefault")
    assert [r["url"] for r in moved] == ["http://new.example/mqdefault/vid00000000.jpg"]
