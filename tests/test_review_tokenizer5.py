"""Tokenizer texts and caption fields read as training and zero-shot read them; eos kept at the cut.

Shards are written by hand (webdataset tar: ``<key>.jpg`` + ``<key>.json``) and read through the
real caption rendering, the tokenizer's text reader and the zero-shot class reader; tokenizers are
trained for real (``tokenizers``) or built from a local vocabulary (HF ``CLIPTokenizer``).
"""

import io
import json
import math
import tarfile

import pytest
from PIL import Image
from transformers import CLIPTokenizer

from vutrain.data import collect_label_values
from vutrain.data.captions import render_caption
from vutrain.data.labels import category_label
from vutrain.data.tokenizer import TokenizerTextError, iter_shard_texts, tokenize_batch, train_bpe_tokenizer

EOS_ID = 1
WORDS = ["cats are cute and funny videos", "best cat compilation ever", "hello world of music"] * 10


def _write_shard(path, metas: list[dict]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (40, 200, 40)).save(buf, "JPEG")
    with tarfile.open(path, "w") as tar:
        for i, meta in enumerate(metas):
            for ext, data in (("jpg", buf.getvalue()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


@pytest.mark.parametrize("texts", [[""], ["", "   ", "\n\t"]], ids=repr)
def test_blank_texts_alone_are_no_text_to_train_on(tmp_path, texts):
    """Blank texts hold no word: training on them alone made the 256-byte tokenizer (258 or 259 tokens)
    without a word; it is the one-line TokenizerTextError, as for no text at all."""
    with pytest.raises(TokenizerTextError, match="no text to train on"):
        train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300)
    tok = train_bpe_tokenizer(texts + WORDS, str(tmp_path / "ok"), vocab_size=300)
    assert len(tok) > 258


@pytest.mark.parametrize("value", ["20.0", " 20 ", 20.0, 20, "20"], ids=repr)
def test_category_id_caption_is_the_class_training_and_zero_shot_read(tmp_path, value):
    """``{category_id}`` of the text "20.0" (a float column written as text) rendered "20.0", while
    training's label and the zero-shot class of that sample are 20: one category under two captions."""
    meta = {"title": "t", "category_id": value}
    assert category_label(value) == 20
    assert collect_label_values(_write_shard(tmp_path / "c.tar", [meta]), "category_id") == ["20"]
    assert render_caption("category {category_id}", meta, None) == "category 20"


@pytest.mark.parametrize(("value", "text"), [("3.5", "3.5"), (20.5, "20.5"), ("abc", "abc"), (-1, "-1")])
def test_category_id_that_is_no_class_keeps_its_text(value, text):
    """An id that is no class (label -1) is still the sample's text, not a skipped sample."""
    assert category_label(value) == -1
    assert render_caption("{category_id}", {"category_id": value}, None) == text


def test_tokenizer_texts_hold_category_names_as_captions_read_them(tmp_path):
    """NaN, true and a list as ``category_name`` went into the tokenizer's texts as "nan", "True",
    "['music', 'film']"; now NaN and true give none and a list each of its names."""
    metas = [
        {"title": "one", "category_name": math.nan},
        {"title": "two", "category_name": True},
        {"title": "three", "category_name": ["music", " ", "film"]},
        {"title": "four", "category_name": "Pets & Animals"},
        {"title": "five", "category_name": 20.0},
    ]
    texts = list(iter_shard_texts(_write_shard(tmp_path / "n.tar", metas), "{title}"))
    assert texts == ["one", "two", "three", "music", "film", "four", "Pets & Animals", "five", "20"]


def _clip_tokenizer(tmp_path) -> CLIPTokenizer:
    """OpenAI's CLIP tokenizer layout (byte symbols, their ``</w>`` forms, merges, bos, eos) on a few
    merges, built from local files as a hub CLIP tokenizer is."""
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (tmp_path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=77)


def test_truncated_captions_end_with_eos_for_trained_and_hub_tokenizers(tmp_path):
    """open_clip writes eos at the last position of a cut caption; HF CLIP pools at the first eos, so
    a caption cut without one would pool at a text token, not its end. Both tokenizers keep it, and odd
    text (emoji, RTL, combining marks, NUL) keeps its tokens."""
    odd = ["cat dog " * 20, "😀🐱", "مرحبا بالعالم", "e\u0301te\u0301", "a\x00b", "cat"]
    trained = train_bpe_tokenizer(WORDS, str(tmp_path / "bpe"), vocab_size=300, max_length=8)
    hub = _clip_tokenizer(tmp_path)
    for tok, eos in ((trained, EOS_ID), (hub, hub.eos_token_id)):
        ids = tokenize_batch(tok, odd, 8)["input_ids"]
        assert ids.shape == (len(odd), 8)
        assert ids[0, -1] == eos and (ids[0, 1:-1] != eos).all()  # cut: eos last, text before it
        for row in ids[1:5]:  # each odd caption keeps tokens of its own between bos and eos
            assert (row[1:] == eos).nonzero()[0].item() >= 2
        assert tok.decode(tok(odd[3])["input_ids"], skip_special_tokens=True).strip() == "\u00e9t\u00e9"
