"""Shards that repeat a member within one sample (a tar appended to with ``tar -r``, or two builds
concatenated), read by the real tar reader and the real training stream, with an exact resume.

Real tar shards written with tarfile, real JPEGs.
"""

import io
import logging
import tarfile

import numpy as np
import torch
from PIL import Image

from vutrain.data import TrainStream
from vutrain.data.samples import iter_raw_samples

IMAGE = 8


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((IMAGE, IMAGE, 3), 128, np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _write_members(path, members: list[tuple[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def _appended_shard(path) -> str:
    """Sample ``a`` written, then written again after it (as ``tar -r`` appends), then ``b``."""
    jpeg = _jpeg()
    return _write_members(
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


def _preprocess(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def _tokenize(captions: list[str]) -> dict:
    ids = torch.tensor([[len(c)] for c in captions])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _stream(shard: str, num_samples: int, shuffle_buffer: int = 2, tokenize=_tokenize) -> TrainStream:
    return TrainStream(
        shard,
        preprocess=_preprocess,
        tokenize=tokenize,
        batch_size=1,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        shuffle_buffer=shuffle_buffer,
        num_samples=num_samples,
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
    with _stream(shard, num_samples=3) as stream:
        epoch = [next(stream)["input_ids"].item() for _ in range(3)]
        assert sorted(epoch) == sorted(len(c) for c in ("first build", "second build!", "b"))
        state = stream.state_dict()
        following = [next(stream)["input_ids"].item() for _ in range(4)]
    with _stream(shard, num_samples=3) as resumed:
        resumed.load_state_dict(state)
        assert [next(resumed)["input_ids"].item() for _ in range(4)] == following
    assert stream.skipped() == {}


def test_an_image_repeated_before_its_caption_is_counted_not_lost_silently(tmp_path):
    jpeg = _jpeg()
    members = [("a.jpg", jpeg), ("a.jpg", jpeg), ("a.txt", b"cap"), ("b.jpg", jpeg), ("b.txt", b"bb")]
    shard = _write_members(tmp_path / "twice.tar", members)
    with _stream(shard, num_samples=2, shuffle_buffer=1) as stream:  # tar order
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
    shard = _write_members(tmp_path / "huge.tar", [("a.jpg", _jpeg()), ("a.json", meta)])
    with _stream(shard, num_samples=1, tokenize=tokenize) as stream:
        batch = next(stream)
    # Before: the whole text went to the tokenizer (5 MB: 40 s and 1.5 GB of a loader worker).
    assert lengths == [MAX_CAPTION_CHARS]
    assert torch.equal(batch["input_ids"], real_tokenize([title])["input_ids"])  # no token changed
