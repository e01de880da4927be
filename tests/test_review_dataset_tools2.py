"""dataset_tools dedup and vocab (second review): their JSON outputs survive a full disk mid-write,
a repeat of one video with another thumbnail is a duplicate, and `dedup --filter-output` is a
finished shard folder (sizes.json, __len__) like split's."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest
from test_dataset_tools_subcommands import _keys, _plain_shard
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, shards, vocab
from dataset_tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_with_file_size_limit(args: list[str], limit_bytes: int) -> int:
    """Exit code of `python -m dataset_tools ARGS` in a child whose files may not grow past
    ``limit_bytes`` (what a full disk does to a write). The limit is set in the child alone, and
    its stdout/stderr go to /dev/null (a file would hit the limit too): results travel via files."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "dataset_tools", *args],
        cwd=ROOT,
        preexec_fn=limit,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    ).returncode


def _many_tags_folder(tmp_path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3, tags=",".join(f"tag-number-{i:03d}" for i in range(100)))
    return str(src)


def test_vocab_that_the_disk_refuses_leaves_the_earlier_vocabulary_whole(tmp_path):
    # vocab.save wrote in place: the disk filling up mid-write replaced a good vocabulary with a
    # truncated one (the first 512 bytes of the new one).
    src = _many_tags_folder(tmp_path)
    out = str(tmp_path / "vocab.json")
    vocab.save(vocab.build_vocab(src, min_count=4), out)  # the earlier vocabulary: no tags
    with open(out, "rb") as f:
        before = f.read()
    assert _run_with_file_size_limit(["vocab", src, "--output", out, "--min-count", "1"], 512) != 0
    with open(out, "rb") as f:
        assert f.read() == before
    assert not os.path.exists(out + ".tmp")
    vocab.save(vocab.build_vocab(src, min_count=1), out)  # without the limit: the new one, whole
    with open(out, encoding="utf-8") as f:
        assert len(json.load(f)["tags"]) == 100


def test_a_refused_json_write_is_one_line_and_keeps_the_earlier_file(tmp_path):
    out = tmp_path / "vocab.json"
    out.write_text('{"tags": []}')
    # Files of this process may not grow past 8 bytes while it writes: the write fails (EFBIG), as
    # a full disk does (Python ignores SIGXFSZ, so it is an OSError). The temporary name is unique
    # per writer, so a folder in its place can no longer fake the failure.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8, hard))
    try:
        with pytest.raises(SystemExit) as err:
            vocab.save({"tags": ["x"]}, str(out))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    message = str(err.value.code)
    assert message.startswith(f"{out}: could not write the vocabulary") and "\n" not in message
    assert out.read_text() == '{"tags": []}'
    assert os.listdir(tmp_path) == ["vocab.json"]  # no temporary file left behind


def test_dedup_report_that_the_disk_refuses_leaves_the_earlier_report_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(2):
        _shard(src, shard_id, 2)
    report_path = str(tmp_path / "dedup.json")
    dedup.dedup(str(src), report_path=report_path)
    with open(report_path, "rb") as f:
        before = f.read()
    assert len(before) > 64
    assert _run_with_file_size_limit(["dedup", str(src), "--report", report_path], 64) != 0
    with open(report_path, "rb") as f:
        assert f.read() == before  # was cut to 64 bytes: not JSON any more
    assert not os.path.exists(report_path + ".tmp")


def test_dedup_drops_a_repeat_of_one_video_id_with_another_thumbnail(tmp_path):
    # One video on two trending days whose creator changed the thumbnail in between: the images
    # are far apart (no sha256 or pHash match), so both copies, one title twice, were kept.
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(2):
        _shard(src, shard_id, 3)
    rows, schema = shards.read_parquet_rows(str(src / "00001.parquet"))
    rows[2]["video_id"] = "vid00000000"  # 000010002 repeats 000000000's video, its own image
    shards.write_parquet(str(src / "00001.parquet"), rows, schema)
    report = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert [[(m["key"], m["match"]) for m in g] for g in report["groups"]] == [
        [("000000000", "kept"), ("000010002", "same video")]
    ]
    assert report["duplicates"] == report["same_video"] == 1 and report["perceptual"] == 0
    assert report["kept"] == 5 and "000010002" not in _keys(tmp_path / "out")


def test_dedup_filter_output_is_finalized_and_accounts_for_every_sample(tmp_path, capsys):
    # split finalizes its sides; dedup's filtered folder had no sizes.json or __len__, so open_clip
    # (get_dataset_size) could not size it until `finalize` was run by hand. Through the command
    # line: `--shard-size` was split's only ("unrecognized arguments" for dedup).
    from dataset_tools.cli import main

    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 3)
    _plain_shard(src, 1, 3)
    samples = shards.read_tar(str(src / "00001.tar"))
    samples["000010001"]["jpg"] = shards.read_tar(str(src / "00000.tar"))["000000001"]["jpg"]
    shards.write_tar(str(src / "00001.tar"), samples.items())
    out = tmp_path / "out"
    assert main(["dedup", str(src), "--filter-output", str(out), "--shard-size", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 6 == report["kept"] + report["duplicates"] and report["duplicates"] == 1
    sizes = json.loads((out / "sizes.json").read_text())
    assert sizes == {"00000.tar": 2, "00001.tar": 2, "00002.tar": 1}
    assert (out / "__len__").read_text().strip() == "5"
    assert json.loads((out / "manifest.json").read_text())["brace"] == "{00000..00002}.tar"
    assert len(_keys(out)) == 5


def _two_builds_in_one_folder(tmp_path):
    """Shard 00000 of one build and shard 00000 of another copied in as 00001: same keys."""
    src, other = tmp_path / "src", tmp_path / "other"
    src.mkdir()
    other.mkdir()
    _shard(src, 0, 3)
    _shard(other, 0, 3)
    rows, schema = shards.read_parquet_rows(str(other / "00000.parquet"))
    for row in rows:
        row["video_id"] = "other-" + row["video_id"]
    shards.write_parquet(str(other / "00000.parquet"), rows, schema)
    for suffix in (".tar", ".parquet", "_stats.json"):
        os.rename(other / f"00000{suffix}", src / f"00001{suffix}")
    return src


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_split_and_dedup_refuse_one_key_in_two_shards_before_writing(tmp_path, command):
    # split wrote both copies of a key into one output shard (readers keep one), then finalize
    # refused that shard telling the user to rerun a build; dedup merged the two samples as one key.
    src = _two_builds_in_one_folder(tmp_path)
    out = tmp_path / "out"
    args = {"split": ["--output", str(out), "--by", "hash"], "dedup": ["--filter-output", str(out)]}[command]
    with pytest.raises(SystemExit) as err:
        main([command, str(src), *args])
    message = str(err.value.code)
    assert f"refusing to {command}: 3 sample key(s) are in more than one shard" in message
    assert "000000000 in 00000.tar and 00001.tar" in message and "\n" not in message
    assert not out.exists()
    os.rename(src / "00001.tar", src / "00005.tar")  # keys still repeated under another name
    os.rename(src / "00001.parquet", src / "00005.parquet")
    os.rename(src / "00001_stats.json", src / "00005_stats.json")
    with pytest.raises(SystemExit, match="000000000 in 00000.tar and 00005.tar"):
        main([command, str(src), *args])
