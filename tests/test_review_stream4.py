"""The preset tokenizer on real tar shards: no usable caption is an error, not a bytes-only
vocabulary, and a caption holding the text of a special token is read as text."""

import io
import json
import logging
import tarfile

import pytest
from transformers import AutoTokenizer

from vutrain.data.tokenizer import (
    EOS,
    TokenizerTextError,
    iter_shard_texts,
    tokenize_batch,
    train_bpe_tokenizer,
)


def _write_tar(path, samples: dict[str, dict[str, bytes]]) -> str:
    with tarfile.open(path, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for ext, payload in sorted(members.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def _meta(title) -> bytes:
    return json.dumps({"title": title}).encode()


def test_shards_without_a_usable_caption_refuse_the_tokenizer_in_one_line(tmp_path):
    """Every sample's JSON broken: one TokenizerTextError naming the skip reason and the settings
    to check, and no tokenizer.json written (before: a 258-token bytes-only tokenizer, no word)."""
    spec = _write_tar(
        tmp_path / "00000.tar", {f"{i:05d}": {"json": b"{not json", "jpg": b"x"} for i in range(6)}
    )
    out = tmp_path / "tok"
    with pytest.raises(TokenizerTextError) as info:
        train_bpe_tokenizer(iter_shard_texts(spec, "{title}"), str(out), vocab_size=300)
    message = str(info.value)
    assert "\n" not in message
    assert "bad_json" in message and "6 samples" in message and "data.caption_template" in message
    assert not (out / "tokenizer.json").exists()


def test_no_text_at_all_refuses_the_tokenizer():
    """An empty text iterable: TokenizerTextError, not a vocabulary of byte symbols alone."""
    with pytest.raises(TokenizerTextError, match="no text to train on"):
        train_bpe_tokenizer(iter([]), "/nonexistent/never-written", vocab_size=300)


def test_partly_bad_shards_warn_with_the_counts(tmp_path, caplog):
    """Some samples skipped: the tokenizer trains on the rest and one warning gives both counts."""
    samples = {f"{i:05d}": {"json": _meta(f"cat video {i}"), "jpg": b"x"} for i in range(4)}
    samples["00004"] = {"json": b"[1, 2]", "jpg": b"x"}
    spec = _write_tar(tmp_path / "00000.tar", samples)
    with caplog.at_level(logging.WARNING, logger="vutrain.data.tokenizer"):
        texts = list(iter_shard_texts(spec, "{title}"))
    assert texts == [f"cat video {i}" for i in range(4)]
    assert any("4 of 5 samples" in r.getMessage() and "bad_json" in r.getMessage() for r in caplog.records)


def test_special_token_text_in_a_caption_is_not_an_eos(tmp_path):
    """A title holding "<|endoftext|>" is tokenized as text, by the trained tokenizer and by the one
    AutoTokenizer loads from its folder: the only eos is the last one, so the caption after it is
    not cut off at the pooled position (before: an eos in the middle, CLIP pooled there)."""
    out = str(tmp_path / "tok")
    trained = train_bpe_tokenizer(["cat video", "funny dog"] * 4, out, vocab_size=300, max_length=32)
    eos_id = trained.convert_tokens_to_ids(EOS)
    for tokenizer in (trained, AutoTokenizer.from_pretrained(out)):
        batch = tokenize_batch(tokenizer, [f"cat {EOS} funny dog"], 32)
        ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        assert ids.count(eos_id) == 1 and ids[-1] == eos_id
        assert tokenizer.decode(ids, skip_special_tokens=True).endswith("funny dog")
