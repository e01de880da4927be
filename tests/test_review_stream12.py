"""A damaged shard's tar_error when a worker's share of the epoch ends on the shard's last sample.

Real tar shards (the probe data of test_review_stream11.py: each sample holds a second image, one
``ignored_member``, and each shard's last sample is cut short, one ``tar_error`` after its last
readable sample), read by real TrainStreams, one per simulated rank. Every epoch reads every sample
once, so it counts 24 ignored members and 4 tar errors. With ``shuffle_buffer`` 1 the reader
stopped right after a worker's last draw and never read on into the damage: 2 of 4 tar errors on
two ranks, none on two ranks with two loader workers.
"""

import pytest
from tar_shards import rank_streams, save_and_resume, summed_skips, write_two_image_shards

from vutrain.data.samples import iter_raw_samples, iter_samples_with_end

SHARDS, PER_SHARD = 4, 6
EPOCH_COUNTS = {"ignored_member": SHARDS * PER_SHARD, "tar_error": SHARDS}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_two_image_shards(tmp_path_factory.mktemp("stream12"), SHARDS, PER_SHARD, damaged=True)


def _streams(shards, world, buffer, workers=0, global_batch=4):
    return rank_streams(shards, world, global_batch // world, buffer, SHARDS * PER_SHARD, workers)


def _times(counts: dict, n: int) -> dict:
    return {reason: c * n for reason, c in counts.items()}


CASES = [  # (world, workers)
    (1, 0),
    (2, 0),
    (4, 0),
    pytest.param(1, 2, marks=pytest.mark.slow),  # 2 workers: worker processes
    pytest.param(2, 2, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("buffer", [1, 4])
@pytest.mark.parametrize(("world", "workers"), CASES)
def test_uninterrupted_epochs_count_every_damaged_shard(shards, buffer, world, workers):
    # Before: with buffer 1, 3 tar errors of 4 on one rank, 2 on two, none on four or on two ranks
    # with two workers (each worker's share ended on a shard's last readable sample).
    assert summed_skips(_streams(shards, world, buffer, workers), 2) == _times(EPOCH_COUNTS, 2)


@pytest.mark.parametrize("buffer", [1, 4])
def test_resume_at_every_batch_counts_and_draws_as_the_uninterrupted_stream(shards, buffer):
    (reference,) = _streams(shards, 1, buffer)
    steps = 2 * reference.steps_per_epoch
    batches, counts = [], []
    for _ in range(steps):
        batches.append(next(reference)["input_ids"].tolist())
        counts.append(reference.skipped())
    reference.close()
    assert counts[-1] == _times(EPOCH_COUNTS, 2)
    for saved_at in range(1, steps):  # a checkpoint after every batch, the epoch's last included
        (before,) = _streams(shards, 1, buffer)
        for _ in range(saved_at):
            next(before)
        state = before.state_dict()
        before.close()
        (after,) = _streams(shards, 1, buffer)
        after.load_state_dict(state)
        for step in range(saved_at, steps):
            assert next(after)["input_ids"].tolist() == batches[step], (saved_at, step)
            assert after.skipped() == counts[step], (saved_at, step)
        after.close()


@pytest.mark.parametrize(("old_world", "new_world", "steps"), [(2, 1, 1), (2, 1, 3), (1, 2, 3), (1, 4, 2)])
def test_world_size_change_without_a_shuffle_buffer_counts_an_uninterrupted_epoch(
    shards, old_world, new_world, steps
):
    new = save_and_resume(_streams(shards, old_world, 1), steps, _streams(shards, new_world, 1))
    # The new ranks now count a shard's end with its last sample, as the reshape's replay expects.
    assert summed_skips(new, 1) == EPOCH_COUNTS


def test_reader_gives_the_shard_end_with_its_last_sample(shards, tmp_path):
    damaged = shards.replace("{0..3}", "0")
    counted = []
    samples = list(iter_samples_with_end(damaged, counted.append))
    assert [s["__key__"] for s, _ in samples] == [s["__key__"] for s in iter_raw_samples(damaged)]
    assert [end for _, end in samples] == [[]] * (PER_SHARD - 1) + [["tar_error"]]
    assert counted == ["ignored_member"] * PER_SHARD  # each sample's own, as it is handed out
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    counted.clear()
    assert list(iter_samples_with_end(str(empty), counted.append)) == []
    assert counted == ["tar_error"]  # no sample to carry it
