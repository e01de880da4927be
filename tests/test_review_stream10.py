"""Skip counts after a resume on another world size, and what SkipCounter logs for ignored members.

Real tar shards whose samples each hold a second image (ignored and counted as ``ignored_member``;
the sample trains), read by real TrainStreams (one per simulated rank, no process group: the data
plan is a pure function of seed, epoch, rank and worker), resumed through ``{"ranks": [...]}``.
"""

import logging

import pytest
from tar_shards import rank_streams, write_two_image_shards

from vutrain.data.samples import SkipCounter

SHARDS, PER_SHARD = 4, 6


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_two_image_shards(tmp_path_factory.mktemp("stream10"), SHARDS, PER_SHARD)


def _streams(shards, world, batch, workers=0):
    # shuffle_buffer 1: a reader reads no further than the samples drawn, so an uninterrupted
    # epoch and an interrupted one have counted the same samples at the epoch's end.
    return rank_streams(shards, world, batch, 1, SHARDS * PER_SHARD, workers)


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])  # 2: worker processes
def test_world_size_change_counts_each_ignored_member_once(shards, workers):
    full = _streams(shards, 1, 4)[0]
    for _ in range(full.steps_per_epoch):
        next(full)
    assert full.skipped() == {"ignored_member": SHARDS * PER_SHARD}  # one second image a sample

    old = _streams(shards, 2, 2)
    for _ in range(2):
        for s in old:
            next(s)
    states = {"ranks": [s.state_dict() for s in old]}
    new = _streams(shards, 1, 4, workers=workers)[0]  # the same global batch on one rank
    new.load_state_dict(states)
    while new.epoch == 0:
        next(new)
    new.close()
    # Reading a shard from its start for the rest of the epoch counted the second images of the
    # samples the old ranks drew (and of other workers' samples) again: 32 and 36 of 24.
    assert new.skipped() == full.skipped()


def test_ignored_member_is_counted_but_not_logged_as_a_skipped_sample(caplog):
    counter = SkipCounter()
    with caplog.at_level(logging.WARNING, logger="vutrain.data.samples"):
        counter("ignored_member")
        counter("undecodable_image", "a.jpg: broken")
    assert counter == {"ignored_member": 1, "undecodable_image": 1}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["skipping sample (undecodable_image) a.jpg: broken"]
