"""Review of the dataset tools' input parsing and smaller subcommands: YouTube URL forms found in
real exports, Retry-After as an HTTP date in every form HTTP allows, dedup's report of a sample
that joins a group only through a later one, and the console script's program name. Real files,
real shards, the installed ``vutrain-dataset`` script."""

from __future__ import annotations

import calendar
import io
import json
import os
import subprocess
import sys
import time

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from dataset_tools import dedup, metadata, shards, youtube
from dataset_tools.politeness import parse_retry_after

VIDEO = "dQw4w9WgXcQ"


@pytest.mark.parametrize(
    "url",
    [
        # The old Flash embed code joined its parameters with "&" and no "?".
        f"http://www.youtube.com/v/{VIDEO}&hl=en_US&fs=1",
        f"https://www.youtube.com/embed/{VIDEO}&autoplay=1",
        f"https://www.youtube.com/watch?v={VIDEO}?t=42",
        f"https://www.youtube.com/watch/{VIDEO}",
        f"https://www.youtube.com/attribution_link?a=x&u=/watch%3Fv%3D{VIDEO}%26feature%3Dshare",
    ],
)
def test_url_forms_of_real_exports_give_their_video_id(url):
    assert youtube.normalize_video_id(url) == VIDEO


@pytest.mark.parametrize(
    "url",
    [
        "https://www.youtube.com/embed/videoseries&list=PL1234567890",
        "https://www.youtube.com/watch/live_stream",
        f"https://www.youtube.com/v/{VIDEO}X&hl=en",  # 12 id characters: no id, not a cut one
        f"https://www.youtube.com/watch?v={VIDEO}%0A",
        f"https://www.youtube.com/attribution_link?u=https://example.com/watch?v={VIDEO}",
        f"https://www.youtube.com/attribution_link?u=https://example.com/x%3Fv%3D{VIDEO}",
    ],
)
def test_lookalikes_stay_rejected(url):
    assert youtube.normalize_video_id(url) is None


def test_a_csv_of_such_urls_keeps_every_row(tmp_path):
    src = tmp_path / "links.csv"
    src.write_text(
        "url,title\n"
        "http://www.youtube.com/v/-_a-_b-_c-_&hl=en&fs=1,flash embed\n"
        "https://www.youtube.com/watch?v=_b_b_b_b_b_?t=42,two question marks\n"
        "https://www.youtube.com/watch/c-c-c-c-c-c,path form\n"
    )
    result = metadata.read_metadata([str(src)])
    assert [r["video_id"] for r in result.rows] == ["-_a-_b-_c-_", "_b_b_b_b_b_", "c-c-c-c-c-c"]
    assert result.rejected == []


@pytest.fixture
def zone(monkeypatch):
    """Set the process's local time zone (TZ + tzset), restored afterwards."""

    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_zone
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("local_zone", ["Asia/Tokyo", "America/Los_Angeles"])
@pytest.mark.parametrize(
    "header",
    [
        "Sun, 06 Dec 2026 10:00:30 GMT",  # IMF-fixdate
        "Sunday, 06-Dec-26 10:00:30 GMT",  # RFC 850
        "Sun Dec  6 10:00:30 2026",  # asctime: no zone written, GMT by definition
        "Sun, 06 Dec 2026 10:00:30 -0000",  # RFC 2822's "UTC, zone unknown"
    ],
)
def test_retry_after_http_date_is_gmt_whatever_the_local_zone(zone, local_zone, header):
    zone(local_zone)
    now = calendar.timegm((2026, 12, 6, 10, 0, 0))
    assert parse_retry_after(header, now) == pytest.approx(30.0)


def _noise(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((64, 64), Image.BILINEAR)


def _jpeg(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95)
    return out.getvalue()


def _chain_shard(folder) -> int:
    """One shard of A, B, C (keys in that order): C lies within the returned pHash distance of A and
    of B, A and B farther apart, so B matches nothing before it and joins A's group through C."""
    a = _noise(1)
    b = Image.blend(a, _noise(101), 0.35)
    images = [_jpeg(img) for img in (a, b, Image.blend(a, b, 0.5))]
    ha, hb, hc = (imagehash.phash(Image.open(io.BytesIO(data))) for data in images)
    distance = int(max(ha - hc, hb - hc))  # imagehash gives a numpy integer
    assert ha - hb > distance  # the premise: A and B do not match each other
    schema = pa.schema([("key", pa.string()), ("status", pa.string()), ("video_id", pa.string())])
    samples, rows = [], []
    for i, data in enumerate(images):
        key, video = f"00000{i:04d}", f"video{i:06d}"
        meta = json.dumps({"key": key, "video_id": video}).encode()
        samples.append((key, {"jpg": data, "txt": b"t", "json": meta}))
        rows.append({"key": key, "status": "success", "video_id": video})
    shards.write_tar(os.path.join(folder, "00000.tar"), samples)
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, schema)
    shards.write_stats(str(folder), 0, shards.stats_from_rows(rows, 0.0, 1.0))
    return distance


def test_dedup_reports_a_sample_dropped_through_a_later_match_as_dropped(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    distance = _chain_shard(src)
    report = dedup.dedup(str(src), max_distance=distance, filter_output=str(out))
    written = set(shards.read_tar(str(out / "00000.tar")))
    assert written == {"000000000"}
    (group,) = report["groups"]
    labels = {entry["key"]: entry["match"] for entry in group}
    # Every sample the report calls kept is in the output, and every other one is not.
    assert {key for key, match in labels.items() if match == "kept"} == written
    assert labels == {"000000000": "kept", "000000001": "perceptual", "000000002": "perceptual"}
    assert report["duplicates"] == report["perceptual"] == 2
    assert report["exact"] + report["same_video"] + report["perceptual"] == report["duplicates"]


def _console_script() -> str:
    script = os.path.join(os.path.dirname(sys.executable), "vutrain-dataset")
    if not os.path.exists(script):
        pytest.skip("the vutrain-dataset console script is not installed (pip install -e .)")
    return script


@pytest.mark.parametrize("command", ["build", "split"])
def test_help_and_usage_errors_name_the_program_the_user_ran(command):
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    script = subprocess.run(
        [_console_script(), command, "--help"], capture_output=True, text=True, env=env, timeout=60
    )
    assert script.returncode == 0
    assert script.stdout.startswith(f"usage: vutrain-dataset {command} ")
    module = subprocess.run(
        [sys.executable, "-m", "dataset_tools", command], capture_output=True, text=True, env=env, timeout=60
    )
    assert module.returncode == 2
    assert f"python -m dataset_tools {command}: error:" in module.stderr
