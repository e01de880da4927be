"""A resume over shards rewritten in place with their sizes kept (tars are padded to 10,240-byte
records, so a small change often keeps a shard's size): the size check let it land on other samples
without a word. Real tar shards (tests/tar_shards.py) read by a real TrainStream.
"""

import logging
import os
import shutil

from tar_shards import rank_streams, rewrite_members, write_two_image_shards

SHARDS, PER_SHARD = 4, 6


def _saved_state(spec: str) -> dict:
    (stream,) = rank_streams(spec, 1, 1, 1, SHARDS * PER_SHARD)
    with stream:
        next(stream)
        return stream.state_dict()


def _resume_warnings(spec: str, state: dict, caplog) -> list[str]:
    caplog.clear()
    (stream,) = rank_streams(spec, 1, 1, 1, SHARDS * PER_SHARD)
    with caplog.at_level(logging.WARNING, logger="vutrain.data.webdataset"), stream:
        stream.load_state_dict(state)  # a warning, not a refusal: a touch changes the times too
        next(stream)
    return [r.getMessage() for r in caplog.records if "modified since" in r.getMessage()]


def test_a_shard_rewritten_in_place_with_its_size_warns_on_resume(tmp_path, caplog):
    """A rebuild in place (dataset_tools build --retry-failed) that kept the size now warns in one line
    naming data.restart_stream; shards copied elsewhere (new times, another folder) stay silent."""
    (tmp_path / "data").mkdir()
    spec = write_two_image_shards(tmp_path / "data", SHARDS, PER_SHARD)
    state = _saved_state(spec)
    assert _resume_warnings(spec, state, caplog) == []  # untouched shards: silent

    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "data", moved, copy_function=shutil.copy)  # new times, another folder
    assert _resume_warnings(spec.replace(str(tmp_path / "data"), str(moved)), state, caplog) == []

    shard = str(tmp_path / "data" / "1.tar")
    size, mtime = os.path.getsize(shard), os.stat(shard).st_mtime_ns
    rewrite_members(shard, lambda name, data: b"caption 9" if data == b"caption 1" else data)
    os.utime(shard, ns=(mtime + 10**9, mtime + 10**9))  # the rewrite's time, whatever the clock's grain
    assert os.path.getsize(shard) == size
    (line,) = _resume_warnings(spec, state, caplog)
    assert "data.restart_stream=true" in line and "\n" not in line


def test_a_state_saved_before_the_times_were_kept_resumes_silently(tmp_path, caplog):
    spec = write_two_image_shards(tmp_path, SHARDS, PER_SHARD)
    state = _saved_state(spec)
    for key in ("mtimes", "place"):
        state["shards"]["sizes"].pop(key, None)
    for path in tmp_path.glob("*.tar"):
        os.utime(path, ns=(1, 1))
    assert _resume_warnings(spec, state, caplog) == []
