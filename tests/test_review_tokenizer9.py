"""Ninth review of the preset tokenizer's texts (real tar shards, the real text reader and the real
training stream): the tokenizer reads the samples training trains on, and its log line adds up.

A sample without an image (training skips it as ``missing_image``) gave the tokenizer its texts,
and what the shard reader counts besides skipped samples (a sample's second image, a damaged
shard's end) was listed as skipped beside "N of N samples read"."""

from __future__ import annotations

import json
import logging

import pytest
from tar_shards import image_bytes, read_captions, write_members

from vutrain.data.captions import MAX_CAPTION_CHARS
from vutrain.data.tokenizer import TokenizerTextError, iter_shard_texts

_SHARD_READER = "dropped members and damaged shards, not samples"


def _write_shard(path, with_image: list[bool], second_image: bool = False) -> str:
    """A shard of one sample per entry of `with_image`: title "video k", its JPEG when True, a
    second image (a PNG: ignored and counted as ``ignored_member``) when `second_image`."""
    members = []
    for k, has_image in enumerate(with_image):
        if has_image:
            members.append((f"{k:04d}.jpg", image_bytes()))
        if second_image:
            members.append((f"{k:04d}.png", image_bytes("PNG")))
        members.append((f"{k:04d}.json", json.dumps({"title": f"video {k}"}).encode()))
    return write_members(path, members)


def _count_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("tokenizer trained on")]


def test_the_tokenizer_reads_the_captions_training_trains_on(tmp_path, caplog):
    """6 samples, 2 without an image: training trains on 4 captions, and the tokenizer now reads
    those 4 (it read all 6) and counts the other 2 as training does."""
    shard = _write_shard(tmp_path / "0.tar", [True, False, True, True, False, True])
    trained = [caption for caption, _ in read_captions(shard, 4, "{title}")]
    with caplog.at_level(logging.WARNING, logger="vutrain.data.tokenizer"):
        texts = list(iter_shard_texts(shard, "{title}"))
    assert texts == trained == ["video 0", "video 2", "video 3", "video 5"]
    assert _count_lines(caplog) == [
        "tokenizer trained on the captions of 4 of 6 samples read (2 skipped: {'missing_image': 2})"
    ]


def test_shards_of_metadata_alone_are_no_text_to_train_on(tmp_path):
    """Shards without images train on nothing: one line that says why, not a vocabulary learnt from
    texts no training step reads."""
    shard = _write_shard(tmp_path / "0.tar", [False, False, False])
    with pytest.raises(TokenizerTextError) as info:
        list(iter_shard_texts(shard, "{title}"))
    assert (
        "none of the 3 samples read for the tokenizer gave a caption (3 skipped: {'missing_image': 3})"
        in str(info.value)
    )


def test_the_count_line_adds_up_when_only_members_are_ignored(tmp_path, caplog):
    """Every sample holds a second image, which is dropped (the sample trains): 3 of 3 samples give
    their captions, none is skipped, and the ignored members are named apart. The line said
    "3 of 3 samples read (skipped: {'ignored_member': 3})"."""
    shard = _write_shard(tmp_path / "0.tar", [True, True, True], second_image=True)
    with caplog.at_level(logging.WARNING, logger="vutrain.data.tokenizer"):
        texts = list(iter_shard_texts(shard, "{title}"))
    assert texts == ["video 0", "video 1", "video 2"]
    assert _count_lines(caplog) == [
        "tokenizer trained on the captions of 3 of 3 samples read (0 skipped: none; "
        f"the shard reader also counted {{'ignored_member': 3}}: {_SHARD_READER})"
    ]


def test_tags_and_category_texts_are_cut_as_captions_are(tmp_path):
    """A tags field of one 100k-character word (a scraped page in the wrong column) went to the BPE
    trainer whole, whose cost grows faster than the word; captions were cut to MAX_CAPTION_CHARS."""
    long_word = "ab" * 50_000
    meta = {"title": "video", "tags": [long_word], "category_name": long_word}
    shard = write_members(
        tmp_path / "0.tar", [("0.jpg", image_bytes()), ("0.json", json.dumps(meta).encode())]
    )
    texts = list(iter_shard_texts(shard, "{title}"))
    assert texts == ["video", long_word[:MAX_CAPTION_CHARS], long_word[:MAX_CAPTION_CHARS]]
