"""dataset_tools build, fourteenth review: a host's cool-down names its host; summary.json names
the URL templates; the shard writer counts a row only once written and closes once; the dedup
report on disk is the one returned.

Runtime: ~25 s on 2 busy cores (two real builds against two loopback fake hosts, one process each).
"""

import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dedup_shards import write_png_shards
from small_builds import build_args, write_ids_csv
from test_review_dedup1 import _noise_png

from dataset_tools import dedup, img2dataset_hooks, shards
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost
from dataset_tools.politeness import SharedCoolDown, template_host


def test_a_cool_down_holds_back_its_own_host_only(tmp_path):
    path = tmp_path / "host_cooldown.json"
    SharedCoolDown(str(path), 60, host="old.example").extend(30)
    assert json.loads(path.read_text())["host"] == "old.example"
    assert SharedCoolDown(str(path), 60, host="new.example").remaining() == 0.0
    assert SharedCoolDown(str(path), 60, host="old.example").remaining() > 0
    # Written by a build before the host was recorded: it may be any host's, so it holds all back.
    path.write_text(json.dumps({"until": time.time() + 30}))
    assert SharedCoolDown(str(path), 60, host="new.example").remaining() > 0
    assert template_host("http://127.0.0.1:8080/vi/{video_id}/{variant}.jpg") == "127.0.0.1:8080"


def test_a_resume_on_a_moved_host_neither_waits_for_the_old_one_nor_forgets_its_template(tmp_path, capsys):
    # The old host asked for a 30 s pause; the resume fetches from the new host. It waited the
    # old host's pause out (and said so) before its first request to the new one, and summary.json
    # named no template, so nothing said that the output's rows came from two hosts.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ["busyhost001"])
    old_host = FakeThumbnailHost({"busyhost001": "throttle_for:30"}, max_lifetime=120)
    new_host = FakeThumbnailHost(max_lifetime=120)
    politeness = ("--retries", "0", "--backoff-max", "30")
    with old_host, new_host:
        templates = [old_host.url_template, new_host.url_template]
        main(build_args(old_host.url_template, inp, out, *politeness))
        cool_down = json.loads((out / "_build" / "host_cooldown.json").read_text())
        assert cool_down["host"] == template_host(templates[0])
        capsys.readouterr()
        assert main(build_args(templates[1], inp, out, "--retry-failed", *politeness)) == 0
    assert "asked us to slow down" not in capsys.readouterr().err
    assert [r["video_id"] for r in new_host.requests] == ["busyhost001"]
    assert pq.read_table(out / "00000.parquet").column("status").to_pylist() == ["success"]
    summary = json.loads((out / "_build" / "summary.json").read_text())
    assert summary["url_template"] == templates[1] and summary["url_templates"] == templates
    # Recorded before the download: a build killed midway still lists the template it fetched from.
    assert json.loads((out / "_build" / "url_templates.json").read_text()) == templates


def _writer_for(tmp_path, monkeypatch, keys):
    """A shard writer for shard 0 of ``keys`` (one input row each), as img2dataset makes one."""
    inputs = [{"video_id": f"vid{i:08d}", "caption": "c", "sample_key": k} for i, k in enumerate(keys)]
    context = img2dataset_hooks._ShardContext(
        inputs=inputs, video_ids=[r["video_id"] for r in inputs], sample_keys=list(keys)
    )
    monkeypatch.setattr(img2dataset_hooks, "_CTX", context)
    columns = ("video_id", "caption", "sample_key", "key", "status", "error_message")
    schema = pa.schema([(name, pa.string()) for name in columns])
    return img2dataset_hooks.SortedTarSampleWriter(0, str(tmp_path), True, 5, schema, "jpg"), inputs


def _meta(row, status, error=None):
    return {**row, "key": "ignored", "status": status, "error_message": error}


def _rows(tmp_path):
    return {r["key"]: r for r in pq.read_table(tmp_path / "00000.parquet").to_pylist()}


def test_a_second_close_leaves_the_shard_as_written(tmp_path, monkeypatch):
    writer, inputs = _writer_for(tmp_path, monkeypatch, ["000000", "000001"])
    writer.write(b"jpeg bytes", "000000", "c", _meta(inputs[0], "success"))
    writer.write(None, "000001", "c", _meta(inputs[1], "failed_to_download", "404"))
    writer.close()
    tar, parquet = (tmp_path / "00000.tar").read_bytes(), _rows(tmp_path)
    assert parquet["000000"]["status"] == "success" and list(shards.read_tar(str(tmp_path / "00000.tar")))
    writer.close()  # rewrote every row as lost, over an empty tar
    assert (tmp_path / "00000.tar").read_bytes() == tar and _rows(tmp_path) == parquet


def test_a_row_whose_members_fail_to_build_is_a_failure_not_a_success(tmp_path, monkeypatch):
    # A caption that cannot be written as UTF-8 (a lone surrogate) failed in write() after the row
    # was recorded: the parquet and stats said success, and the tar had no such sample.
    writer, inputs = _writer_for(tmp_path, monkeypatch, ["000000", "000001"])
    writer.write(b"jpeg bytes", "000000", "c", _meta(inputs[0], "success"))
    try:
        writer.write(b"jpeg bytes", "000001", "cut emoji \ud83d", _meta(inputs[1], "success"))
    except UnicodeEncodeError:
        pass  # img2dataset's loop prints it and goes on with the next row
    writer.close()
    rows = _rows(tmp_path)
    assert rows["000001"]["status"] == "failed_to_download"
    assert rows["000001"]["error_message"] == img2dataset_hooks.ERR_LOST
    assert sorted(shards.read_tar(str(tmp_path / "00000.tar"))) == ["000000"]
    assert [r["key"] for r in rows.values() if r["status"] == "success"] == ["000000"]


def test_the_dedup_report_on_disk_is_the_finished_report(tmp_path):
    # It was written before the filter, without kept: the same file as a run killed mid-filter,
    # and another report than the one the command returned and printed.
    rng = np.random.default_rng(0)
    images = [_noise_png(rng) for _ in range(3)]
    images.append(images[0])
    folder = write_png_shards(tmp_path / "src", images, per_shard=2)
    report = dedup.dedup(folder, filter_output=str(tmp_path / "out"))
    on_disk = json.loads((tmp_path / "src" / "_build" / "dedup.json").read_text())
    assert on_disk == report and on_disk["kept"] == 3
    assert on_disk["filter_output"] == str((tmp_path / "out").resolve())
