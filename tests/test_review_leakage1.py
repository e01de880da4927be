"""Validation shards that are also training shards: train.py's start-up shard check warns once
(rank 0), naming how many and the first, and stays quiet for disjoint lists (the demo's data)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from tar_shards import image_bytes, write_members

from vutrain import demo
from vutrain.config import load_config
from vutrain.train import check_shard_lists

# Not train_runner's (importing it marks every test here slow): only the last test starts a process.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "vutrain", "configs", "tiny.yaml")
TRAIN = os.path.join(REPO, "vutrain", "train.py")
WARNING = "val shards are also training shards"


@pytest.fixture
def shard_dir(tmp_path):
    """tmp_path/data/00000..00009.tar (real tars of one sample each) and tmp_path/link -> data."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        write_members(data / f"{i:05d}.tar", [(f"{i}.jpg", image_bytes()), (f"{i}.txt", b"a caption")])
    os.symlink(data, tmp_path / "link")
    return tmp_path


def _warnings(caplog, train: str, val: str, log_warnings: bool = True) -> list[str]:
    cfg = load_config(TINY, [f"data.train_shards={train}", f"data.val_shards={val}"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vutrain"):
        check_shard_lists(cfg, log_warnings=log_warnings)
    return [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]


def test_a_val_range_inside_the_train_range_is_warned_of_once(shard_dir, caplog):
    d = shard_dir / "data"
    found = _warnings(caplog, f"{d}/{{00000..00009}}.tar", f"{d}/{{00008..00009}}.tar")
    assert found == [
        f"data.val_shards: 2 of 2 val shards are also training shards (first: {d}/00008.tar): eval "
        "metrics will be measured on training data; hold out shards data.train_shards does not name "
        "(split the data, e.g. python -m dataset_tools split)"
    ]


def test_other_spellings_of_the_same_shard_are_found(shard_dir, caplog, monkeypatch):
    """A symlinked folder, `./`, file:// and `::`-joined sources name the same files."""
    monkeypatch.chdir(shard_dir)
    train = "data/{00000..00003}.tar::file://" + str(shard_dir / "data" / "{00004..00007}.tar")
    found = _warnings(caplog, train, "./link/{00006..00009}.tar::link/00000.tar")
    assert len(found) == 1
    assert "3 of 5 val shards are also training shards (first: ./link/00006.tar)" in found[0]


def test_the_same_spec_twice_counts_each_shard_once(shard_dir, caplog):
    spec = f"{shard_dir}/data/{{00000..00004}}.tar"
    found = _warnings(caplog, spec, f"{spec}::{spec}")  # a repeated val source is no extra shard
    assert len(found) == 1 and "5 of 5 val shards" in found[0]


def test_disjoint_lists_and_other_ranks_say_nothing(shard_dir, caplog):
    d = shard_dir / "data"
    assert _warnings(caplog, f"{d}/{{00000..00007}}.tar", f"{d}/{{00008..00009}}.tar") == []
    # A rank other than 0 checks the same lists without logging (rank 0 says it once).
    assert _warnings(caplog, f"{d}/{{00000..00009}}.tar", f"{d}/00009.tar", log_warnings=False) == []


def test_urls_compare_as_written(shard_dir, caplog):
    train = f"{shard_dir}/data/00000.tar::https://host/{{0..3}}.tar"
    assert len(_warnings(caplog, train, "https://host/3.tar")) == 1
    assert _warnings(caplog, train, "https://host/4.tar::https://other/3.tar") == []


def test_the_demo_data_is_not_warned_of(tmp_path, caplog):
    """`make demo` writes train/ and val/ apart: its overrides on tiny.yaml give no warning."""
    train, val = demo.write_data(str(tmp_path), num_samples=64, val_samples=16, shard_size=16, seed=0)
    assert _warnings(caplog, train, val) == []
    # tiny.yaml's own lists (what `make demo` writes) are disjoint too, spelled as written.
    cfg = load_config(TINY)
    assert not set(cfg.data.val_shards.split("::")) & set(cfg.data.train_shards.split("::"))


@pytest.mark.slow
def test_train_py_start_up_warns_once(shard_dir):
    """A real start-up through train.py: the warning comes once, before the run stops at a config
    error found right after the shard check (model.image_size below the patch: no training)."""
    spec = f"{shard_dir}/data/{{00000..00009}}.tar"
    proc = subprocess.run(
        [sys.executable, TRAIN, "--config", TINY, f"data.train_shards={spec}"]
        + [f"data.val_shards={shard_dir}/link/00009.tar", "model.image_size=4"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (REPO, os.environ.get("PYTHONPATH"))))),
        cwd=str(shard_dir),
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count(WARNING) == 1, proc.stderr
    assert "1 of 1 val shards" in proc.stderr and "model.image_size=4" in proc.stderr
