"""Exact resume of the training stream at every kind of position, and a resume over shards that were
rebuilt in place (same names, other contents) since the position was saved.

Real JPEG shards, real TrainStreams (no trainer); each caption is the sample's video id, tokenized
into its bytes, so a batch's ids name its samples.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from stream_keys import batch_captions, tokenize_caption_bytes

from vutrain.data import TrainStream
from vutrain.data.epoch_remainder import StreamStateError
from vutrain.data.synthetic import write_synthetic

BATCH, SAMPLES = 3, 60  # 6 shards of 10: 20 batches per epoch on one rank


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("restart2")
    small = write_synthetic(str(root / "small"), SAMPLES, 10, image_size=8, seed=3, val_samples=0)
    write_synthetic(str(root / "big"), 40, 20, image_size=8, seed=4, val_samples=0)
    return {"dir": root / "small" / "train", "spec": small["train_shards"], "big": root / "big" / "train"}


def _stream(spec: str, **kw) -> TrainStream:
    args = dict(batch_size=BATCH, rank=0, world_size=1, num_workers=0, seed=5, shuffle_buffer=7)
    args.update(kw)
    return TrainStream(
        spec,
        preprocess=lambda image: torch.zeros(1),
        tokenize=tokenize_caption_bytes,
        caption_template="{video_id}",
        num_samples=SAMPLES,
        prefetch_factor=1,
        **args,
    )


def _saved_after(spec: str, batches: int, **kw) -> dict:
    with _stream(spec, **kw) as stream:
        for _ in range(batches):
            next(stream)
        return json.loads(json.dumps(stream.state_dict()))


@pytest.mark.parametrize("num_workers", [0, 1, 2])
def test_a_stop_at_any_position_resumes_the_uninterrupted_sequence(shards, num_workers):
    """First batch, last batch of the epoch, exactly at the boundary and just after it, over a spec
    that upsamples a shard (`::`): the batches after the resume equal the uninterrupted stream's,
    and so do the epoch counter and the skip counts."""
    spec = f"{shards['spec']}::{shards['dir']}/00000.tar"
    kw = dict(num_workers=num_workers)
    total = 2 * 20 + 2
    with _stream(spec, **kw) as straight:
        expected = [batch_captions(next(straight)) for _ in range(total)]
        epoch, skipped = straight.epoch, straight.skipped()
    for stop in (1, 19, 20, 21):
        with _stream(spec, **kw) as resumed:
            resumed.load_state_dict(_saved_after(spec, stop, **kw))
            assert [batch_captions(next(resumed)) for _ in range(total - stop)] == expected[stop:], stop
            assert (resumed.epoch, resumed.skipped()) == (epoch, skipped), stop


def test_a_shard_rebuilt_in_place_since_the_save_is_refused_in_one_line(shards, tmp_path):
    """`dataset_tools build --retry-failed` merges new samples into the same shard names: the names
    match, but the saved position counts samples of the old contents, so it would land on other
    samples. The resume is refused in one line (a StreamStateError, which data.restart_stream
    turns into a restart), in a rank's own state and in every rank's ("ranks")."""
    data = tmp_path / "train"
    shutil.copytree(shards["dir"], data)
    spec = str(data / "{00000..00005}.tar")
    state = _saved_after(spec, 4)
    rebuilt = data / "00003.tar"
    shutil.copy(shards["big"] / "00000.tar", rebuilt)  # 20 samples where there were 10
    assert rebuilt.stat().st_size != (shards["dir"] / "00003.tar").stat().st_size
    for saved in (state, {"ranks": [state]}):
        with pytest.raises(StreamStateError, match=r"changed on disk.*data\.restart_stream=true") as info:
            _stream(spec).load_state_dict(saved)
        assert "\n" not in str(info.value)


def test_the_same_shards_in_another_folder_still_resume_exactly(shards, tmp_path):
    """The size check must not refuse shards copied elsewhere (a job moved to another cluster)."""
    state = _saved_after(shards["spec"], 5)
    with _stream(shards["spec"]) as straight:
        expected = [batch_captions(next(straight)) for _ in range(8)][5:]
    moved = tmp_path / "moved"
    shutil.copytree(shards["dir"], moved)
    with _stream(str(moved / "{00000..00005}.tar")) as resumed:
        resumed.load_state_dict(state)
        assert [batch_captions(next(resumed)) for _ in range(3)] == expected
