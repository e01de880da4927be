"""Seventh review of the preset tokenizer's texts: each sample's tags go in once per tag, as captions'
``{tags}``, the tag ids and the tag metrics count them (real tar shards, the real text reader and a
real ``tokenizers`` BPE training)."""

from __future__ import annotations

import io
import json
import tarfile

from vutrain.data.captions import render_caption
from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer


def _write_shard(path, metas: list[dict]) -> str:
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            for ext, data in (("jpg", b"not decoded here"), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_tokenizer_texts_hold_each_tag_once_as_the_caption_renders_it(tmp_path):
    """Tags repeated in other spellings ("Cats", " CATS ") or verbatim went into the tokenizer's
    texts once per repeat, while the caption renders each tag once in its first spelling and the
    tag ids count it once; "#cats" stays its own tag, as it is its own id."""
    template = "{title}. tags: {tags}"
    metas = [
        {"title": "My cat", "tags": ["Cats", "cats", " CATS ", "funny", "Funny", "#cats"]},
        {"title": "Joined", "tags": "music|Music|live|music"},
    ]
    texts = list(iter_shard_texts(_write_shard(tmp_path / "t.tar", metas), template))
    captions = [render_caption(template, meta, None) for meta in metas]
    assert captions == ["My cat. tags: Cats, funny, #cats", "Joined. tags: music, live"]
    assert texts == [captions[0], "Cats, funny, #cats", captions[1], "music, live"]


def test_a_tag_repeated_in_one_sample_does_not_outweigh_a_word_of_several_captions(tmp_path):
    """The BPE learns its merges from word counts: one sample listing the tag "zqxj" twenty times
    took every merge of a small vocabulary, and "blorp", the title of three samples, stayed split
    into letters. Counted once per sample (as training sees it), the title's word gets the merges."""
    metas = [{"title": "blorp"}] * 3 + [{"title": "a", "tags": ["zqxj"] * 20}]
    texts = iter_shard_texts(_write_shard(tmp_path / "w.tar", metas), "{title}")
    tokenizer = train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=258 + 4)
    assert tokenizer.tokenize("blorp") == ["blorp"]
    assert len(tokenizer.tokenize("zqxj")) == 4
