"""Review 10 of numbers users type and read: number keys written in other scripts' digits or with
misplaced underscores (run files and overrides alike), and the sample totals that `split` and `vocab`
report (`split`'s JSON gained `samples`, `vocab`'s printed line the samples and failed rows).

Runtime: ~5 s on 2 busy cores.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pytest

from dataset_tools import shards, split
from dataset_tools.cli import main
from dataset_tools.fake_host import render_thumbnail
from vutrain.config import ConfigError, build_config


def _both_ways(tmp_path, key: str, text: str):
    """The value of `key` read from the override `key=text` and from a run file holding `text`;
    a ConfigError's message in place of a value."""
    section, _, leaf = key.rpartition(".")
    run_file = tmp_path / "run.yaml"
    run_file.write_text(f"{section}:\n  {leaf}: {text}\n" if section else f"{leaf}: {text}\n")
    values = []
    for path, overrides in ((None, [f"{key}={text}"]), (str(run_file), [])):
        try:
            value = build_config(path, overrides)
            for part in key.split("."):
                value = getattr(value, part)
        except ConfigError as err:
            value = str(err)
        values.append(value)
    return values


@pytest.mark.parametrize(
    "key,text",
    [
        ("seed", "٣"),  # Arabic-Indic three: it was 3
        ("train.max_steps", "１２"),  # full-width twelve: it was 12
        ("seed", "1٣"),  # it was 13
        ("train.lr", "٣e-4"),  # it was 0.0003
        ("train.lr", "１.５e-4"),
    ],
)
def test_a_number_key_refuses_digits_beyond_ascii_in_run_files_and_overrides(tmp_path, key, text):
    """Python's int() and float() read any script's digits, so these trained with a number that
    YAML 1.2, JSON and the shell read as text; now one config error naming the key and the value."""
    kind = "an integer" if key != "train.lr" else "a number"
    want = f"{key} must be {kind} written with the ASCII digits 0-9, got {text!r}"
    assert _both_ways(tmp_path, key, text) == [want, want]


@pytest.mark.parametrize(
    "key,text,kind",
    [
        ("seed", "1_", "an integer"),  # it was 1
        ("train.max_steps", "1__0", "an integer"),  # it was 10
        ("train.lr", "1_.5", "a number"),  # it was 1.5
        ("train.lr", "1._5", "a number"),
    ],
)
def test_a_misplaced_underscore_is_refused_in_run_files_and_overrides(tmp_path, key, text, kind):
    """YAML 1.1's pattern took underscores anywhere and dropped them, where Python's int() and
    float() take one between two digits only: the same text quoted, or after a leading zero, was
    refused, while `train.max_steps=1_` trained 1 step."""
    want = f"{key} must be {kind}, got {text!r}"
    assert _both_ways(tmp_path, key, text) == [want, want]


@pytest.mark.parametrize(
    "key,text,expected",
    [
        ("train.max_steps", "1_000", 1000),
        ("train.max_steps", " +5 ", 5),
        ("train.max_steps", "0x10", 16),
        ("train.max_steps", "1e3", 1000),
        ("train.lr", "1_000.5", 1000.5),
        ("train.lr", ".5e-3", 0.0005),
        ("train.lr", "1.", 1.0),
    ],
)
def test_numbers_in_ascii_keep_their_values(tmp_path, key, text, expected):
    assert _both_ways(tmp_path, key, text) == [expected, expected]


SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("status", pa.string()),
        ("error_message", pa.string()),
        ("video_id", pa.string()),
        ("title", pa.string()),
        ("channel_id", pa.string()),
        ("tags", pa.string()),
    ]
)


def _shards(folder, samples: int, failed: int, per_shard: int = 3) -> None:
    """Shards of `samples` samples (two channels, one tag each) and, in the first shard's parquet,
    `failed` failed rows that have no sample."""
    folder.mkdir()
    for shard_id, start in enumerate(range(0, samples, per_shard)):
        name = shards.shard_name(shard_id)
        members, rows = [], []
        for i in range(start, min(start + per_shard, samples)):
            key, vid = f"{name}{i:04d}", f"vid{i:08d}"
            meta = {"key": key, "video_id": vid, "title": f"t{i}", "channel_id": f"UC{i % 2}", "tags": "cat"}
            files = {
                "jpg": render_thumbnail(vid, "mqdefault"),
                "txt": b"t",
                "json": json.dumps(meta).encode(),
            }
            members.append((key, files))
            rows.append({**meta, "status": "success"})
        if shard_id == 0:
            rows += [
                {"key": f"{name}9{i:03d}", "status": "failed_to_download", "error_message": "HTTP 404"}
                for i in range(failed)
            ]
        shards.write_tar(os.path.join(folder, f"{name}.tar"), members)
        shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
        shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))


def test_split_reports_the_samples_it_read_as_dedup_and_vocab_do(tmp_path, capsys):
    """The result had train and val but no total: a reader summed them to compare with dedup's or
    vocab's `samples` of the same folder."""
    _shards(tmp_path / "src", samples=7, failed=2)
    assert main(["split", str(tmp_path / "src"), "--output", str(tmp_path / "out"), "--by", "hash"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 7 == result["train"] + result["val"]
    by_channel = split.split(str(tmp_path / "src"), str(tmp_path / "by_channel"), val_fraction=0.5)
    assert by_channel["samples"] == 7 == by_channel["train"] + by_channel["val"]


def test_vocab_prints_the_samples_and_failed_rows_of_its_result(tmp_path, capsys):
    """It printed "1 tags, 0 categories -> PATH" only: a vocabulary of part of a folder, or of a
    folder of failures, read like any other."""
    _shards(tmp_path / "src", samples=5, failed=2)
    out = tmp_path / "vocab.json"
    assert main(["vocab", str(tmp_path / "src"), "--output", str(out), "--min-count", "1"]) == 0
    line = capsys.readouterr().out.strip()
    result = json.loads(out.read_text())
    assert (result["samples"], result["failures"], len(result["tags"])) == (5, 2, 1)
    assert line == f"1 tags, 0 categories from 5 samples (2 failed rows left out) -> {out}"
