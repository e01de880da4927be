"""Review of split, dedup and vocab results and arguments: tars not named ``NNNNN.tar`` are listed
in ``skipped_not_shards``, apart from the incomplete shards of ``skipped_incomplete_shards``; a
``--shard-size`` below 1 is refused before any input is read or output created (real shards, real
files).

Runtime: ~4 s on 2 busy cores.
"""

from __future__ import annotations

import os

import pytest
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, split, vocab


def _folder_with_incomplete_and_misnamed(tmp_path):
    """00000 whole (3 samples); 00001 without stats (a build stopped mid-shard); 00002 whole but
    with its tar named 00002.TAR (a rename, not a rebuild, completes it)."""
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3, stats=False)
    _shard(src, 2, 3)
    os.rename(src / "00002.tar", src / "00002.TAR")
    return src


@pytest.mark.parametrize("command", ["split", "dedup", "vocab"])
def test_misnamed_tars_are_reported_apart_from_incomplete_shards(tmp_path, command):
    # Both went into skipped_incomplete_shards ("00001" beside "00002.TAR"): a reader of the result
    # could not tell a shard waiting for its build from a tar that only needs renaming.
    src = _folder_with_incomplete_and_misnamed(tmp_path)
    if command == "split":
        result = split.split(str(src), str(tmp_path / "out"), by="hash", val_fraction=0.5)
        assert result["train"] + result["val"] == 3
    elif command == "dedup":
        result = dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
        assert result["kept"] == 3
    else:
        result = vocab.build_vocab(str(src), min_count=1)
    assert result["skipped_incomplete_shards"] == ["00001"]
    assert result["skipped_not_shards"] == ["00002.TAR"]


def test_split_with_shard_size_zero_is_refused_before_creating_output(tmp_path):
    # ShardSink refused it only after every tar was checked and both outputs were claimed: OUT/train
    # and OUT/val were left behind holding a lock file.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="--shard-size 0: must be at least 1"):
        split.split(str(src), str(out), by="hash", val_fraction=0.5, shard_size=0)
    assert not out.exists()


def test_dedup_filter_with_shard_size_zero_is_refused_before_hashing(tmp_path):
    # It was refused after every image was hashed: the report was written and --filter-output
    # was left holding a lock file.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    out, report = tmp_path / "out", tmp_path / "report.json"
    with pytest.raises(SystemExit, match="--shard-size 0: must be at least 1"):
        dedup.dedup(str(src), report_path=str(report), filter_output=str(out), shard_size=0)
    assert not report.exists() and not out.exists()
