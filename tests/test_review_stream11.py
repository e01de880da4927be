"""Skip counts after a resume on another world size with a shuffle buffer (data.shuffle_buffer > 1).

Real tar shards whose samples each hold a second image (one ``ignored_member`` a sample) and whose
last sample is cut short (one ``tar_error`` a shard, counted at the shard's end), read by real
TrainStreams (one per simulated rank, no process group: the data plan is a pure function of seed,
epoch, rank and worker), resumed through ``{"ranks": [...]}``. Every epoch reads every sample once,
so an uninterrupted epoch counts 24 ignored members and 4 tar errors, whichever world reads it.
"""

import json
import os
import subprocess
import sys

import pytest
from tar_shards import rank_streams, save_and_resume, summed_skips, write_two_image_shards

SHARDS, PER_SHARD = 4, 6
EPOCH_COUNTS = {"ignored_member": SHARDS * PER_SHARD, "tar_error": SHARDS}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_two_image_shards(tmp_path_factory.mktemp("stream11"), SHARDS, PER_SHARD, damaged=True)


def _streams(shards, world, batch, buffer, workers=0):
    return rank_streams(shards, world, batch, buffer, SHARDS * PER_SHARD, workers)


CASES = [  # (old world, new world, steps before the save)
    (2, 1, 1),
    (2, 1, 2),
    (1, 2, 2),
    (1, 2, 3),
]


def _reshape_counts(shards, buffer, old_world, new_world, steps, workers):
    """The summed skip counts of: each world uninterrupted, then old_world saved after `steps`
    batches and resumed on new_world (a list of three dicts)."""
    global_batch = 4
    counts = [
        summed_skips(_streams(shards, w, global_batch // w, buffer, workers)) for w in (old_world, new_world)
    ]
    old = _streams(shards, old_world, global_batch // old_world, buffer, workers)
    new = _streams(shards, new_world, global_batch // new_world, buffer, workers)
    return [*counts, summed_skips(save_and_resume(old, steps, new))]


@pytest.mark.parametrize("buffer", [4, 8])
@pytest.mark.parametrize(("old_world", "new_world", "steps"), CASES)
def test_world_size_change_counts_an_epoch_as_an_uninterrupted_run(
    shards, buffer, old_world, new_world, steps
):
    # The old workers' counts held the samples their shuffle buffers had read ahead (up to buffer - 1
    # a worker), which the new ranks counted again when they drew them: 30 ignored members of 24.
    # (First two: the reference, either world uninterrupted.)
    assert _reshape_counts(shards, buffer, old_world, new_world, steps, 0) == [EPOCH_COUNTS] * 3


@pytest.mark.slow
@pytest.mark.parametrize("buffer", [4, 8])
@pytest.mark.parametrize(("old_world", "new_world", "steps"), [(2, 1, 1), (1, 2, 3)])
def test_world_size_change_with_loader_workers(shards, buffer, old_world, new_world, steps):
    """The same with 2 DataLoader worker processes a rank, forked from a fresh interpreter: forked
    from this long-lived test process (its threads, what earlier tests left), one such case waited
    900 s for a batch in CI once, never reproduced in over 1,000 runs from a fresh process."""
    case = [shards, str(buffer), str(old_world), str(new_world), str(steps)]
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here])}
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), *case],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == [EPOCH_COUNTS] * 3


@pytest.mark.parametrize("buffer", [2, 8])
@pytest.mark.parametrize("worlds", [(1, 2, 1), (2, 1, 2)])
def test_second_world_size_change_in_the_epoch_counts_it_as_an_uninterrupted_run(shards, buffer, worlds):
    streams = _streams(shards, worlds[0], 4 // worlds[0], buffer)
    for world in worlds[1:]:
        streams = save_and_resume(streams, 1, _streams(shards, world, 4 // world, buffer))
    # Both changes left the read-ahead of the world before counted again (25 to 38 ignored members,
    # up to 6 tar errors), and the second one must correct what the first took the middle world to read.
    assert summed_skips(streams) == EPOCH_COUNTS


def test_second_change_keeps_every_undrawn_copy_of_an_upsampled_shard(shards):
    spec = f"{shards}::{shards}"  # every shard twice an epoch: 48 samples
    first, middle, last = (
        rank_streams(spec, world, 4 // world, 1, 2 * SHARDS * PER_SHARD) for world in (1, 2, 1)
    )
    save_and_resume(save_and_resume(first, 1, middle), 1, last)
    batches = 0
    while last[0].epoch == 0:
        next(last[0])
        batches += 1
    # 12 global batches of 4 an epoch; 2 were drawn before. Counting the first world's draws once per
    # middle rank took 4 undrawn copies for drawn: the epoch ended a batch early.
    assert batches == 12 - 2


if __name__ == "__main__":  # one case with 2 loader workers a rank (the subprocess of the test above)
    shards_arg, *numbers = sys.argv[1:]
    print(json.dumps(_reshape_counts(shards_arg, *map(int, numbers), workers=2)))
