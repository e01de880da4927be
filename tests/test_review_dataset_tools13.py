"""split and dedup --filter-output given an output they cannot write where asked (a file, a path under
a file, a report inside the filtered folder): one line saying what to pass, before anything is
hashed or written, and the input untouched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_dataset_tools_subcommands import _keys
from test_faults_dataset_tools import _shard

from dataset_tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source(tmp_path) -> str:
    src = tmp_path / "src"
    src.mkdir()
    for shard_id in range(2):
        _shard(src, shard_id, 3)
    return str(src)


def _files(folder: str) -> dict[str, int]:
    return {name: os.path.getsize(os.path.join(folder, name)) for name in sorted(os.listdir(folder))}


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dataset_tools", *args], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("where", ["split_output_is_a_file", "split_train_is_a_file", "dedup_under_a_file"])
def test_an_output_that_is_or_lies_under_a_file_is_one_line(tmp_path, where):
    # A NotADirectoryError traceback out of the publishing-marker check (split --output videos.csv,
    # an OUT/train left as a file, --filter-output under a file).
    src = _source(tmp_path)
    before = _files(src)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    if where == "split_output_is_a_file":
        args, named = ["split", src, "--output", str(notes)], str(notes)
    elif where == "split_train_is_a_file":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "train").write_text("x")
        args, named = ["split", src, "--output", str(tmp_path / "out")], str(tmp_path / "out" / "train")
    else:
        args, named = ["dedup", src, "--filter-output", str(notes / "dedup")], str(notes)
    proc = _run_cli(*args)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"{named} is a file, not a folder" in proc.stderr
    assert _files(src) == before and notes.read_text() == "not a folder"


def test_dedup_refuses_a_report_inside_its_filter_output_before_hashing(tmp_path):
    # The report was written into OUT after every sample was hashed, then OUT was refused as
    # "not empty" (an earlier run's shards?): the run was lost and each rerun refused the same way.
    src = _source(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        main(["dedup", src, "--report", str(out / "report.json"), "--filter-output", str(out)])
    message = str(err.value.code)
    assert "--report" in message and "inside --filter-output" in message and "\n" not in message
    assert not out.exists()  # nothing hashed into a report, no folder made
    assert main(["dedup", src, "--report", str(tmp_path / "report.json"), "--filter-output", str(out)]) == 0
    assert _keys(out) == _keys(src) and (out / "sizes.json").exists()


def test_dedup_refuses_a_report_under_a_file_in_one_line(tmp_path):
    # os.makedirs of the report's folder raised NotADirectoryError (a traceback) after the hashing.
    src = _source(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a folder")
    proc = _run_cli("dedup", src, "--report", str(notes / "dedup.json"))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert f"--report {notes / 'dedup.json'}: {notes} is a file, not a folder" in proc.stderr
