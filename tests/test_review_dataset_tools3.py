"""Review of split and dedup --filter-output over mixed folders: build shards beside plain
img2dataset shards (tags a list in one, a string in the other), and tar samples whose parquet has
no successful row. Real shards, real pyarrow, the CLI entry point."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from test_dataset_tools_subcommands import _keys, _plain_shard
from test_faults_dataset_tools import SCHEMA, _shard

from dataset_tools import dedup, inspect_shards, shards, split
from dataset_tools.vocab import tag_values


def _run(command: str, src, out, shard_size: int = 100) -> list:
    """Run ``command`` on ``src`` into ``out``, every input sample accounted for; the output folders."""
    if command == "split":
        result = split.split(str(src), str(out), by="hash", val_fraction=0.3, shard_size=shard_size)
        written = result["train"] + result["val"]
    else:
        report = dedup.dedup(str(src), filter_output=str(out), shard_size=shard_size)
        assert report["samples"] == report["kept"] + report["duplicates"]
        written = report["kept"]
    assert written == len(list(_input_samples(src)))
    return [out / "train", out / "val"] if command == "split" else [out]


def _input_samples(src):
    return (k for n in shards.iter_shard_names(str(src)) for k in shards.read_tar(f"{src}/{n}.tar"))


def _output_rows(folders) -> dict[str, dict]:
    """key -> row of every output parquet, read through pyarrow.dataset (one schema or it raises)."""
    rows = {}
    for folder in folders:
        parquets = sorted(str(folder / f) for f in os.listdir(folder) if f.endswith(".parquet"))
        if parquets:
            rows.update({r["key"]: r for r in ds.dataset(parquets, format="parquet").to_table().to_pylist()})
    return rows


def _assert_finalize_and_inspect_agree(folders, samples: int) -> None:
    """sizes.json, __len__, inspect and the tars all count ``samples`` over ``folders``."""
    sized = written = inspected = 0
    for folder in folders:
        if not (folder / "sizes.json").exists():
            continue
        sized += sum(json.loads((folder / "sizes.json").read_text()).values())
        assert int((folder / "__len__").read_text()) == len(_keys(folder))
        written += len(_keys(folder))
        report = inspect_shards.inspect_dir(str(folder), verify=True)
        assert report["corrupt"] == [] and report["failures"] == 0
        inspected += report["successes"]
    assert sized == written == inspected == samples


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_build_and_plain_shards_in_one_folder_keep_one_schema_and_every_tag(tmp_path, command):
    # tags a list in build shards and a string in plain img2dataset ones: a pyarrow traceback
    # ("cannot mix list and non-list") after part of the output was written, or, where the shard
    # boundaries fell between the kinds, output parquets of two schemas pyarrow.dataset refused.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 3)
    _plain_shard(src, 1, 3, tags="Cats, dogs,,x")
    _plain_shard(src, 2, 2, tags="")
    folders = _run(command, src, tmp_path / "out", shard_size=4)
    rows = _output_rows(folders)
    assert len(rows) == 8 == len(set().union(*(_keys(f) for f in folders if f.exists())))
    for key, row in rows.items():
        if key.startswith("00001"):  # the string's parts as they were: joined, it is the string again
            assert row["tags"] == ["Cats", " dogs", "", "x"] and ",".join(row["tags"]) == "Cats, dogs,,x"
            assert tag_values(row["tags"]) == tag_values("Cats, dogs,,x")  # what training reads
        elif key.startswith("00002"):
            assert row["tags"] == []
        else:
            assert row["tags"] == ["a"] and row["video_id"]
    _assert_finalize_and_inspect_agree(folders, 8)


def _shard_with_int_variant(folder) -> None:
    """Shard 00001 like `_shard`'s, but its `variant` column holds integers."""
    _shard(folder, 1, 2)
    rows, _ = shards.read_parquet_rows(str(folder / "00001.parquet"))
    for row in rows:
        row["variant"] = 7
    schema = SCHEMA.set(SCHEMA.get_field_index("variant"), pa.field("variant", pa.int64()))
    shards.write_parquet(str(folder / "00001.parquet"), rows, schema)


@pytest.mark.parametrize("command", ["split", "dedup"])
def test_a_column_of_two_other_types_is_refused_in_one_line_before_writing(tmp_path, command):
    # No faithful conversion from an integer to a variant name: refused up front, naming the
    # column, its two types and shards, where each output shard guessed its own schema.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 2)
    _shard_with_int_variant(src)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        _run(command, src, out)
    message = str(err.value.code)
    assert f"refusing to {command}: column 'variant' is string in 00000.parquet and int64" in message
    assert "00001.parquet" in message and "its own folder" in message and "\n" not in message
    assert not out.exists()


def _drop_parquet_row(folder, name: str, key: str, how: str) -> None:
    """Shard ``name``'s tar keeps sample ``key``; its parquet loses that row (``missing``) or calls
    it a failure (``failed``); its stats are kept as written."""
    rows, schema = shards.read_parquet_rows(str(folder / f"{name}.parquet"))
    if how == "missing":
        rows = [r for r in rows if r["key"] != key]
    for row in rows:
        if row["key"] == key:
            row["status"], row["error_message"] = "failed_to_download", "timeout"
    shards.write_parquet(str(folder / f"{name}.parquet"), rows, schema)


@pytest.mark.parametrize("how", ["missing", "failed"])
@pytest.mark.parametrize("command", ["split", "dedup"])
def test_a_tar_sample_without_a_successful_parquet_row_is_written_as_a_success(tmp_path, command, how):
    # Its row fell back to its .json, which a build writes without a status: KeyError 'status'
    # out of the output stats, after part of the output was written.
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 4)
    _drop_parquet_row(src, "00000", "000000002", how)
    folders = _run(command, src, tmp_path / "out")
    rows = _output_rows(folders)
    assert set(rows) == {f"00000000{i}" for i in range(4)}
    assert rows["000000002"]["status"] == "success" and rows["000000002"]["video_id"] == "vid00000002"
    _assert_finalize_and_inspect_agree(folders, 4)
