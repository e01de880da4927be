"""``python -m vutrain.bench data`` (review 11): the decode floor is taken over the images the
stream reads (every shard, damaged ones left out and counted, its warm-up untimed like the
stream's), and bad input is one line, not a traceback or a run that never ends."""

import io
import json

import numpy as np
import pytest
from PIL import Image
from tar_shards import write_members

from vutrain import bench_data
from vutrain.bench import main as bench_main
from vutrain.bench_data import parse_args, photo_like, read_images, write_thumbnail_shards


def _jpeg(key: int, width: int = 96, height: int = 72, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    photo_like(np.random.default_rng(key), width, height).save(out, fmt)
    return out.getvalue()


def _sample(key: int, ext: str, image: bytes, caption: bool = True) -> list[tuple[str, bytes]]:
    name = f"{key:09d}"
    members = [(f"{name}.{ext}", image)]
    if caption:
        members += [(f"{name}.txt", f"a video {key}".encode()), (f"{name}.json", b'{"title": "t %d"}' % key)]
    return members


def _images(spec: str, limit: int) -> list[bytes]:
    got = read_images(spec, limit)
    return got[0] if isinstance(got, tuple) else got  # (images, formats) since this review


def test_decode_floor_takes_images_from_every_shard(tmp_path):
    # Two sources of other sizes: the floor read the first 16 images, all of the first source,
    # while the stream draws from both alike.
    small = write_thumbnail_shards(str(tmp_path / "small"), 16, 96, 72, shard_size=16)
    large = write_thumbnail_shards(str(tmp_path / "large"), 16, 192, 144, shard_size=16)
    sizes = [Image.open(io.BytesIO(d)).size for d in _images(f"{small}::{large}", 16)]
    assert sorted(set(sizes)) == [(96, 72), (192, 144)] and sizes.count((96, 72)) == 8 and len(sizes) == 16


def test_decode_floor_has_an_untimed_warm_up_pass(tmp_path, monkeypatch):
    # min_seconds=0: one timed pass; the stream's figure leaves its start-up out, so must the floor.
    images = _images(write_thumbnail_shards(str(tmp_path / "s"), 4, 64, 48, shard_size=4), 4)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: opened.append(1) or real_open(fp, *a, **k))
    wall, cpu = bench_data.decode_rate(images, 0.0)
    assert len(opened) == 2 * len(images) and wall > 0 and cpu > 0


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_non_finite_decode_seconds_is_one_usage_line(tmp_path, capsys, value):
    # the floor's loop waited for elapsed >= inf (or nan): the run never ended
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--shards", str(tmp_path / "x.tar"), "--decode-seconds", value])
    assert exit_info.value.code == 2
    assert f"--decode-seconds must be >= 0 and finite, got {value}" in capsys.readouterr().err


def test_a_spec_matching_nothing_is_one_line(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["data", "--shards", str(tmp_path / "none" / "{00000..00003}.tar")])
    assert "matched 0 files" in str(exit_info.value.code)  # the message, not a ShardListError traceback


@pytest.mark.slow
def test_shards_without_captions_are_one_line(tmp_path):
    shard = write_members(
        tmp_path / "0.tar", [m for k in range(8) for m in _sample(k, "jpg", _jpeg(k), False)]
    )
    with pytest.raises(SystemExit) as exit_info:
        bench_main(["data", "--shards", shard, "--batch-size", "4", "--image-size", "32"])
    assert "gave a caption" in str(exit_info.value.code)


@pytest.mark.slow
def test_damaged_and_png_samples_are_counted_not_a_crash(tmp_path, capsys):
    members = []
    for k in range(24):
        if k % 4 == 1:
            members += _sample(k, "jpg", _jpeg(k)[:300])  # cut short
        elif k % 4 == 3:
            members += _sample(k, "png", _jpeg(k, fmt="PNG"))
        else:
            members += _sample(k, "jpg", _jpeg(k))
    members += _sample(99, "jpg", b"not an image")
    shard = write_members(tmp_path / "0.tar", members)
    args = ["--batch-size", "4", "--image-size", "48", "--batches", "3", "--decode-seconds", "0.05"]
    args += ["--rounds", "1", "--shuffle-buffer", "4", "--workers", "2"]
    assert bench_main(["data", "--shards", shard, *args]) == 0  # a traceback from PIL before
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert "decode floor: 7 undecodable images left out" in out
    assert summary["decode_formats"] == {"jpg": 12, "png": 6, "undecodable": 7}
    assert summary["decode_images"] == 18 and summary["source_sizes"] == {"96x72": 18}
    assert summary["stream_skipped"]["undecodable_image"] > 0 and summary["decode_per_s"] > 0
