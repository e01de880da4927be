"""Review of dataset_tools (12): `finalize` refuses a stats file without sample counts in one line
(it was a KeyError traceback); `inspect --verify` groups a tar's members into samples as the trainer
does: keys of different lengths sorted by key pass, a sample split by another one is named, and
upper-case extensions are read as the trainer reads them (real shards, the trainer's own reader).

Runtime: ~2 s.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest
from test_dataset_tools_subcommands import PLAIN_SCHEMA, _plain_shard

from dataset_tools import shards
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail
from vutrain.data.samples import decode_meta, decode_text, iter_raw_samples


@pytest.mark.parametrize("stats", [{}, [], {"successes": "3", "count": 3}, {"successes": 3}])
def test_finalize_refuses_stats_without_counts_in_one_line(tmp_path, stats):
    # complete_shards takes any stats file that parses: `{}` was a KeyError traceback, `[]` a TypeError.
    _plain_shard(tmp_path, 0, 3)
    _plain_shard(tmp_path, 1, 2)
    (tmp_path / "00001_stats.json").write_text(json.dumps(stats))
    with pytest.raises(SystemExit) as exc:
        main(["finalize", str(tmp_path)])
    message = str(exc.value)
    assert "00001_stats.json" in message and "not a build stats file" in message and "\n" not in message
    assert "run the same build again" in message
    assert not (tmp_path / "sizes.json").exists()


def _shard_of_keys(folder, keys: list[str], order: list[tuple[str, str]] | None = None, ext_case=str):
    """Shard 00000 holding ``keys``; ``order``: the tar's (key, ext) members in that order instead
    of sorted by key; ``ext_case`` spells the text members' extensions."""
    rows = [
        {"key": k, "status": "success", "url": f"http://h/{k}.jpg", "caption": "c", "tags": ""} for k in keys
    ]
    members = {
        r["key"]: {
            "jpg": render_thumbnail(r["key"], "mqdefault"),
            ext_case("txt"): b"c",
            ext_case("json"): json.dumps(r).encode(),
        }
        for r in rows
    }
    tar = os.path.join(folder, "00000.tar")
    if order is None:
        shards.write_tar(tar, list(members.items()))
    else:
        with tarfile.open(tar, "w", format=tarfile.USTAR_FORMAT) as out:
            for key, ext in order:
                data = members[key][ext]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    shards.write_parquet(os.path.join(folder, "00000.parquet"), rows, PLAIN_SCHEMA)
    shards.write_stats(str(folder), 0, shards.stats_from_rows(rows, 0.0, 1.0))
    return tar


def test_verify_passes_keys_of_different_lengths_sorted_by_key(tmp_path, capsys):
    # write_tar puts a.txt before a-b.jpg; by whole names "-" sorts before ".", so --verify called
    # this shard "members not sorted by key" (exit 1) although the trainer reads both samples whole.
    tar = _shard_of_keys(tmp_path, ["a", "a-b"])
    assert [raw["__key__"] for raw in iter_raw_samples(tar)] == ["a", "a-b"]
    assert main(["inspect", str(tmp_path), "--verify"]) == 0, capsys.readouterr().out
    assert "verify: OK" in capsys.readouterr().out


def test_verify_names_a_sample_whose_members_are_split(tmp_path, capsys):
    order = [("a", "jpg"), ("b", "jpg"), ("b", "json"), ("b", "txt"), ("a", "json"), ("a", "txt")]
    tar = _shard_of_keys(tmp_path, ["a", "b"], order)
    assert [raw["__key__"] for raw in iter_raw_samples(tar)] == ["a", "b", "a"]  # the trainer: 3 samples
    assert main(["inspect", str(tmp_path), "--verify"]) == 1
    out = capsys.readouterr().out
    assert "members of sample(s) ['a'] are not next to each other" in out, out


def test_verify_reads_upper_case_extensions_as_the_trainer_does(tmp_path, capsys):
    # The trainer lower-cases extensions and reads K.TXT as the caption; --verify said "lacks ['txt']".
    tar = _shard_of_keys(tmp_path, ["k0", "k1"], ext_case=str.upper)
    for raw in iter_raw_samples(tar):
        assert decode_text(raw, "txt") == "c" and decode_meta(raw)["key"] == raw["__key__"]
    assert main(["inspect", str(tmp_path), "--verify"]) == 0, capsys.readouterr().out
    assert "verify: OK" in capsys.readouterr().out
