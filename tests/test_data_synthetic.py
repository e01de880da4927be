"""Synthetic shard writer: img2dataset layout, sorted members, readable by plain webdataset."""

import hashlib
import json
import os
import tarfile

import pandas as pd
import webdataset as wds

from vutrain.data.synthetic import CLASSES, main, write_synthetic

FIELDS = {
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
}


def test_layout_members_and_metadata(tmp_path):
    info = write_synthetic(
        str(tmp_path), num_samples=50, shard_size=20, image_size=32, seed=1, val_samples=30
    )
    assert len(CLASSES) >= 24 and len(set(CLASSES)) == len(CLASSES)
    train = tmp_path / "train"
    for i in range(3):
        for suffix in (".tar", ".parquet", "_stats.json"):
            assert (train / f"{i:05d}{suffix}").is_file()
    assert not (train / "00003.tar").exists()
    assert json.loads((train / "sizes.json").read_text()) == {
        "00000.tar": 20,
        "00001.tar": 20,
        "00002.tar": 10,
    }
    assert int((train / "__len__").read_text()) == 50
    assert json.loads((train / "00002_stats.json").read_text())["successes"] == 10
    assert info["train_shards"] == str(train / "{00000..00002}.tar")
    assert info["val_shards"] == str(tmp_path / "val" / "{00000..00001}.tar")
    assert len(pd.read_parquet(train / "00001.parquet")) == 20

    names = tarfile.open(train / "00001.tar").getnames()
    assert names == sorted(names)
    assert names[:3] == ["0000100.jpg", "0000100.json", "0000100.txt"]  # img2dataset: 1 * 10**2 + 0

    samples = list(wds.WebDataset(str(train / "00001.tar"), shardshuffle=False).decode("pil"))
    assert len(samples) == 20
    for s in samples:
        meta = s["json"]
        assert FIELDS <= set(meta)
        assert s["jpg"].size == (32, 32) and s["jpg"].mode == "RGB"
        assert s["txt"] == meta["title"]
        assert meta["category_name"] in CLASSES
        colour, shape = meta["category_name"].split(" ")
        assert colour in meta["title"] and shape in meta["title"]  # the class words are in the title
        assert meta["tags"][:2] == [colour, shape]
        assert len(meta["video_id"]) == 11
    raw = tarfile.open(train / "00001.tar")
    jpg = raw.extractfile("0000100.jpg").read()
    assert hashlib.sha256(jpg).hexdigest() == json.loads(raw.extractfile("0000100.json").read())["sha256"]


def test_deterministic_and_val_held_out(tmp_path):
    write_synthetic(str(tmp_path / "a"), 30, 30, seed=5, val_samples=30)
    write_synthetic(str(tmp_path / "b"), 30, 30, seed=5, val_samples=30)
    write_synthetic(str(tmp_path / "c"), 30, 30, seed=6, val_samples=0)

    def read(p):
        return (tmp_path / p).read_bytes()

    assert read("a/train/00000.tar") == read("b/train/00000.tar")
    assert read("a/train/00000.tar") != read("c/train/00000.tar")
    assert read("a/train/00000.tar") != read("a/val/00000.tar")
    assert not (tmp_path / "c" / "val").exists()


def test_cli_prints_specs(tmp_path, capsys):
    main(["--out", str(tmp_path), "--num-samples", "12", "--shard-size", "5", "--image-size", "16"])
    out = capsys.readouterr().out
    assert f"data.train_shards={tmp_path}/train/{{00000..00002}}.tar" in out
    assert f"data.val_shards={tmp_path}/val/" in out
    assert os.path.isfile(tmp_path / "val" / "sizes.json")
