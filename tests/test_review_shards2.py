"""Review of shard discovery (shards, reshard, finalize): tars not named ``NNNNN.tar``
(``shard-00001.tar``, ``00002.TAR``, ``00003.tar.gz``) are named on stderr and in the result of
split, dedup and vocab, and in finalize's manifest, never left out silently; a shard whose only tar
is misnamed is not called "incomplete (no stats yet)"; a key repeated across shards of two name
widths and two numbers is still refused (real shards, real files).

Runtime: ~4 s on 2 busy cores.
"""

from __future__ import annotations

import gzip
import os
import shutil

import pytest
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, finalize, shards, split, vocab


def _rename_shard(folder, shard_id: int, stem: str, tar_name: str) -> None:
    """Give shard ``shard_id`` of ``folder`` the names ``stem`` (parquet, stats) and ``tar_name``."""
    old = shards.shard_name(shard_id)
    os.rename(folder / f"{old}.tar", folder / tar_name)
    for suffix in (".parquet", "_stats.json"):
        os.rename(folder / f"{old}{suffix}", folder / f"{stem}{suffix}")


def _folder_with_misnamed_shards(tmp_path):
    """00000 (3 samples, named right), then three whole shards of 3 samples, each with its parquet
    and stats, whose tar is not named NNNNN.tar: shard-00001.tar, 00002.TAR, 00003.tar.gz."""
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(4):
        _shard(src, shard_id, 3)
    _rename_shard(src, 1, "shard-00001", "shard-00001.tar")
    _rename_shard(src, 2, "00002", "00002.TAR")
    with open(src / "00003.tar", "rb") as plain, gzip.open(src / "00003.tar.gz", "wb") as packed:
        shutil.copyfileobj(plain, packed)
    os.remove(src / "00003.tar")
    return src


MISNAMED = ["00002.TAR", "00003.tar.gz", "shard-00001.tar"]


@pytest.mark.parametrize("command", ["split", "dedup", "vocab"])
def test_tars_not_named_as_shards_are_named_not_dropped_silently(tmp_path, capsys, command):
    # A whole shard named shard-00001.tar was left out of split, dedup and vocab without a word;
    # 00002.TAR and 00003.tar.gz (with parquet and stats) were called "incomplete shard(s) (no stats
    # yet)" with "run the same build again" as the remedy, which never completes them.
    src = _folder_with_misnamed_shards(tmp_path)
    out = tmp_path / "out"
    if command == "split":
        result = split.split(str(src), str(out), by="hash", val_fraction=0.5)
        assert result["train"] + result["val"] == 3
    elif command == "dedup":
        result = dedup.dedup(str(src), filter_output=str(out))
        assert result["kept"] == 3
    else:
        result = vocab.build_vocab(str(src), min_count=1)
    assert result["skipped_incomplete_shards"] == [] and result["skipped_not_shards"] == MISNAMED
    err = capsys.readouterr().err
    assert "no stats yet" not in err, err
    lines = [line for line in err.splitlines() if "not named as shards" in line]
    assert len(lines) == 1, err
    assert f"{command}: leaving out 3 tar(s) not named as shards" in lines[0]
    assert all(name in lines[0] for name in MISNAMED) and "rename" in lines[0]


def test_finalize_names_tars_not_named_as_shards(tmp_path, capsys):
    # The manifest listed shard-00001.tar as incomplete, with no word why, and 00002.TAR and
    # 00003.tar.gz not at all: sizes.json left their samples out silently.
    src = _folder_with_misnamed_shards(tmp_path)
    manifest = finalize.finalize(str(src))
    assert manifest["num_samples"] == 3 and manifest["brace"] == "00000.tar"
    assert manifest["incomplete"] == MISNAMED
    err = capsys.readouterr().err
    assert "finalize: leaving out 3 tar(s) not named as shards" in err
    assert all(name in err for name in MISNAMED)


def test_a_truly_incomplete_shard_beside_a_misnamed_tar_is_still_called_incomplete(tmp_path, capsys):
    # Only a shard whose one tar is misnamed leaves the "incomplete" list: 00001.tar without stats
    # beside a stray copy 00001.TAR is still a build stopped mid-shard.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3, stats=False)
    shutil.copy(src / "00001.tar", src / "00001.TAR")
    result = split.split(str(src), str(tmp_path / "out"), by="hash", val_fraction=0.5)
    assert result["skipped_incomplete_shards"] == ["00001"] and result["skipped_not_shards"] == ["00001.TAR"]
    err = capsys.readouterr().err
    assert "skipping 1 incomplete shard(s) (no stats yet): 00001." in err
    assert "leaving out 1 tar(s) not named as shards" in err


def test_a_key_in_shards_of_two_widths_and_two_numbers_is_refused(tmp_path):
    # _repeated_keys takes its name width from the first shard: with 00000 beside 000001, a key of
    # 00000 also in 000001 must still be found (every key of a mixed-width folder is checked).
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _shard(src, 1, 3)
    repeated = shards.read_tar(str(src / "00000.tar"))["000000000"]
    samples = shards.read_tar(str(src / "00001.tar"))
    samples["000000000"] = repeated
    shards.write_tar(str(src / "00001.tar"), samples.items())
    stats = shards.stats_from_rows([{"status": "success"}] * 4, 0.0, 1.0)
    shards.write_stats(str(src), 1, stats)
    _rename_shard(src, 1, "000001", "000001.tar")
    with pytest.raises(SystemExit) as exc:
        dedup.dedup(str(src), filter_output=str(tmp_path / "out"))
    assert "000000000 in 00000.tar and 000001.tar" in str(exc.value)
    assert not (tmp_path / "out").exists()
