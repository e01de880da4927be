"""Skip counts at every step after a resume on another world size with a shuffle buffer.

Real tar shards whose samples each hold a second image (one ``ignored_member`` a sample) and whose
last sample is cut short (one ``tar_error`` a shard), read by real TrainStreams (one per simulated
rank, no process group), resumed through ``{"ranks": [...]}`` (tar_shards.save_and_resume). An
uninterrupted epoch counts 24 ignored members and 4 tar errors; the logged run totals (summed over
the ranks) must never pass them, nor go down, on the way there.
"""

from collections import Counter

import pytest
from tar_shards import rank_streams, save_and_resume, write_two_image_shards

SHARDS, PER_SHARD, GLOBAL_BATCH = 4, 6, 4
EPOCH = Counter(ignored_member=SHARDS * PER_SHARD, tar_error=SHARDS)
STEPS_PER_EPOCH = SHARDS * PER_SHARD // GLOBAL_BATCH


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_two_image_shards(tmp_path_factory.mktemp("stream14"), SHARDS, PER_SHARD, damaged=True)


def _world(shards, world, buffer):
    return rank_streams(shards, world, GLOBAL_BATCH // world, buffer, SHARDS * PER_SHARD)


def _logged(streams) -> Counter:
    """What the trainer logs: the ranks' skip counts summed (rank 0 carries the earlier worlds')."""
    return sum((Counter(s.skipped()) for s in streams), Counter())


@pytest.mark.parametrize("buffer", [4, 8])
@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (1, 2, 1)])
def test_counts_after_a_world_size_change_never_pass_the_epochs(shards, buffer, worlds):
    streams, logged = _world(shards, worlds[0], buffer), []
    for world in worlds[1:]:
        streams = save_and_resume(streams, 1, _world(shards, world, buffer))
        logged.append(_logged(streams))
        # Every global batch so far was of 4 samples, whatever the world: one a save.
        assert [s.batches_seen for s in streams] == [len(logged)] * world
    while streams[0].epoch == 0:
        for s in streams:
            next(s)
        logged.append(_logged(streams))
    # The old readers' counts held the samples in their shuffle buffers, not yet drawn, which the new
    # ranks counted again until a correction at the epoch's end: up to 38 ignored members and 6 tar
    # errors logged mid-epoch (buffer 8), back to 24 and 4 at its end.
    for earlier, later in zip(logged, logged[1:]):
        assert earlier <= later <= EPOCH, logged
    assert logged[-1] == EPOCH
    assert [(s.epoch, s.batches_seen) for s in streams] == [(1, STEPS_PER_EPOCH)] * worlds[-1]
