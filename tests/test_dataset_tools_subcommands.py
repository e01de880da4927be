"""dataset_tools split, dedup, vocab and inspect on odd input: truncated tars, shards without video
ids (plain img2dataset), tags kept as one string, images that do not decode. Every sample is
accounted for or the command stops with one line naming what to fix."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pytest
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, inspect_shards, shards, split, vocab
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail

PLAIN_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("tags", pa.string()),
    ]
)


def _plain_shard(folder, shard_id: int, n: int, tags: str = "") -> None:
    """A shard as plain img2dataset writes it: url and caption, no video id; tags as one string."""
    name = shards.shard_name(shard_id)
    rows = [
        {"key": f"{name}{i:04d}", "status": "success", "url": f"http://h/{shard_id}/{i}.jpg", "caption": "c"}
        for i in range(n)
    ]
    for row in rows:
        row["tags"] = tags
    samples = [
        (
            r["key"],
            {"jpg": render_thumbnail(r["key"], "mqdefault"), "txt": b"c", "json": json.dumps(r).encode()},
        )
        for r in rows
    ]
    shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
    shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, PLAIN_SCHEMA)
    shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))


def _keys(folder) -> set[str]:
    return {k for n in shards.iter_shard_names(str(folder)) for k in shards.read_tar(f"{folder}/{n}.tar")}


@pytest.mark.parametrize("cut", ["member_boundary", "mid_member"])
@pytest.mark.parametrize("command", ["split", "dedup"])
def test_split_and_dedup_refuse_a_truncated_shard(tmp_path, command, cut):
    # Cut at a member boundary, tarfile read the tar without complaint: split wrote 12 of 15
    # samples (train + val short of the input) and dedup filtered the same 12, silently. Cut
    # inside a member, both were a tarfile.ReadError traceback naming no file.
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(3):
        _shard(src, shard_id, 5)
    tar = str(src / "00001.tar")
    with tarfile.open(tar) as t:
        members = list(t)
    keep = members[6].offset if cut == "member_boundary" else os.path.getsize(tar) // 2
    with open(tar, "r+b") as fh:
        fh.truncate(keep)
    out = tmp_path / "out"
    args = ["--output", str(out), "--by", "hash"] if command == "split" else ["--filter-output", str(out)]
    with pytest.raises(SystemExit) as err:
        main([command, str(src), *args])
    message = str(err.value.code)
    assert f"refusing to {command}: 00001.tar:" in message and "truncated" in message
    assert "Delete 00001_stats.json" in message and "\n" not in message
    assert not out.exists()


def test_shards_without_video_ids_verify_and_split(tmp_path, capsys):
    # Plain img2dataset shards: verify reported "video ids in more than one row: [None]" (exit
    # 1) and split was a KeyError: 'video_id' traceback.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 4)
    _plain_shard(src, 1, 4)
    assert main(["inspect", str(src), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    first = split.split(str(src), str(tmp_path / "a"), by="hash", val_fraction=0.5)
    again = split.split(str(src), str(tmp_path / "b"), by="hash", val_fraction=0.5)
    assert first["train"] + first["val"] == 8 and first == again
    for side in ("train", "val"):  # the same samples on the same side, run after run
        assert _keys(tmp_path / "a" / side) == _keys(tmp_path / "b" / side)


def test_dedup_finds_duplicates_in_shards_without_video_ids(tmp_path):
    # Every row's video id was None, so every pair counted as "the same video" and was skipped:
    # no duplicate was ever found, even the same image under two urls.
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3)
    _plain_shard(src, 1, 3)
    tar = str(src / "00001.tar")
    samples = shards.read_tar(tar)
    samples["000010002"]["jpg"] = shards.read_tar(str(src / "00000.tar"))["000000000"]["jpg"]
    shards.write_tar(tar, samples.items())
    report = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert [[m["key"] for m in g] for g in report["groups"]] == [["000000000", "000010002"]]
    assert report["duplicates"] == 1 and report["kept"] == 5
    assert "000010002" not in _keys(tmp_path / "out")


def test_vocab_reads_tags_as_training_does(tmp_path):
    # A tags column kept as one comma-separated string gave a vocabulary of single characters;
    # training splits it into tags and ids them stripped and lower-cased.
    from vutrain.data.labels import tag_id, tag_values

    src = tmp_path / "src"
    src.mkdir()
    tags = "Cats, dogs ,  ,Dogs"
    _plain_shard(src, 0, 3, tags=tags)
    names = [e["name"] for e in vocab.build_vocab(str(src), min_count=3)["tags"]]
    assert sorted(names) == ["cats", "dogs"]
    assert {tag_id(n) for n in names} == {tag_id(t) for t in tag_values(tags)}


def test_vocab_counts_a_tag_once_whatever_its_unicode_form_or_spacing(tmp_path):
    # vocab kept its own copy of training's rule (strip, lower): once training applied NFC and
    # collapsed inner whitespace, "café" composed and decomposed were two vocabulary entries.
    import unicodedata

    from vutrain.data.labels import tag_id

    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 2, tags="caf\u00e9, lets play")
    _plain_shard(src, 1, 2, tags=unicodedata.normalize("NFD", "Caf\u00e9") + ", Lets  play")
    entries = vocab.build_vocab(str(src), min_count=1)["tags"]
    assert sorted((e["name"], e["count"]) for e in entries) == [("caf\u00e9", 4), ("lets play", 4)]
    assert len({tag_id(e["name"]) for e in entries}) == 2


@pytest.mark.parametrize("damage", ["truncated_jpg", "no_jpg"])
def test_dedup_names_a_sample_whose_image_is_unusable(tmp_path, damage):
    # It was an OSError ("Truncated File Read") or KeyError: 'jpg' traceback after the hashing.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 2)
    tar = _shard(src, 1, 3)
    samples = shards.read_tar(tar)
    key = sorted(samples)[1]
    if damage == "truncated_jpg":
        samples[key]["jpg"] = samples[key]["jpg"][:200]
    else:
        del samples[key]["jpg"]
    shards.write_tar(tar, samples.items())
    with pytest.raises(SystemExit) as err:
        dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    message = str(err.value.code)
    assert f"sample {key} " in message and "inspect" in message and "\n" not in message
    assert not (tmp_path / "out").exists()
    assert any(key in p for p in inspect_shards.inspect_dir(str(src), verify=True)["corrupt"])


def test_inspect_verify_does_not_pass_compressed_shards_it_never_read(tmp_path):
    # The trainer reads .tar.gz shards; `inspect --verify` looked at *.tar only, so a folder of
    # compressed shards got "verify: OK" with nothing checked. A tags string was counted letter
    # by letter in the histogram.
    import gzip

    folder = tmp_path / "shards"
    folder.mkdir()
    _plain_shard(folder, 0, 2, tags="cats, dogs")
    report = inspect_shards.inspect_dir(str(folder), verify=True)
    assert report["corrupt"] == [] and report["tags"] == {"cats": 2, "dogs": 2}
    tar = folder / "00000.tar"
    (folder / "00000.tar.gz").write_bytes(gzip.compress(tar.read_bytes()))
    tar.unlink()
    report = inspect_shards.inspect_dir(str(folder), verify=True)
    assert any("00000.tar.gz: compressed shard, not verified" in c for c in report["corrupt"])


def test_split_output_shards_share_one_schema(tmp_path):
    # Each output parquet's schema was inferred from its own rows: a column missing from a shard's
    # first row was dropped, an all-empty one became type null, and pyarrow.dataset refused to
    # read the output folder as one dataset.
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq
    from test_faults_dataset_tools import SCHEMA

    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3)
    rows = pq.read_table(src / "00001.parquet").to_pylist()
    for row in rows:  # a later input: one more column, and no category
        row.update(url="http://h/x.jpg", category_name=None)
    with_url = SCHEMA.append(pa.field("url", pa.string()))
    shards.write_parquet(str(src / "00001.parquet"), rows, with_url)
    out = tmp_path / "out"
    res = split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=2)
    assert res["train"] + res["val"] == 6
    for side in ("train", "val"):
        parquets = sorted((out / side).glob("*.parquet"))
        schemas = {pq.read_schema(p) for p in parquets}
        assert len(schemas) == 1, schemas
        schema = next(iter(schemas))
        assert "url" in schema.names and schema.field("category_name").type == pa.string()
        assert ds.dataset([str(p) for p in parquets]).to_table().num_rows == len(_keys(out / side))


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_incomplete_shards_are_named_not_skipped_silently(tmp_path, capsys, command):
    # A shard without stats (a build stopped mid-shard) was left out without a word: its samples
    # were missing from the split or the filtered output.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3, stats=False)  # a tar, no parquet or stats yet
    out = tmp_path / "out"
    if command == "split":
        result = split.split(str(src), str(out), by="hash", val_fraction=0.5)
        assert result["train"] + result["val"] == 3
    else:
        result = dedup.dedup(str(src), filter_output=str(out))
        assert result["kept"] == 3
    assert result["skipped_incomplete_shards"] == ["00001"]
    err = capsys.readouterr().err
    assert f"{command}: skipping 1 incomplete shard(s) (no stats yet): 00001" in err


def test_inspect_verify_names_a_sample_whose_json_is_not_an_object(tmp_path):
    # A <key>.json holding a list parses, then `meta.get` raised AttributeError out of --verify.
    folder = tmp_path / "shards"
    folder.mkdir()
    _plain_shard(folder, 0, 2)
    tar = str(folder / "00000.tar")
    samples = shards.read_tar(tar)
    first = sorted(samples)[0]
    samples[first]["json"] = b"[1, 2]"
    shards.write_tar(tar, sorted(samples.items()))
    report = inspect_shards.inspect_dir(str(folder), verify=True)
    assert report["corrupt"] == [f"00000.tar: sample {first} json does not parse as an object"]


def test_split_by_channel_keeps_a_channel_named_by_id_or_title_on_one_side(tmp_path):
    # Old Kaggle exports have only channel_title, newer ones channel_id too: a folder built from both
    # split one channel as two units (its id, its title), so it could land on both sides.
    import pyarrow.parquet as pq
    from test_faults_dataset_tools import SCHEMA

    id_only, title_only = {"key": "k", "channel_id": "UCalpha"}, {"key": "k", "channel_title": "Alpha"}
    seed = next(
        str(s)
        for s in range(100)
        if split.assign(id_only, "channel", 0.5, str(s)) != split.assign(title_only, "channel", 0.5, str(s))
    )
    src = tmp_path / "src"
    src.mkdir()
    channel_schema = SCHEMA.append(pa.field("channel_id", pa.string())).append(
        pa.field("channel_title", pa.string())
    )
    for shard_id, fields in (
        (0, {"channel_id": "UCalpha", "channel_title": "Alpha"}),
        (1, {"channel_title": "Alpha"}),
    ):
        _shard(src, shard_id, 3)
        rows = pq.read_table(src / f"{shards.shard_name(shard_id)}.parquet").to_pylist()
        for row in rows:
            row.update({"channel_id": None, **fields})
        shards.write_parquet(str(src / f"{shards.shard_name(shard_id)}.parquet"), rows, channel_schema)
    out = tmp_path / "out"
    res = split.split(str(src), str(out), by="channel", val_fraction=0.5, seed=seed)
    assert sorted((res["train"], res["val"])) == [0, 6]  # the whole channel on one side
    # A title that two channels share names no channel: it stays a unit of its own.
    assert split.channel_ids_by_title(str(src)) == {"Alpha": "UCalpha"}
    rows = pq.read_table(src / "00000.parquet").to_pylist()
    rows[0].update(channel_id="UCother")
    shards.write_parquet(str(src / "00000.parquet"), rows, channel_schema)
    assert split.channel_ids_by_title(str(src)) == {}
