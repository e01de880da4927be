"""The training stream's skip counts split into samples lost and members ignored: a second image
beside the first (``a.png`` with ``a.jpg``) or a member named ``a.__key__`` is dropped, but its
sample trains, so it is no lost sample (``train/skipped_samples``) but an ignored member
(``train/ignored_members``). Exact resume keeps both counts.

Real tar shards written with tarfile, real JPEG/PNG images, the real TrainStream.
"""

import tarfile

from run_rows import metrics_rows
from tar_shards import image_bytes, one_rank_stream, write_members

from vutrain.data import TrainStream
from vutrain.data.samples import lost_and_ignored


def _shard(path) -> str:
    jpeg, png = image_bytes("JPEG", grey=120), image_bytes("PNG", grey=120)
    return write_members(
        path,
        [
            ("a.__key__", b"x"),  # ignored member; a trains
            ("a.jpg", jpeg),
            ("a.txt", b"a"),
            ("b.jpg", jpeg),
            ("b.png", png),  # ignored member; b trains on its jpg
            ("b.txt", b"bb"),
            ("c.jpg", b"not a jpeg"),  # lost: undecodable
            ("c.txt", b"ccc"),
            ("d.jpg", jpeg),
            ("d.txt", b"dddd"),
        ],
    )


def _stream(shard: str) -> TrainStream:
    return one_rank_stream(shard, num_samples=3, shuffle_buffer=1)


def test_ignored_members_are_counted_apart_from_lost_samples_and_resume_exactly(tmp_path):
    shard = _shard(tmp_path / "s.tar")
    with _stream(shard) as stream:
        first_epoch = sorted(next(stream)["input_ids"].item() for _ in range(3))
        assert first_epoch == [1, 2, 4]  # a, b and d train; c is lost
        # One pass read: two ignored members, one lost sample (before: 3 "skipped samples").
        assert lost_and_ignored(stream.skipped()) == (1, 2)
        state = stream.state_dict()
        following = [next(stream)["input_ids"].item() for _ in range(3)]
        after = stream.skipped()
    assert lost_and_ignored(after) == (2, 4)  # the second epoch read the shard again
    with _stream(shard) as resumed:
        resumed.load_state_dict(state)
        assert lost_and_ignored(resumed.skipped()) == (1, 2)
        assert [next(resumed)["input_ids"].item() for _ in range(3)] == following
        assert resumed.skipped() == after


def test_counts_without_ignored_members_are_all_lost_samples():
    assert lost_and_ignored({}) == (0, 0)
    assert lost_and_ignored({"tar_error": 1, "undecodable_image": 2}) == (3, 0)
    assert lost_and_ignored({"ignored_member": 5, "bad_json": 1}) == (1, 5)


def _add_second_images(shard: str) -> int:
    """Rewrite `shard` with a PNG beside every JPEG (`k.png` with `k.jpg`): members the stream drops
    while their samples still train and evaluate. Returns how many it added."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    png, rewritten = image_bytes("PNG", grey=120), []
    for name, payload in members:
        rewritten.append((name, payload))
        if name.endswith(".jpg"):
            rewritten.append((name[: -len(".jpg")] + ".png", png))
    write_members(shard, rewritten)
    return len(rewritten) - len(members)


def test_the_training_and_eval_rows_count_ignored_members_apart(single_process, tmp_path):
    """The metric rows of a real run: every sample carries a second image, none is lost. Before, the
    trainer logged every dropped member as `train/skipped_samples` and the eval as
    `eval/skipped_samples`; now those stay 0 and `train/ignored_members` counts the members."""
    from vutrain.data.synthetic import write_synthetic

    from inprocess_trainer import train

    info = write_synthetic(str(tmp_path / "data"), num_samples=32, shard_size=32, val_samples=8, seed=0)
    for split in ("train", "val"):
        for shard in sorted((tmp_path / "data" / split).glob("*.tar")):
            assert _add_second_images(str(shard)) > 0
    run_dir = str(tmp_path / "run")
    metrics = train(info, run_dir, 2, train__log_every=1)
    assert metrics["eval/skipped_samples"] == 0
    assert metrics["eval/num_samples"] == 8
    rows = metrics_rows(run_dir)
    train_rows = [row for row in rows if "train/skipped_samples" in row]
    assert train_rows, rows
    assert all(row["train/skipped_samples"] == 0 for row in train_rows), train_rows
    assert train_rows[-1]["train/ignored_members"] > 0, train_rows[-1]
