"""Shards that repeat a member within one sample (a tar appended to with ``tar -r``, or two builds
concatenated), read by the real tar reader and the real training stream, with an exact resume.

Real tar shards written with tarfile, real JPEGs.
"""

import logging

import torch
from tar_shards import image_bytes, one_rank_stream, write_members

from vutrain.data.samples import iter_raw_samples


def _appended_shard(path) -> str:
    """Sample ``a`` written, then written again after it (as ``tar -r`` appends), then ``b``."""
    jpeg = image_bytes()
    return write_members(
        path,
        [
            ("a.jpg", jpeg),
            ("a.txt", b"first build"),
            ("a.jpg", jpeg),
            ("a.txt", b"second build!"),
            ("b.jpg", jpeg),
            ("b.txt", b"b"),
        ],
    )


def test_a_repeated_member_starts_a_new_sample_in_full_and_header_only_reads(tmp_path, caplog):
    shard = _appended_shard(tmp_path / "appended.tar")
    with caplog.at_level(logging.WARNING, logger="vutrain.data.samples"):
        samples = list(iter_raw_samples(shard))
    # Before: one sample "a" holding the second pair only; the first was replaced unseen.
    assert [(s["__key__"], s["txt"]) for s in samples] == [
        ("a", b"first build"),
        ("a", b"second build!"),
        ("b", b"b"),
    ]
    assert sum("repeats member a.jpg" in r.getMessage() for r in caplog.records) == 1
    # The keys a resume and a world-size change replay from must group the members alike.
    assert [s["__key__"] for s in iter_raw_samples(shard, payloads=False)] == ["a", "a", "b"]


def test_training_stream_trains_on_every_appended_sample_and_resumes_exactly(tmp_path):
    shard = _appended_shard(tmp_path / "appended.tar")
    with one_rank_stream(shard, num_samples=3) as stream:
        epoch = [next(stream)["input_ids"].item() for _ in range(3)]
        assert sorted(epoch) == sorted(len(c) for c in ("first build", "second build!", "b"))
        state = stream.state_dict()
        following = [next(stream)["input_ids"].item() for _ in range(4)]
    with one_rank_stream(shard, num_samples=3) as resumed:
        resumed.load_state_dict(state)
        assert [next(resumed)["input_ids"].item() for _ in range(4)] == following
    assert stream.skipped() == {}


def test_an_image_repeated_before_its_caption_is_counted_not_lost_silently(tmp_path):
    jpeg = image_bytes()
    members = [("a.jpg", jpeg), ("a.jpg", jpeg), ("a.txt", b"cap"), ("b.jpg", jpeg), ("b.txt", b"bb")]
    shard = write_members(tmp_path / "twice.tar", members)
    with one_rank_stream(shard, num_samples=2, shuffle_buffer=1) as stream:  # tar order
        assert sorted(next(stream)["input_ids"].item() for _ in range(2)) == [2, 3]
    # The lone first image has no caption: skipped and counted (it vanished uncounted before).
    assert stream.skipped() == {"missing_caption": 1}


def test_a_huge_caption_is_cut_before_the_tokenizer_with_the_same_tokens(tmp_path):
    from vutrain.data.captions import MAX_CAPTION_CHARS
    from vutrain.data.tokenizer import make_tokenize, train_bpe_tokenizer

    words = "a scraped video description pasted into the title field, "
    title = (words * (3 * MAX_CAPTION_CHARS // len(words)))[: 3 * MAX_CAPTION_CHARS]
    tokenizer = train_bpe_tokenizer([words] * 20, str(tmp_path / "tok"), vocab_size=300, max_length=77)
    real_tokenize = make_tokenize(tokenizer, 77)
    lengths = []

    def tokenize(captions: list[str]) -> dict:
        lengths.extend(len(c) for c in captions)
        return real_tokenize(captions)

    meta = ('{"title": "' + title + '"}').encode()
    shard = write_members(tmp_path / "huge.tar", [("a.jpg", image_bytes()), ("a.json", meta)])
    with one_rank_stream(shard, num_samples=1, tokenize=tokenize) as stream:
        batch = next(stream)
    # Before: the whole text went to the tokenizer (5 MB: 40 s and 1.5 GB of a loader worker).
    assert lengths == [MAX_CAPTION_CHARS]
    assert torch.equal(batch["input_ids"], real_tokenize([title])["input_ids"])  # no token changed
