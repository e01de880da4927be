"""A data position resumed on another world size over another `data.num_samples`.

Real JPEG shards, real TrainStreams (one per simulated rank, no process group: the data plan is a
pure function of seed, epoch, rank and worker); each caption is the sample's video id, tokenized
into its bytes, so a batch's ids name its samples.
"""

from __future__ import annotations

import json

import pytest
import torch
from stream_keys import batch_captions, tokenize_caption_bytes

from vutrain.data import TrainStream
from vutrain.data.epoch_remainder import StreamStateError
from vutrain.data.synthetic import write_synthetic

SAMPLES = 96  # 8 shards of 12; global batch 8: 12 steps per epoch at world 2 x 4 and world 1 x 8


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("restart3")
    info = write_synthetic(str(root / "syn"), SAMPLES, 12, image_size=8, seed=3, val_samples=0)
    return info["train_shards"]


def _streams(spec: str, world: int, batch: int, num_samples: int = SAMPLES) -> list[TrainStream]:
    return [
        TrainStream(
            spec,
            preprocess=lambda image: torch.zeros(1),
            tokenize=tokenize_caption_bytes,
            caption_template="{video_id}",
            batch_size=batch,
            rank=rank,
            world_size=world,
            num_workers=0,
            seed=5,
            shuffle_buffer=7,
            num_samples=num_samples,
        )
        for rank in range(world)
    ]


def _draw(streams: list[TrainStream], steps: int) -> list[str]:
    return [key for _ in range(steps) for stream in streams for key in batch_captions(next(stream))]


def _every_rank_after(spec: str, steps: int) -> tuple[dict, list[str]]:
    """Every rank's state (as read back from a checkpoint's JSON) after `steps` batches on 2 ranks."""
    old = _streams(spec, 2, 4)
    drawn = _draw(old, steps)
    return json.loads(json.dumps({"ranks": [s.state_dict() for s in old]})), drawn


@pytest.mark.parametrize("num_samples", [24, 48])
def test_another_num_samples_on_another_world_size_is_refused_in_one_line(spec, num_samples):
    """2 ranks -> 1 with the global batch kept but data.num_samples lowered: the remainder of the
    epoch was numbered from the shorter new epoch's end, before its start (batch -6, epoch -2 for
    24), where the same change on the same world size is refused. Now refused the same way, and
    data.restart_stream's path still starts the next epoch."""
    states, _ = _every_rank_after(spec, 3)
    (stream,) = _streams(spec, 1, 8, num_samples=num_samples)
    with pytest.raises(StreamStateError) as info:
        stream.load_state_dict(states)
    message = str(info.value)
    assert "\n" not in message
    assert "data.num_samples" in message and "data.restart_stream=true" in message
    assert stream.batches_seen == 0  # a refused position leaves the stream as built
    assert stream.restart_after(states) == 1
    assert stream.epoch == 1 and len(_draw([stream], 1)) == 8


def test_a_num_samples_that_keeps_the_epoch_still_resumes_each_sample_once(spec):
    """data.num_samples 96 -> 100 gives 12 steps of 8 either way: not a change of the epoch, so the
    reshape still continues it (every sample of the epoch exactly once across the change)."""
    states, drawn = _every_rank_after(spec, 3)
    (stream,) = _streams(spec, 1, 8, num_samples=100)
    stream.load_state_dict(states)
    assert stream.epoch == 0
    rest = _draw([stream], stream.steps_per_epoch - stream.batches_seen)
    together = drawn + rest
    assert len(together) == len(set(together)) == SAMPLES
    assert stream.epoch == 1
