"""The training stream's loader workers under a long TMPDIR (a cluster's per-job scratch folder).

A worker hands each batch's tensors over an AF_UNIX socket in multiprocessing's temp folder; under
a TMPDIR longer than about 75 characters the socket path passed the kernel's 107-byte limit, the
bind failed in the worker's queue feeder thread, which printed it and dropped the batch, and the
stream waited for it forever. This hung `python -m vutrain.bench data` in CI, whose tests run under
pytest-xdist's longer tmp_path (diagnosed with py-spy: the trainer in the DataLoader's queue get,
the worker waiting for its next index, `OSError: AF_UNIX path too long` on its stderr).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from multiprocessing import process

import pytest

from vutrain.bench_data import write_thumbnail_shards
from vutrain.data import worker_tempdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STREAM = """
import sys, torch
from vutrain.data.preprocess import make_fast_preprocess
from vutrain.data.webdataset import TrainStream

def tokenize(captions):
    return {"input_ids": torch.zeros(len(captions), 4, dtype=torch.long)}

processor = {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}
stream = TrainStream(sys.argv[1], preprocess=make_fast_preprocess(processor), tokenize=tokenize,
    batch_size=4, rank=0, world_size=1, num_workers=1, seed=0, caption_template="{title}",
    shuffle_buffer=4, resampled=True, num_samples=10**9, prefetch_factor=2, pin_memory=False)
shapes = [tuple(next(stream)["pixel_values"].shape) for _ in range(3)]
stream.close()
print("batches", shapes)
"""


def _long_tmpdir(tmp_path) -> str:
    folder = tmp_path / ("scratch-of-a-cluster-job-" + "x" * 60)
    folder.mkdir()
    assert len(str(folder)) > worker_tempdir.SOCKET_PATH_MAX - 32
    return str(folder)


def test_a_stream_under_a_long_tmpdir_delivers_its_batches(tmp_path):
    """Batches arrive under a TMPDIR of 100+ characters (they never did: a 90 s timeout here),
    with one warning naming the short folder the workers use instead."""
    spec = write_thumbnail_shards(str(tmp_path / "shards"), 24, 64, 48, shard_size=24)
    proc = subprocess.run(
        [sys.executable, "-c", STREAM, spec],
        env={**os.environ, "TMPDIR": _long_tmpdir(tmp_path)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "batches [(4, 3, 32, 32), (4, 3, 32, 32), (4, 3, 32, 32)]" in proc.stdout, proc.stderr[-3000:]
    assert "too long for the loader workers' sockets" in proc.stderr
    assert "AF_UNIX path too long" not in proc.stderr


@pytest.fixture
def fresh_mp_tempdir(monkeypatch):
    """This process's multiprocessing temp folder unset for the test, put back after it."""
    config = process.current_process()._config
    monkeypatch.delitem(config, "tempdir", raising=False)
    yield config
    made = config.get("tempdir")
    if made and made.startswith(worker_tempdir.SHORT_BASES):
        os.rmdir(made)


def test_a_short_tmpdir_is_left_alone(fresh_mp_tempdir, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", "/tmp")
    assert worker_tempdir.ensure_short_worker_tempdir() is None
    assert "tempdir" not in fresh_mp_tempdir


def test_a_long_tmpdir_gets_a_short_socket_folder(fresh_mp_tempdir, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", _long_tmpdir(tmp_path))
    short = worker_tempdir.ensure_short_worker_tempdir()
    assert short is not None and fresh_mp_tempdir["tempdir"] == short and os.path.isdir(short)
    assert worker_tempdir.socket_path_length(short, "") <= worker_tempdir.SOCKET_PATH_MAX
    assert worker_tempdir.ensure_short_worker_tempdir() is None  # once per process


def test_no_writable_short_folder_is_one_line(fresh_mp_tempdir, monkeypatch, tmp_path):
    long = _long_tmpdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", long)
    monkeypatch.setattr(worker_tempdir, "SHORT_BASES", (long,))
    with pytest.raises(RuntimeError) as err:
        worker_tempdir.ensure_short_worker_tempdir()
    message = str(err.value)
    assert "\n" not in message and "set TMPDIR" in message and "data.num_workers=0" in message
