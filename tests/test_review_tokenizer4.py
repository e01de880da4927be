"""Fourth review of the text side: a model.vocab_size the byte-level BPE cannot honour, and which
shards data.tokenizer_samples reads (real tokenizer training, real tar shards, a real in-process
Trainer start)."""

from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from vutrain.config import ConfigError
from vutrain.data.tokenizer import (
    MIN_VOCAB_SIZE,
    TokenizerVocabError,
    iter_shard_texts,
    spread_order,
    train_bpe_tokenizer,
)
from vutrain.startup_errors import one_line

from inprocess_trainer import train

TITLES = ["Cutest Cats Compilation 2017 | Best Cute Cat Videos Ever", "猫 😀 مرحبا", "lets play minecraft"]


def test_vocab_size_below_the_byte_alphabet_is_refused_before_reading_texts(tmp_path):
    """vocab_size=100 gave a 258-token tokenizer without a word (the trainer keeps all 256 byte
    symbols): the setting was silently not honoured. It is a one-line error naming the least
    value, raised before a text is read and without saving a tokenizer."""
    read = []

    def texts():
        for title in TITLES:
            read.append(title)
            yield title

    with pytest.raises(TokenizerVocabError) as info:
        train_bpe_tokenizer(texts(), str(tmp_path / "tok"), vocab_size=100)
    message = str(info.value)
    assert "model.vocab_size=100" in message and f">= {MIN_VOCAB_SIZE}" in message
    assert "\n" not in message
    assert read == []
    assert not os.path.exists(tmp_path / "tok" / "tokenizer.json")


def test_the_least_vocab_size_is_honoured(tmp_path):
    """MIN_VOCAB_SIZE is what the tokenizer really holds (2 special tokens and 256 byte symbols),
    so the value the error names works and gives exactly that many tokens."""
    assert MIN_VOCAB_SIZE == 258
    tokenizer = train_bpe_tokenizer(TITLES * 4, str(tmp_path / "tok"), vocab_size=MIN_VOCAB_SIZE)
    assert len(tokenizer) == MIN_VOCAB_SIZE


def test_a_preset_run_with_a_too_small_vocab_size_stops_in_one_line(tiny_shards, tmp_path, single_process):
    """End to end: `model.vocab_size=100` on a preset run trained a model whose embedding table had
    258 rows, not the 100 asked for. The start now stops in one line naming the least value (the
    config check, before any process group), and leaves no tokenizer in the run directory (a later
    start with a valid value trains one)."""
    run_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        train(
            tiny_shards,
            run_dir,
            steps=1,
            model__vocab_size=100,
            eval__every=0,
            train__checkpoint_every=0,
            train__warmup_steps=0,
        )
    assert f"model.vocab_size=100 is below {MIN_VOCAB_SIZE}" in one_line(info.value)
    assert not os.path.exists(os.path.join(run_dir, "tokenizer", "tokenizer.json"))


def _write_shard(path, titles: list[str]) -> None:
    with tarfile.open(path, "w") as tar:
        for i, title in enumerate(titles):
            for ext, payload in (
                ("jpg", b"not decoded here"),
                ("json", json.dumps({"title": title}).encode()),
            ):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tokenizer_samples_come_from_every_source_not_the_first_shards(tmp_path):
    """`data.train_shards=EN::JA` with data.tokenizer_samples smaller than EN: the shards were read
    in list order, so the BPE saw English titles alone and encoded every Japanese title byte by
    byte. The limit now takes its samples from shards spread over the whole list: 8 samples over
    5 shards are about 2 from each (since 2026-12-07; before, whole shards: 4 EN and 4 JA)."""
    (tmp_path / "en").mkdir()
    (tmp_path / "ja").mkdir()
    for s in range(4):
        _write_shard(tmp_path / "en" / f"{s}.tar", [f"english video {s} {i}" for i in range(4)])
    _write_shard(tmp_path / "ja" / "0.tar", [f"かわいい猫の動画 {i}" for i in range(4)])
    spec = f"{tmp_path}/en/{{0..3}}.tar::{tmp_path}/ja/0.tar"
    texts = list(iter_shard_texts(spec, "{title}", limit=8))
    assert len(texts) == 8
    assert sum(t.startswith("かわいい") for t in texts) == 2, texts
    assert {t.split()[2] for t in texts if t.startswith("english")} == {"0", "1", "2", "3"}, texts
    assert sorted(iter_shard_texts(spec, "{title}")) == sorted(  # without a limit: every sample, once
        [f"english video {s} {i}" for s in range(4) for i in range(4)]
        + [f"かわいい猫の動画 {i}" for i in range(4)]
    )


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 10, 33])
def test_spread_order_is_every_shard_once_each_prefix_spread(n):
    """Each shard is read once; the first half of the order reaches the last quarter of the list."""
    order = spread_order(n)
    assert sorted(order) == list(range(n))
    if n >= 4:
        assert max(order[: (n + 1) // 2]) >= n - n // 4 - 1, order
