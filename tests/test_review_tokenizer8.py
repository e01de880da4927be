"""Eighth review of the preset tokenizer's texts: where a data.tokenizer_samples limit takes its
samples from (real tar shards, the real text reader, a real ``tokenizers`` BPE training).

A limit below one shard's samples read the first shard of the spread order alone, so with
``A::B`` (or a crawl sharded by channel or by week) the vocabulary learnt one source."""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections import Counter

from vutrain.data.samples import iter_raw_samples
from vutrain.data.shards import expand_shards
from vutrain.data.tokenizer import SPREAD_SHARDS, iter_shard_texts, spread_order, train_bpe_tokenizer


def _write_shard(path, titles: list[str], second_image_at: int | None = None, bad_json_at: int | None = None):
    with tarfile.open(path, "w") as tar:
        for i, title in enumerate(titles):
            members = [("jpg", b"not decoded here"), ("json", json.dumps({"title": title}).encode())]
            if i == second_image_at:
                members.append(("png", b"a second image"))
            if i == bad_json_at:
                members[1] = ("json", b"{not json")
            for ext, payload in members:
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _shard_of(text: str) -> str:
    return text.rsplit(" ", 1)[0]


def _titles(name: str, n: int) -> list[str]:
    return [f"{name} {i}" for i in range(n)]


def test_a_limit_below_one_shard_reads_every_source(tmp_path):
    """`A::B`, 2 shards of 100 each, data.tokenizer_samples=50: every text came from A's first
    shard. Each of the 4 shards now gives its share (13, 13, 12, 12), its first samples."""
    for name in ("a0", "a1", "b0", "b1"):
        _write_shard(tmp_path / f"{name}.tar", _titles(name, 100))
    spec = f"{tmp_path}/a{{0..1}}.tar::{tmp_path}/b{{0..1}}.tar"
    texts = list(iter_shard_texts(spec, "{title}", limit=50))
    assert Counter(map(_shard_of, texts)) == {"a0": 13, "b0": 13, "a1": 12, "b1": 12}, texts
    assert texts[:13] == _titles("a0", 13) and texts[-12:] == _titles("b1", 12)
    assert list(iter_shard_texts(spec, "{title}", limit=50)) == texts  # the same on every run


def test_a_small_limit_over_many_shards_reads_a_bounded_spread(tmp_path):
    """4 sources of 10 shards (20 samples each): a limit of 64 reads 4 samples from each of
    SPREAD_SHARDS shards spread over the list, every source among them; it opens no more shards
    than that. A limit below SPREAD_SHARDS reads one sample from each of that many shards."""
    for source in range(4):
        for s in range(10):
            _write_shard(tmp_path / f"s{source}_{s}.tar", _titles(f"s{source}_{s}", 20))
    spec = "::".join(f"{tmp_path}/s{source}_{{0..9}}.tar" for source in range(4))
    texts = list(iter_shard_texts(spec, "{title}", limit=64))
    per_shard = Counter(map(_shard_of, texts))
    assert len(texts) == 64 and len(per_shard) == SPREAD_SHARDS == 16
    assert set(per_shard.values()) == {4}, per_shard
    per_source = Counter(name.split("_")[0] for name in per_shard)
    assert set(per_source) == {"s0", "s1", "s2", "s3"} and min(per_source.values()) >= 3, per_source
    urls = expand_shards(spec)
    first = [os.path.basename(urls[i])[: -len(".tar")] for i in spread_order(len(urls))[:SPREAD_SHARDS]]
    assert list(per_shard) == first  # in the spread order

    few = list(iter_shard_texts(spec, "{title}", limit=5))
    assert [_shard_of(t) for t in few] == first[:5] and all(t.endswith(" 0") for t in few)


def _whole_shards_in_spread_order(spec: str, limit: int | None) -> list[str]:
    """The texts as the reader gave them before: whole shards in spread order until the limit."""
    urls = expand_shards(spec)
    samples = itertools.chain.from_iterable(
        iter_raw_samples(urls[i], payloads={"json", "txt"}) for i in spread_order(len(urls))
    )
    return [json.loads(raw["json"])["title"] for raw in itertools.islice(samples, limit)]


def test_a_limit_that_holds_whole_shards_reads_the_same_texts_as_before(tmp_path, tiny_shards):
    """20 shards of 10: a limit of at least SPREAD_SHARDS whole shards (165, 50000, none) reads
    exactly the texts in the order it read before (16 whole shards and 5 of the 17th for 165), so
    a tokenizer trained on them is the same; so does the default limit on the trainer tests' shards."""
    for s in range(20):
        _write_shard(tmp_path / f"{s}.tar", [f"video {s} number {i} {'ab' * (i % 3)}" for i in range(10)])
    spec = f"{tmp_path}/{{0..19}}.tar"
    for limit in (165, 50000, None):
        expected = _whole_shards_in_spread_order(spec, limit)
        assert list(iter_shard_texts(spec, "{title}", limit=limit)) == expected, limit
    texts = list(iter_shard_texts(spec, "{title}", limit=165))
    before = train_bpe_tokenizer(_whole_shards_in_spread_order(spec, 165), str(tmp_path / "before"), 300)
    after = train_bpe_tokenizer(texts, str(tmp_path / "after"), 300)
    assert after.get_vocab() == before.get_vocab()

    urls = expand_shards(tiny_shards["train_shards"])  # 4 shards of 64, captions and tags
    whole = [text for i in spread_order(len(urls)) for text in iter_shard_texts(urls[i], "{title}")]
    assert list(iter_shard_texts(tiny_shards["train_shards"], "{title}", limit=50000)) == whole


def test_a_short_or_damaged_shard_is_topped_up_by_the_next(tmp_path, caplog):
    """A shard cut short (3 samples) and one truncated after 2 samples give less than their share:
    the rest comes from the shards after them, the limit is reached, and the damage is counted once."""
    _write_shard(tmp_path / "0.tar", _titles("full0", 40))
    _write_shard(tmp_path / "1.tar", _titles("short", 3))
    damaged = _write_shard(tmp_path / "2.tar", _titles("damaged", 20))
    with open(damaged, "r+b") as f:
        f.truncate(512 * 10)  # inside sample 2's members: samples 0 and 1 are whole
    _write_shard(tmp_path / "3.tar", _titles("full3", 40))
    with caplog.at_level(logging.WARNING, logger="vutrain.data.tokenizer"):
        texts = list(iter_shard_texts(f"{tmp_path}/{{0..3}}.tar", "{title}", limit=40))
    # spread order 0, 2, 1, 3: shares ceil(40/4)=10, then ceil(30/3)=10 (2 read), ceil(28/2)=14
    # (3 read), then the 25 left.
    assert Counter(map(_shard_of, texts)) == {"full0": 10, "damaged": 2, "short": 3, "full3": 25}, texts
    counts = [r.getMessage() for r in caplog.records if "tokenizer trained on" in r.getMessage()]
    message = (
        "tokenizer trained on the captions of 40 of 40 samples read (0 skipped: none; the shard reader "
        "also counted {'tar_error': 1}: dropped members and damaged shards, not samples)"
    )
    assert counts == [message]


def test_with_every_shard_opened_the_shards_cut_at_their_share_are_read_on(tmp_path, caplog):
    """A large shard and a small one, limit 80: the large one gives its share (40), the small one
    its 10, and the large one is read on from sample 40 to reach the limit; what its first samples
    counted (a second image, a bad JSON) is counted once, not again on the second read."""
    _write_shard(tmp_path / "0.tar", _titles("big", 100), second_image_at=0, bad_json_at=1)
    _write_shard(tmp_path / "1.tar", _titles("small", 10))
    with caplog.at_level(logging.WARNING, logger="vutrain.data.tokenizer"):
        texts = list(iter_shard_texts(f"{tmp_path}/{{0..1}}.tar", "{title}", limit=80))
    big = [t for i, t in enumerate(_titles("big", 70)) if i != 1]
    assert texts == big[:39] + _titles("small", 10) + big[39:]
    counts = [r.getMessage() for r in caplog.records if "tokenizer trained on" in r.getMessage()]
    assert counts == [
        "tokenizer trained on the captions of 79 of 80 samples read (1 skipped: {'bad_json': 1}; the shard "
        "reader also counted {'ignored_member': 1}: dropped members and damaged shards, not samples)"
    ]
