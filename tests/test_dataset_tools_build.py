"""End to end: `python -m dataset_tools build` through real img2dataset (spawned worker pool)
against the loopback fake thumbnail host, then resume, --retry-failed, inspect, finalize, split,
vocab, dedup, and reading the shards with webdataset and the trainer's loader.

Runtime: ~1 minute on 2 cores (4 builds, each starting a spawn pool; a 1 s deadline vs a 2 s
server and a 1 s Retry-After are the slowest rows).
"""

import glob
import hashlib
import io
import json
import os
import shutil
import tarfile

import pyarrow.parquet as pq
import pytest

from dataset_tools import fetch, shards
from dataset_tools.cli import main
from dataset_tools.fake_host import PLACEHOLDER, FakeThumbnailHost

GOOD = {  # video id -> (behaviour, expected variant)
    "okokokokok1": ("ok", "maxresdefault"),
    "okokokokok2": ("ok", "maxresdefault"),
    "okokokokok3": ("ok", "maxresdefault"),
    "okokokokok4": ("ok", "maxresdefault"),
    "nomaxres001": ("no_maxres", "sddefault"),
    "nomaxressd1": ("no_maxres_sd", "hqdefault"),
    "placehold01": ("placeholder200", "sddefault"),
    "throttle001": ("throttle", "maxresdefault"),
    "error500001": ("error500", "maxresdefault"),
    "copyofok001": ("copy_of:okokokokok1", "maxresdefault"),
    # issue 11: a bad top rung (HTML body, full-size grey placeholder) falls to the next one
    "htmlmaxres1": ("notimage_maxres", "sddefault"),
    "greymaxres1": ("grey_maxres", "sddefault"),
}
BAD = {  # video id -> (behaviour, error prefix)
    "missing0001": ("missing", fetch.ERR_ALL_MISSING),
    "slow0000001": ("slow", fetch.ERR_DEADLINE),
    "truncated01": ("truncated", fetch.ERR_TRUNCATED),
    "notimage001": ("notimage", fetch.ERR_NOT_IMAGE),
    "hugepixels1": ("huge_pixels", fetch.ERR_TOO_MANY_PIXELS),
    "hugebytes01": ("huge_bytes", fetch.ERR_TOO_BIG),
    "noai0000001": ("noai", fetch.ERR_ROBOTS),
}
CHANNELS = ["chanA", "chanB", "chanC", "chanD"]


def _write_input(path):
    lines = ["video_id,trending_date,title,channel_title,channelId,category_id,publish_time,tags"]
    for i, vid in enumerate(list(GOOD) + list(BAD)):
        channel = CHANNELS[i % len(CHANNELS)]
        lines.append(
            f"{vid},17.14.11,Title of {vid} &amp; more,{channel},UC{channel},{24 if i % 2 else 10},"
            f'2017-11-13T17:13:01.000Z,"common|""tag {i % 3}"""'
        )
    lines.append(
        "okokokokok1,17.13.11,Older title,chanA,UCchanA,24,2017-11-13T17:13:01.000Z,[none]"
    )  # duplicate
    lines.append("bad-id,17.14.11,Invalid,chanA,UCchanA,24,2017-11-13T17:13:01.000Z,[none]")
    path.write_text("\n".join(lines) + "\n")


def _build(host, inp, out, *extra):
    return main(
        [
            "build",
            "--input",
            str(inp),
            "--output",
            str(out),
            "--url-template",
            host.url_template,
            "--shard-size",
            "4",
            "--processes",
            "2",
            "--threads",
            "4",
            "--deadline",
            "1",
            "--retries",
            "1",
            "--backoff-base",
            "0.05",
            "--max-bytes",
            str(1024 * 1024),
            "--max-pixels",
            str(2000 * 2000),
            "--image-size",
            "64",
            *extra,
        ]
    )


def _rows(out):
    rows = []
    for path in sorted(glob.glob(os.path.join(out, "*.parquet"))):
        rows += pq.read_table(path).to_pylist()
    return rows


@pytest.fixture(scope="module")
def host():
    behaviours = {vid: b for vid, (b, _) in {**GOOD, **BAD}.items()}
    with FakeThumbnailHost(behaviours, slow_seconds=2.0, max_lifetime=600) as h:
        yield h


@pytest.fixture(scope="module")
def built(host, tmp_path_factory):
    base = tmp_path_factory.mktemp("dt_build")
    inp, out = base / "USvideos.csv", base / "out"
    _write_input(inp)
    assert _build(host, inp, out) == 0
    return {"input": inp, "out": str(out), "base": base}


def test_every_row_accounted_once(built):
    rows = _rows(built["out"])
    ids = [r["video_id"] for r in rows]
    assert sorted(ids) == sorted(list(GOOD) + list(BAD))  # duplicate collapsed, invalid id dropped
    by_id = {r["video_id"]: r for r in rows}
    for vid, (_, variant) in GOOD.items():
        assert by_id[vid]["status"] == "success", (vid, by_id[vid]["error_message"])
        assert by_id[vid]["variant"] == variant
    for vid, (_, reason) in BAD.items():
        assert by_id[vid]["status"] == "failed_to_download"
        assert by_id[vid]["error_message"].startswith(reason), (vid, by_id[vid]["error_message"])
    assert by_id["okokokokok1"]["title"] == "Title of okokokokok1 & more"  # newest, unescaped
    assert by_id["okokokokok1"]["tags"] == ["common", "tag 0"]
    rejected = open(os.path.join(built["out"], "_build", "rejected_input.jsonl")).read()
    assert "bad-id" in rejected
    summary = json.load(open(os.path.join(built["out"], "_build", "summary.json")))
    assert summary["successes"] == len(GOOD) and summary["failures"] == len(BAD)
    stats = [json.load(open(p)) for p in glob.glob(os.path.join(built["out"], "*_stats.json"))]
    assert sum(s["count"] for s in stats) == len(rows)


def test_no_placeholder_or_broken_image_in_tars(built):
    from dataset_tools.inspect_shards import inspect_dir

    report = inspect_dir(built["out"], verify=True)
    assert report["corrupt"] == [] and report["successes"] == len(GOOD)
    placeholder_sha = hashlib.sha256(PLACEHOLDER).hexdigest()
    for tar_path in glob.glob(os.path.join(built["out"], "*.tar")):
        samples = shards.read_tar(tar_path)
        for _key, members in samples.items():
            meta = json.loads(members["json"])
            assert meta["sha256"] != placeholder_sha and meta["variant"] in {v for _, v in GOOD.values()}
            assert {
                "video_id",
                "title",
                "tags",
                "category_id",
                "category_name",
                "url",
                "variant",
                "width",
                "height",
                "sha256",
            } <= set(meta)
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
        assert names == sorted(names)
    assert not glob.glob(os.path.join(built["out"], "*.tmp"))
    assert main(["inspect", built["out"], "--verify"]) == 0


def test_shards_read_with_webdataset_and_trainer_loader(built):
    import torch
    import webdataset as wds

    from vutrain.data.preprocess import make_preprocess
    from vutrain.data.webdataset import TrainStream

    tars = sorted(glob.glob(os.path.join(built["out"], "*.tar")))
    ds = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json")
    samples = list(ds)
    assert len(samples) == len(GOOD)
    assert all(
        img.size[0] > 0 and txt.startswith("Title of") and meta["status"] == "success"
        for img, txt, meta in samples
    )

    def tokenize(texts):
        return {
            "input_ids": torch.zeros(len(texts), 8, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), 8, dtype=torch.long),
        }

    preprocess = make_preprocess({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}})
    stream = TrainStream(
        "::".join(tars),
        preprocess=preprocess,
        tokenize=tokenize,
        batch_size=2,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        caption_template="{title}",
        shuffle_buffer=1,
        shard_shuffle=False,
    )
    try:
        assert stream.num_samples == len(GOOD)  # read from our _stats.json
        batches = [next(stream) for _ in range(stream.steps_per_epoch)]
        assert batches[0]["pixel_values"].shape == (2, 3, 32, 32)
        assert sum(stream.skipped().values()) == 0
    finally:
        stream.close()


def test_resume_redoes_only_incomplete_shards(built, host, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    # Simulate a crash inside shard 00001: no stats, a half-written tar under its temp name.
    os.remove(out / "00001_stats.json")
    (out / "00001.tar.tmp").write_bytes(b"half a tar")
    shard1 = {r["video_id"] for r in pq.read_table(out / "00001.parquet").to_pylist()}
    before = len(host.requests)
    assert _build(host, built["input"], out) == 0
    asked = {r["video_id"] for r in host.requests[before:]}
    assert asked and asked <= shard1
    assert not (out / "00001.tar.tmp").exists() and (out / "00001_stats.json").exists()
    rows = _rows(str(out))
    assert sorted(r["video_id"] for r in rows) == sorted(list(GOOD) + list(BAD))


def test_retry_failed_reattempts_only_failures(built, host, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    host.behaviours.update({"missing0001": "ok", "truncated01": "ok"})  # the host recovered
    try:
        before = len(host.requests)
        assert _build(host, built["input"], out) == 0  # plain resume: nothing to do
        assert len(host.requests) == before
        assert _build(host, built["input"], out, "--retry-failed") == 0
        asked = {r["video_id"] for r in host.requests[before:]}
        assert asked == set(BAD)
    finally:
        host.behaviours.update({"missing0001": "missing", "truncated01": "truncated"})
    by_id = {r["video_id"]: r for r in _rows(str(out))}
    assert len(by_id) == len(GOOD) + len(BAD)
    assert by_id["missing0001"]["status"] == "success" and by_id["truncated01"]["status"] == "success"
    assert by_id["noai0000001"]["status"] == "failed_to_download"
    from dataset_tools.inspect_shards import inspect_dir

    report = inspect_dir(str(out), verify=True)
    assert report["corrupt"] == [] and report["successes"] == len(GOOD) + 2
    assert not (out / "_build" / "retry").exists()  # all merged: the spent folder is removed


def test_finalize_then_build_again(built, host, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    assert main(["finalize", str(out)]) == 0
    sizes = json.load(open(out / "sizes.json"))
    assert sum(sizes.values()) == len(GOOD) == int((out / "__len__").read_text())
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["incomplete"] == [] and manifest["brace"].startswith("{00000..")
    before = len(host.requests)
    assert _build(host, built["input"], out) == 0  # a stray sizes.json must not break resume
    assert len(host.requests) == before


def test_split_vocab_dedup(built, tmp_path):
    from dataset_tools import dedup, split, vocab

    res = split.split(built["out"], str(tmp_path / "split"), by="channel", val_fraction=0.3, seed="1")
    assert res["train"] + res["val"] == len(GOOD)
    sides = {}
    for side in ("train", "val"):
        for row in _rows(str(tmp_path / "split" / side)):
            sides.setdefault(row["channel_id"], set()).add(side)
    assert all(len(s) == 1 for s in sides.values())  # no channel on both sides
    res = split.split(built["out"], str(tmp_path / "split_hash"), by="hash", val_fraction=0.5)
    assert res["train"] + res["val"] == len(GOOD)

    voc = vocab.build_vocab(built["out"], min_count=2)
    tags = {e["name"]: e["count"] for e in voc["tags"]}
    assert tags["common"] == len(GOOD) and all(c >= 2 for c in tags.values())
    assert {e["name"] for e in voc["categories"]} == {"Entertainment", "Music"}

    report = dedup.dedup(built["out"], filter_output=str(tmp_path / "dedup"))
    pairs = [{m["video_id"] for m in g} for g in report["groups"]]
    assert {"okokokokok1", "copyofok001"} in pairs and report["exact"] >= 1
    assert report["kept"] == len(GOOD) - report["duplicates"]


def test_verify_catches_corruption(built, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(built["out"], out)
    tar_path = str(out / "00000.tar")
    samples = shards.read_tar(tar_path)
    key = sorted(samples)[0]
    samples[key]["jpg"] = samples[key]["jpg"][: len(samples[key]["jpg"]) // 2]  # truncated image
    del samples[sorted(samples)[-1]]["txt"]  # a sample missing its caption
    shards.write_tar(tar_path, samples.items())
    assert main(["inspect", str(out), "--verify"]) == 1


def test_letterbox_crop():
    import cv2
    import numpy as np
    from img2dataset.resizer import Resizer

    from dataset_tools.fake_host import render_thumbnail
    from dataset_tools.letterbox import LetterboxResizer, crop_letterbox

    cropped = crop_letterbox(render_thumbnail("letterbox01", "hqdefault"))  # 480x360 with bars
    img = cv2.imdecode(np.frombuffer(cropped, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape[:2] == (270, 480)  # 16:9 content only
    assert crop_letterbox(render_thumbnail("letterbox01", "maxresdefault")) is None  # nothing to crop
    resizer = LetterboxResizer(Resizer(image_size=64, resize_mode="keep_ratio", resize_only_if_bigger=False))
    _, width, height, ow, oh, err = resizer(io.BytesIO(render_thumbnail("letterbox01", "sddefault")))
    assert err is None and (ow, oh) == (640, 360) and height == 64


def test_distributor_errors_are_clear(tmp_path, monkeypatch):
    import builtins

    inp = tmp_path / "in.csv"
    inp.write_text("video_id,title\nokokokokok1,x\n")
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):  # make the test independent of whether ray is installed
        if name == "ray":
            raise ModuleNotFoundError("no ray here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(SystemExit, match="pip install ray"):
        main(["build", "--input", str(inp), "--output", str(tmp_path / "o"), "--distributor", "ray"])
    with pytest.raises(SystemExit, match="--variants is empty"):
        main(["build", "--input", str(inp), "--output", str(tmp_path / "o"), "--variants", ","])


def test_trainer_runs_on_built_youtube_shards(built, tmp_path):
    """The whole product: built YouTube shards -> vutrain training -> zero-shot over the video
    categories (category_name from the built-in table) on the same shards."""
    import train_runner as tr

    tars = sorted(glob.glob(os.path.join(built["out"], "*.tar")))
    spec = os.path.join(built["out"], "{" + ",".join(os.path.basename(t)[:-4] for t in tars) + "}.tar")
    run_dir = str(tmp_path / "run")
    proc = tr.run(
        "python",
        tr.base_overrides(
            {"train_shards": spec, "val_shards": spec},
            run_dir,
            2,
            train__micro_batch_size=2,
            data__num_workers=0,
            data__caption_template="{title}. tags: {tags}",
        ),
        ranks=1,
    )
    assert proc.returncode == 0, tr.describe(proc)
    final = [r for r in tr.metrics(run_dir) if "eval/zeroshot_top1" in r][-1]
    assert final["eval/num_samples"] == len(GOOD)
    assert final["eval/zeroshot_classes"] == 2  # "Entertainment" (24) and "Music" (10)
