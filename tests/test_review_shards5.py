"""split, dedup and vocab on the same real shards: a tar with bytes after its end-of-archive blocks
is refused as trailing data (not "truncated"), as ``inspect --verify`` words it; the three count the
same samples (``samples``: every tar sample, one with no successful parquet row or an unreadable
``.json`` too), vocab's tags include a tar-only sample's, and vocab refuses a damaged tar in one
line as split and dedup do.

Runtime: ~6 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from dataset_tools import dedup, shards, split, vocab
from dataset_tools.fake_host import render_thumbnail

SCHEMA = pa.schema(
    [("key", pa.string()), ("status", pa.string()), ("error_message", pa.string()), ("tags", pa.string())]
)


def _members(key: str, meta: bytes, image: bool = True) -> dict[str, bytes]:
    members = {"txt": b"a title", "json": meta}
    if image:
        members["jpg"] = render_thumbnail(key, "mqdefault")
    return members


def _shard(folder: str, shard_id: int, n: int, tar_only=()) -> None:
    """Shard ``shard_id``: ``n`` samples tagged "a,b" with successful parquet rows, one failed row,
    and the ``(key, members)`` of ``tar_only`` in the tar alone (stats count them: a whole shard)."""
    samples, rows = [], []
    for i in range(n):
        key = f"{shard_id:05d}{i:04d}"
        samples.append((key, _members(key, json.dumps({"key": key, "tags": "a,b"}).encode())))
        rows.append({"key": key, "status": "success", "tags": "a,b"})
    rows.append({"key": f"{shard_id:05d}9999", "status": "failed_to_download", "error_message": "404"})
    shards.write_tar(os.path.join(folder, f"{shard_id:05d}.tar"), samples + list(tar_only))
    shards.write_parquet(os.path.join(folder, f"{shard_id:05d}.parquet"), rows, SCHEMA)
    stats = shards.stats_from_rows(rows, 0.0, 1.0)
    stats["successes"] += len(tar_only)
    shards.write_stats(folder, shard_id, stats)


def _folder(tmp_path, image: bool = True) -> str:
    """Shard 0: 3 samples; shard 1: 2, plus one tar-only sample tagged "a,c" (with an image or
    not) and one whose .json does not parse. 7 samples, 2 failed rows."""
    src = str(tmp_path / "src")
    os.makedirs(src)
    _shard(src, 0, 3)
    tar_only = [
        ("000018888", _members("000018888", b'{"key": "000018888", "tags": "a,c"}', image=image)),
        ("000017777", _members("000017777", b"{not json")),
    ]
    _shard(src, 1, 2, tar_only)
    return src


def _run(command: str, src: str, tmp_path) -> dict:
    if command == "split":
        return split.split(src, str(tmp_path / "split"), by="hash")
    if command == "dedup":
        return dedup.dedup(src, report_path=str(tmp_path / "dedup.json"))
    return vocab.build_vocab(src, min_count=1)


@pytest.mark.parametrize("command", ["split", "dedup", "vocab"])
def test_a_tar_with_trailing_data_is_refused_as_such_not_as_truncated(tmp_path, command):
    # split and dedup said "not a whole number of 512-byte tar blocks (truncated)" of a whole
    # archive with bytes appended, while inspect --verify named the trailing data.
    src = _folder(tmp_path)
    with open(os.path.join(src, "00000.tar"), "ab") as f:
        f.write(b"garbage\n")
    with pytest.raises(SystemExit) as err:
        _run(command, src, tmp_path)
    message = str(err.value)
    assert "00000.tar: 8 bytes of trailing data after the end of the archive" in message
    assert "truncated" not in message and "\n" not in message
    assert f"then {command} again" in message


def test_split_dedup_and_vocab_count_the_same_samples(tmp_path):
    # vocab read only the parquets' successful rows: 5 samples where split and dedup read 7 (two
    # are in the tars alone), so the tag "c" that training reads from one of them had no entry,
    # and vocab did not say how many samples it read.
    src = _folder(tmp_path)
    split_result = _run("split", src, tmp_path)
    dedup_report = _run("dedup", src, tmp_path)
    vocab_result = _run("vocab", src, tmp_path)
    assert split_result["train"] + split_result["val"] == 7
    assert dedup_report["samples"] == vocab_result["samples"] == 7
    assert vocab_result["failures"] == 2  # the failed parquet rows: no samples, left out
    counts = {t["name"]: t["count"] for t in vocab_result["tags"]}
    assert counts == {"a": 6, "b": 5, "c": 1}


def test_a_sample_without_an_image_is_counted_by_split_and_vocab_and_named_by_dedup(tmp_path):
    src = _folder(tmp_path, image=False)
    split_result = _run("split", src, tmp_path)
    assert split_result["train"] + split_result["val"] == _run("vocab", src, tmp_path)["samples"] == 7
    with pytest.raises(SystemExit) as err:
        _run("dedup", src, tmp_path)
    assert "sample 000018888 has no image" in str(err.value) and "\n" not in str(err.value)


def test_vocab_refuses_a_cut_tar_as_split_and_dedup_do(tmp_path):
    # vocab read the parquets alone: a tar cut short (samples training never sees) gave a
    # vocabulary without a word, where split and dedup refuse the folder.
    src = _folder(tmp_path)
    tar = os.path.join(src, "00001.tar")
    with open(tar, "r+b") as f:
        f.truncate(os.path.getsize(tar) // 2 + 100)
    for command in ("split", "dedup", "vocab"):
        with pytest.raises(SystemExit) as err:
            _run(command, src, tmp_path)
        assert f"refusing to {command}: 00001.tar:" in str(err.value) and "truncated" in str(err.value)
