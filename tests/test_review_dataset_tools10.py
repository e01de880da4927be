"""Review of dataset_tools (10): a `dedup --filter-output` killed after staging its shards (while
moving them into OUT, or before `sizes.json`) is finished by the rerun with the same settings, and
refused in one line giving the earlier settings otherwise; the report's numbers agree with OUT.

Runtime: ~6 s (real shards written with the dataset tools' own writers, a real SIGKILL in a child).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_faults_dataset_tools import SCHEMA, _shard

from dataset_tools import dedup, shards
from dataset_tools.cli import main

# Runs dedup --filter-output in a child that SIGKILLs itself after staging every shard: in the
# middle of moving them into OUT ("while_publishing"), or once they are all there ("before_finalize").
_KILLED_DEDUP = """
import os, signal, sys
from dataset_tools import dedup, reshard

src, out, where = sys.argv[1:]

def publish_one_file_then_die(sink):
    os.replace(os.path.join(sink.staging, "00000.tar"), os.path.join(sink.folder, "00000.tar"))
    os.kill(os.getpid(), signal.SIGKILL)

if where == "while_publishing":
    reshard.ShardSink.publish = publish_one_file_then_die
else:
    dedup.finalize_mod.finalize = lambda folder: os.kill(os.getpid(), signal.SIGKILL)
dedup.dedup(src, filter_output=out, shard_size=3)
"""


def _kill_a_dedup(src, out, where: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", _KILLED_DEDUP, str(src), str(out), where],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr


def _copy_of_shard(folder, source_id: int, shard_id: int) -> None:
    """Shard ``shard_id`` holding shard ``source_id``'s samples under new keys: the same videos and
    images again (a trending export downloaded twice), so every one of them is a duplicate."""
    source, name = shards.shard_name(source_id), shards.shard_name(shard_id)
    samples = sorted(shards.read_tar(os.path.join(folder, f"{source}.tar")).items())
    rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{source}.parquet"))
    renamed = {key: name + key[len(source) :] for key, _ in samples}
    shards.write_tar(os.path.join(folder, f"{name}.tar"), [(renamed[k], m) for k, m in samples])
    rows = [{**row, "key": renamed[row["key"]]} for row in rows]
    shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, SCHEMA)
    shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))


def _input(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _shard(src, 0, 4)
    _shard(src, 1, 4)
    _copy_of_shard(src, 0, 2)
    return src


def _keys(folder) -> set[str]:
    return {k for n in shards.iter_shard_names(str(folder)) for k in shards.read_tar(f"{folder}/{n}.tar")}


@pytest.mark.parametrize("where", ["before_finalize", "while_publishing"])
def test_a_dedup_filter_killed_after_staging_is_finished_by_the_rerun(tmp_path, where):
    # Killed before finalize, OUT had every shard but no sizes.json/__len__/manifest.json (the
    # trainer and open_clip size the folder from them); killed while moving the shards in, it held
    # a tar of one of them. The rerun refused OUT as "not empty" either way.
    src, out, reference = _input(tmp_path), tmp_path / "out", tmp_path / "reference"
    expected = dedup.dedup(str(src), str(tmp_path / "ref.json"), filter_output=str(reference), shard_size=3)
    assert expected["kept"] == 8 and expected["duplicates"] == 4
    _kill_a_dedup(src, out, where)
    assert not (out / "sizes.json").exists()
    report = dedup.dedup(str(src), filter_output=str(out), shard_size=3)
    assert report["kept"] == expected["kept"] and report["groups"] == expected["groups"]
    assert _keys(out) == _keys(reference)
    assert json.loads((out / "sizes.json").read_text()) == json.loads((reference / "sizes.json").read_text())
    assert (out / "__len__").read_text() == "8\n" and (out / "manifest.json").exists()
    assert sorted(os.listdir(out / "_build")) == ["lock"]  # nothing staged, no marker left


def test_a_killed_dedup_filter_rerun_with_other_settings_is_one_line(tmp_path, capsys):
    src, out = _input(tmp_path), tmp_path / "out"
    _kill_a_dedup(src, out, "before_finalize")
    with pytest.raises(SystemExit) as exc:
        main(["dedup", str(src), "--filter-output", str(out), "--shard-size", "5"])
    message = str(exc.value)
    assert "stopped before it finished" in message and "--shard-size 3" in message and "\n" not in message
    assert f"--filter-output {out}" in message
    assert not (out / "sizes.json").exists()  # nothing finished with settings the user did not ask for
    assert main(["dedup", str(src), "--filter-output", str(out), "--shard-size", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["kept"] == 8
    assert (out / "__len__").read_text() == "8\n"


def test_a_shard_completed_while_dedup_hashes_stays_out_of_the_report_and_the_output(tmp_path, monkeypatch):
    # A build still writing the folder completes shard 00003 (skipped as incomplete, so said) while
    # dedup hashes the others: its samples went into OUT unchecked for duplicates (here, each one
    # repeats a sample of 00001) and uncounted, so OUT held more than samples - duplicates.
    src, out = _input(tmp_path), tmp_path / "out"
    _copy_of_shard(src, 1, 3)
    stats = src / "00003_stats.json"
    stats_text = stats.read_text()
    stats.unlink()
    phash = dedup.imagehash.phash

    def phash_while_the_build_completes_a_shard(img):
        stats.write_text(stats_text)
        return phash(img)

    monkeypatch.setattr(dedup.imagehash, "phash", phash_while_the_build_completes_a_shard)
    report = dedup.dedup(str(src), filter_output=str(out), shard_size=3)
    assert report["skipped_incomplete_shards"] == ["00003"]
    assert report["kept"] == report["samples"] - report["duplicates"] == 8
    assert (out / "__len__").read_text() == "8\n"
    assert not any(key.startswith("00003") for key in _keys(out))
