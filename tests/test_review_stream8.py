"""Members a sample cannot use: a second image (``a.jpg`` and ``a.png``), and members named like the
raw sample's own fields (``a.__key__``, ``a.__url__``). Read by the real tar reader, the real
training stream (with an exact resume) and the world-size change's key listing and re-read.

Real tar shards written with tarfile, real JPEG and PNG images.
"""

import logging

from tar_shards import image_bytes, one_rank_stream, write_members

from vutrain.data.epoch_remainder import _read_in_order, _read_keys
from vutrain.data.samples import decode_sample_bytes, iter_raw_samples


def _odd_shard(path) -> str:
    """Members in sorted tar order, as ``tar cf`` of a folder writes them (``_`` sorts before letters)."""
    jpeg, png = image_bytes("JPEG", 100), image_bytes("PNG", 200)
    return write_members(
        path,
        [
            ("a.__key__", b"someone else's key"),
            ("a.jpg", jpeg),
            ("a.txt", b"a"),
            ("b.__url__", b"https://example.com/b.tar"),
            ("b.jpg", jpeg),
            ("b.txt", b"bb"),
            ("c.jpg", jpeg),
            ("c.png", png),
            ("c.txt", b"ccc"),
            ("d.jpeg", jpeg),
            ("d.txt", b"dddd"),
            ("d.webp", image_bytes("WEBP", 50)),
        ],
    )


def test_field_named_members_and_second_images_are_ignored_and_counted_alike_in_every_read(tmp_path, caplog):
    shard = _odd_shard(tmp_path / "odd.tar")
    counted = []
    with caplog.at_level(logging.WARNING, logger="vutrain.data.samples"):
        samples = list(iter_raw_samples(shard, counted.append))
    # Before: a.__key__ made a phantom sample keyed by its bytes, b.__url__ split b into a part
    # without its caption and one without its image (both lost), and c, d carried a second image
    # that nothing used or counted.
    assert [s["__key__"] for s in samples] == ["a", "b", "c", "d"]
    assert all(s["__url__"] == shard for s in samples)
    members = [sorted(k for k in s if not k.startswith("__")) for s in samples]
    assert members == [["jpg", "txt"]] * 3 + [["jpeg", "txt"]]
    assert counted == ["ignored_member"] * 4
    assert sum("is ignored" in r.getMessage() for r in caplog.records) == 1  # once per shard
    assert not any("repeats member" in r.getMessage() for r in caplog.records)
    for payloads in (False, {"json", "txt"}):  # header-only and metadata reads group alike
        again = []
        assert [s["__key__"] for s in iter_raw_samples(shard, again.append, payloads)] == list("abcd")
        assert again == counted


def test_the_world_size_change_finds_every_sample_by_its_header_only_key(tmp_path):
    shard = _odd_shard(tmp_path / "odd.tar")
    ids = [(shard, key) for key in _read_keys(shard)]
    # Before: the header-only key of the phantom sample was None, the full read's its member's
    # bytes, and b's two halves were two ids: the re-read matched other samples than listed.
    assert [s["__key__"] for s in _read_in_order(ids)] == [key for _, key in ids] == list("abcd")


def test_a_sample_with_two_images_trains_on_the_preferred_one(tmp_path):
    shard = _odd_shard(tmp_path / "odd.tar")
    c = next(s for s in iter_raw_samples(shard) if s["__key__"] == "c")
    image, caption, _ = decode_sample_bytes(c, "{txt}")
    assert (image, caption) == (image_bytes("JPEG", 100), "ccc")


def test_training_stream_trains_on_every_sample_counts_the_ignored_members_and_resumes_exactly(tmp_path):
    shard = _odd_shard(tmp_path / "odd.tar")
    with one_rank_stream(shard, num_samples=4) as stream:
        epoch = [next(stream)["input_ids"].item() for _ in range(4)]
        assert sorted(epoch) == [1, 2, 3, 4]  # before: b was lost (counted as two bad samples)
        state = stream.state_dict()
        following = [next(stream)["input_ids"].item() for _ in range(5)]
    with one_rank_stream(shard, num_samples=4) as resumed:
        resumed.load_state_dict(state)
        assert [next(resumed)["input_ids"].item() for _ in range(5)] == following
    # Counted as the shard is read (two passes and the shuffle buffer's read-ahead), replays not again.
    assert set(stream.skipped()) == {"ignored_member"} and stream.skipped()["ignored_member"] >= 8
    assert resumed.skipped() == stream.skipped()
