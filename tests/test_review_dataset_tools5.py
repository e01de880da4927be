"""Concurrent writers of the dataset tools' outputs: split and dedup --filter-output into one folder,
two finalize runs on one folder, and the temporary files of a write the disk refuses.

Real processes (``python -m dataset_tools``), real kernel locks, real files."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest
from test_faults_dataset_tools import _shard

from dataset_tools import dedup, finalize, shards, split

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}


def _many_samples(folder, num_shards: int, per_shard: int) -> int:
    """Shards of tiny samples (split never decodes the image), one channel per 10 videos."""
    os.makedirs(folder, exist_ok=True)
    for shard_id in range(num_shards):
        name = shards.shard_name(shard_id)
        rows = [
            {
                "key": f"{name}{i:04d}",
                "status": "success",
                "video_id": f"v{shard_id:03d}{i:07d}"[:11],
                "channel_title": f"ch{(shard_id * per_shard + i) // 10}",
            }
            for i in range(per_shard)
        ]
        samples = [(r["key"], {"jpg": b"j", "txt": b"t", "json": json.dumps(r).encode()}) for r in rows]
        shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
        shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, pa.Table.from_pylist(rows).schema)
        shards.write_stats(str(folder), shard_id, shards.stats_from_rows(rows, 0.0, 1.0))
    return num_shards * per_shard


def _split_paused_while_writing(src: str, out: str) -> subprocess.Popen:
    """A `split` child stopped (SIGSTOP) once its output folders exist, before it wrote a shard:
    with the default shard size of 1000 it writes nothing until it has read every sample."""
    child = subprocess.Popen(
        [sys.executable, "-m", "dataset_tools", "split", src, "--output", out, "--val-fraction", "0.5"],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not os.path.isdir(os.path.join(out, "val")):
        assert child.poll() is None, child.stderr.read().decode()
        assert time.monotonic() < deadline, "split never created its output folders"
        time.sleep(0.001)
    child.send_signal(signal.SIGSTOP)
    assert not any(name.endswith(".tar") for name in os.listdir(os.path.join(out, "train")))
    return child


def _shard_rows_match_tars(folder: str) -> None:
    for name in shards.iter_shard_names(folder):
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        assert {r["key"] for r in rows} == set(shards.read_tar(os.path.join(folder, f"{name}.tar")))


def test_a_second_split_into_a_folder_a_split_is_writing_is_refused_naming_its_pid(tmp_path):
    # Both passed the emptiness check and both wrote 00000.tar/.parquet/_stats.json: the later
    # rename won file by file, so a shard's tar could come from one run and its parquet from the
    # other. Now the second is refused at once, in one line naming the first one's pid.
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    total = _many_samples(src, num_shards=40, per_shard=250)
    first = _split_paused_while_writing(src, out)
    try:
        with pytest.raises(SystemExit) as err:
            split.split(src, out, val_fraction=0.2, seed="other")
        message = str(err.value.code)
        assert f"pid {first.pid}" in message and "refusing to split" in message and "\n" not in message
    finally:
        first.send_signal(signal.SIGCONT)
        _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr.decode()
    with open(os.path.join(out, "train", "__len__")) as t, open(os.path.join(out, "val", "__len__")) as v:
        assert int(t.read()) + int(v.read()) == total  # the first split's output, whole
    for side in ("train", "val"):
        _shard_rows_match_tars(os.path.join(out, side))


def test_dedup_filter_output_into_a_folder_being_written_is_refused_and_a_killed_writer_frees_it(
    tmp_path,
):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    _many_samples(src, num_shards=40, per_shard=250)
    images = str(tmp_path / "images")
    os.makedirs(images)
    for shard_id in range(2):
        _shard(images, shard_id, 3)
    target = os.path.join(out, "train")
    writer = _split_paused_while_writing(src, out)
    try:
        with pytest.raises(SystemExit) as err:
            dedup.dedup(images, filter_output=target)
        message = str(err.value.code)
        assert f"pid {writer.pid}" in message and "refusing to dedup" in message and "\n" not in message
        assert not any(name.endswith(".tar") for name in os.listdir(target))
    finally:
        writer.kill()  # a pre-empted job: the kernel drops its lock, its lock file stays
        writer.communicate(timeout=60)
    # The folder holds only that lock file: an empty output, not "not empty".
    report = dedup.dedup(images, filter_output=target)
    assert report["kept"] == 6 and len(list(shards.iter_shard_names(target))) == 1
    _shard_rows_match_tars(target)


_FINALIZE_LOOP = """
import sys
from dataset_tools import finalize
for _ in range(int(sys.argv[2])):
    finalize.finalize(sys.argv[1])
"""


def test_two_finalize_runs_on_one_folder_at_once_both_succeed(tmp_path):
    # Both wrote through sizes.json.tmp (and __len__.tmp, manifest.json.tmp): one renamed the
    # other's file away, whose own rename was then a FileNotFoundError traceback.
    folder = str(tmp_path / "shards")
    _many_samples(folder, num_shards=2, per_shard=3)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _FINALIZE_LOOP, folder, "300"], cwd=ROOT, env=ENV, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    errors = [run.communicate(timeout=120)[1].decode() for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errors
    assert finalize.finalize(folder)["num_samples"] == 6
    with open(os.path.join(folder, "sizes.json")) as f:
        assert json.load(f) == {"00000.tar": 3, "00001.tar": 3}
    assert not [name for name in os.listdir(folder) if name.endswith(".tmp")]


def test_a_shard_write_the_disk_refuses_leaves_no_temporary_file(tmp_path):
    # The failed close (it flushes what is buffered, and the disk is still full) raised before
    # the temporary file was removed: each refused write left one behind in the output folder.
    path = str(tmp_path / "00000.tar")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # EFBIG past 4 KiB, as a full disk
    try:
        with pytest.raises(OSError):
            shards.write_tar(path, [(f"k{i:03d}", {"txt": b"a caption"}) for i in range(100)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert os.listdir(tmp_path) == []
