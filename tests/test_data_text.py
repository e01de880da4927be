"""Caption templates, shard-spec expansion and the BPE tokenizer (AutoTokenizer round trip)."""

import json

import pytest
from transformers import AutoTokenizer

from vutrain.data.captions import MissingCaptionField, render_caption, template_fields
from vutrain.data.shards import count_samples, expand_shards
from vutrain.data.synthetic import CLASSES, write_synthetic
from vutrain.data.tokenizer import iter_shard_texts, tokenize_batch, train_bpe_tokenizer

META = {"title": "Cute Cats", "tags": ["cat", "pets"], "category_name": "Pets & Animals", "category_id": 15}


def test_render_caption_templates():
    assert render_caption("{title}", META, "ignored") == "Cute Cats"
    assert render_caption("{title}. tags: {tags}", META, None) == "Cute Cats. tags: cat, pets"
    assert render_caption("{category_name}", META, None) == "Pets & Animals"
    assert render_caption("{txt} [{category_id}]", META, "the caption") == "the caption [15]"
    assert render_caption("{title}", {}, "from txt") == "from txt"  # img2dataset's caption is the title
    with pytest.raises(MissingCaptionField):
        render_caption("{title}", {}, None)
    with pytest.raises(ValueError, match=r"unknown placeholder \{views\}.*\{title\}"):
        template_fields("{title} {views}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        template_fields("{}")


def test_expand_shards(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:02d}.tar").write_bytes(b"")
    (tmp_path / "sizes.json").write_text(json.dumps({"00.tar": 4, "01.tar": 5, "02.tar": 6}))
    spec = f"{tmp_path}/{{00..02}}.tar"
    assert expand_shards(spec) == [f"{tmp_path}/{i:02d}.tar" for i in range(3)]
    both = expand_shards(f"{tmp_path}/00.tar::pipe:cat /x/{{0..1}}.tar::s3://b/k.tar")
    assert both == [f"{tmp_path}/00.tar", "pipe:cat /x/0.tar", "pipe:cat /x/1.tar", "s3://b/k.tar"]
    # a brace range that partly misses is an error unless data.allow_missing_shards (issue 11)
    with pytest.raises(ValueError, match="7 of 10 shards do not exist"):
        expand_shards(f"{tmp_path}/{{00..09}}.tar")
    assert len(expand_shards(f"{tmp_path}/{{00..09}}.tar", allow_missing=True)) == 3
    with pytest.raises(
        ValueError, match=r"data.train_shards matched 0 files: /nope/\{0..9\}.tar. Check the path"
    ):
        expand_shards("/nope/{0..9}.tar")
    with pytest.raises(ValueError, match="data.val_shards matched 0 files"):
        expand_shards(f"{tmp_path}/00.tar::{tmp_path}/missing.tar", key="data.val_shards")
    assert count_samples(expand_shards(spec)) == 15
    assert count_samples(expand_shards(f"{tmp_path}/01.tar")) == 5
    assert count_samples(["pipe:cat x.tar"]) is None


def test_tokenizer_round_trip(tmp_path):
    info = write_synthetic(str(tmp_path / "d"), 96, 48, image_size=16, val_samples=0)
    texts = list(iter_shard_texts(info["train_shards"], "{title}"))
    assert len(texts) == 3 * 96  # caption, tags, category name per sample
    assert set(CLASSES) & set(texts)
    tok = train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=600, max_length=24)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert len(loaded) == len(tok) <= 600
    assert loaded.model_max_length == 24
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    short = "A photo of a RED Circle"
    batch = tokenize_batch(loaded, [short, "a thumbnail of a " + "very " * 20 + "big blue cross"], 24)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 24) and ids.dtype == mask.dtype == torch_long()
    assert ids[:, 0].tolist() == [loaded.bos_token_id] * 2
    assert ids[1, -1].item() == loaded.eos_token_id and mask[1].all()  # truncation keeps the eos last
    n = int(mask[0].sum())
    assert ids[0, n - 1].item() == loaded.eos_token_id and (ids[0, n:] == loaded.pad_token_id).all()
    assert loaded.decode(ids[0], skip_special_tokens=True) == short.lower()
    assert tokenize_batch(tok, [short], 24)["input_ids"].tolist() == ids[:1].tolist()
    # the class words are whole tokens or few pieces: the vocabulary was learnt from the shards
    assert len(loaded.tokenize("red circle")) <= 4


def torch_long():
    import torch

    return torch.long


def test_whole_directory_count_is_not_used_for_part_of_it(tmp_path):
    """`__len__` counts the whole directory: a spec over part of it got that count (480 for 120
    samples here), and its epoch ran four times as long, repeating samples."""
    for i in range(4):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
        (tmp_path / f"{i:05d}_stats.json").write_text(json.dumps({"successes": 120}))
    (tmp_path / "__len__").write_text("480")
    assert count_samples(expand_shards(f"{tmp_path}/{{00000..00003}}.tar")) == 480
    assert count_samples(expand_shards(f"{tmp_path}/{{00000..00000}}.tar")) == 120  # its stats
    (tmp_path / "00000_stats.json").unlink()
    assert count_samples(expand_shards(f"{tmp_path}/{{00000..00001}}.tar")) is None  # unknown, not 480


def test_whole_directory_count_is_not_used_for_part_of_compressed_shards(tmp_path):
    """The same for .tar.gz shards: the subset check saw no ".tar" file, so any part got the whole count."""
    for i in range(4):
        (tmp_path / f"{i:05d}.tar.gz").write_bytes(b"")
    (tmp_path / "__len__").write_text("480")
    assert count_samples(expand_shards(f"{tmp_path}/{{00000..00003}}.tar.gz")) == 480
    assert count_samples(expand_shards(f"{tmp_path}/{{00000..00001}}.tar.gz")) is None  # unknown, not 480
