"""dataset_tools build, fifteenth review: the cool-down file keeps every host's pause; a row the
download loop loses keeps what its fetch did; a rung img2dataset's resizer cannot decode falls to
the next variant.

Runtime: ~20 s on 2 busy cores (one real build against a loopback host, one process).
"""

import io
import json
import time

import pyarrow as pa
import pyarrow.parquet as pq
from loopback_images import JpegHandler, fetch_row, serving
from PIL import Image
from small_builds import build_args, write_ids_csv
from test_review_dataset_build14 import _meta, _rows, _writer_for

from dataset_tools import img2dataset_hooks, youtube
from dataset_tools.cli import main
from dataset_tools.fake_host import FakeThumbnailHost, render_thumbnail
from dataset_tools.politeness import MAX_COOL_DOWN_HOSTS, SharedCoolDown


def test_a_pause_outlives_a_pause_of_another_host(tmp_path):
    # A build throttled by the old host moved --url-template, was throttled by the new one, and
    # moved back: the file held only the new host, so the old one was asked again at once.
    path = tmp_path / "host_cooldown.json"
    SharedCoolDown(str(path), 60, host="old.example").extend(30)
    SharedCoolDown(str(path), 60, host="new.example").extend(30)
    assert SharedCoolDown(str(path), 60, host="old.example").remaining() > 25
    assert SharedCoolDown(str(path), 60, host="new.example").remaining() > 25
    assert SharedCoolDown(str(path), 60, host="third.example").remaining() == 0.0
    # The latest write is still named as builds before the map read it.
    record = json.loads(path.read_text())
    assert record["host"] == "new.example" and record["until"] == record["hosts"]["new.example"]


def test_the_one_host_file_of_an_older_build_still_holds_its_host(tmp_path):
    path = tmp_path / "host_cooldown.json"
    path.write_text(json.dumps({"until": time.time() + 30, "host": "old.example"}))
    assert SharedCoolDown(str(path), 60, host="old.example").remaining() > 25
    assert SharedCoolDown(str(path), 60, host="new.example").remaining() == 0.0
    SharedCoolDown(str(path), 60, host="new.example").extend(30)  # rewritten as the map
    assert SharedCoolDown(str(path), 60, host="old.example").remaining() > 25


def test_ended_pauses_are_dropped_and_the_hosts_kept_are_bounded(tmp_path):
    path = tmp_path / "host_cooldown.json"
    now = time.time()
    hosts = {f"h{i}.example": now + 100 + i for i in range(MAX_COOL_DOWN_HOSTS + 20)}
    hosts["ended.example"] = now - 5
    path.write_text(json.dumps({"hosts": hosts}))
    SharedCoolDown(str(path), 600, host="mine.example").extend(1)
    kept = json.loads(path.read_text())["hosts"]
    assert len(kept) == MAX_COOL_DOWN_HOSTS and "ended.example" not in kept
    # Those whose pause ends last are kept (this one's short pause makes way for them).
    assert f"h{MAX_COOL_DOWN_HOSTS + 19}.example" in kept and "h0.example" not in kept


def test_a_row_the_download_loop_loses_keeps_its_variant_url_and_trail(tmp_path, monkeypatch):
    # Both rows were fetched: one lost in write() (a caption that cannot be UTF-8), one lost by
    # img2dataset's loop before write(). Both were recorded without variant, trail or attempts,
    # and with the plan's URL instead of the one asked.
    _, inputs = _writer_for(tmp_path, monkeypatch, ["000000", "000001"])
    variants = ["maxresdefault", "mqdefault"]
    with FakeThumbnailHost({inputs[0]["video_id"]: "no_maxres"}) as host:
        for row in inputs:  # the plan's URL: the first variant's
            row["url"] = youtube.thumbnail_url(row["video_id"], variants[0], host.url_template)
        writer = _writer_with_url_column(tmp_path)
        for row in inputs:
            outcome = fetch_row(row["video_id"], variants, host.url_template)
            img2dataset_hooks._CTX.outcomes[row["video_id"]] = outcome
    try:
        writer.write(b"jpeg bytes", "000000", "cut emoji \ud83d", _meta(inputs[0], "success"))
    except UnicodeEncodeError:
        pass  # img2dataset's loop prints it and goes on with the next row
    writer.close()
    rows = _rows(tmp_path)
    for key, variant, trail in (
        ("000000", "mqdefault", "maxresdefault:404,mqdefault:ok"),
        ("000001", "maxresdefault", "maxresdefault:ok"),
    ):
        assert rows[key]["error_message"] == img2dataset_hooks.ERR_LOST
        assert (rows[key]["variant"], rows[key]["thumbnail_trail"]) == (variant, trail)
        assert rows[key]["fetch_attempts"] == len(trail.split(","))
        assert rows[key]["url"].endswith(f"/{rows[key]['video_id']}/{variant}.jpg")


def _writer_with_url_column(tmp_path):
    """``_writer_for``'s shard writer, with the plan's ``url`` column as a build has it."""
    columns = ("video_id", "caption", "url", "sample_key", "key", "status", "error_message")
    schema = pa.schema([(name, pa.string()) for name in columns])
    return img2dataset_hooks.SortedTarSampleWriter(0, str(tmp_path), True, 5, schema, "jpg")


class _PcxMaxres(JpegHandler):
    """maxresdefault as a PCX image (PIL reads it, OpenCV does not), the other variants as JPEG."""

    def body(self, path):
        video_id, variant = path.split("/")[2], path.rsplit("/", 1)[-1].removesuffix(".jpg")
        if variant != "maxresdefault":
            return render_thumbnail(video_id, variant)
        out = io.BytesIO()
        Image.new("RGB", (640, 360), (10, 200, 30)).save(out, "PCX")
        return out.getvalue()


def test_a_rung_the_resizer_cannot_decode_falls_to_the_next_variant(tmp_path):
    # The ladder took the PCX body (PIL decodes it) and img2dataset's resizer failed the row as
    # "Image decoding error", trail "maxresdefault:ok", though mqdefault was a JPEG.
    inp, out = tmp_path / "in.csv", tmp_path / "out"
    write_ids_csv(inp, ["pcxthumb001"])
    with serving(_PcxMaxres) as template:
        args = build_args(template, inp, out)
        args[args.index("--variants") + 1] = "maxresdefault,mqdefault"
        assert main(args) == 0
    (row,) = pq.read_table(out / "00000.parquet").to_pylist()
    assert row["status"] == "success", row["error_message"]
    assert (row["variant"], row["thumbnail_trail"]) == ("mqdefault", "maxresdefault:not_image,mqdefault:ok")
