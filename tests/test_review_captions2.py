"""YouTube text from a sample's `.json` to the tokens the model sees, against the zero-shot prompts.

A tag is one class in the form ``tag_text.normalize_tag`` gives it (NFKC, case-folded, whitespace
runs as one space); captions reach the tokenizer as the metadata writes them. The preset tokenizer
must give both the same tokens, or the model is evaluated (and exported) on prompts it never saw.
"""

import json

import pytest
from transformers import AutoTokenizer

from vutrain.data.samples import decode_caption, decode_meta
from vutrain.data.tokenizer import make_tokenize, train_bpe_tokenizer
from vutrain.data.val import label_values

TEMPLATE = "a thumbnail of {}."
CONTEXT = 24
# (the tag as YouTube metadata writes it) full-width (Japanese tag lists), German ß, two spaces,
# upper-case Greek with its final sigma, a ligature.
SPELLINGS = ["ＧＴＡ５", "Straße", "Lets  Play", "ΟΔΟΣ", "ﬁfa"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(training's tokenize, eval/export's tokenize): one preset tokenizer, as trained and as
    `AutoTokenizer` reloads it from the run's folder."""
    out = str(tmp_path_factory.mktemp("tok"))
    texts = [TEMPLATE.format(t) for t in SPELLINGS + ["gta5", "strasse", "lets play", "οδος", "fifa"]] * 8
    tokenizer = train_bpe_tokenizer(texts, out, vocab_size=320, max_length=CONTEXT)
    return make_tokenize(tokenizer, CONTEXT), make_tokenize(AutoTokenizer.from_pretrained(out), CONTEXT)


def _caption(meta: dict) -> str:
    raw = {"__key__": "v", "json": json.dumps(meta).encode()}
    return decode_caption(raw, decode_meta(raw), TEMPLATE.replace("{}", "{tags}"))


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_a_tag_trains_on_the_tokens_of_its_zero_shot_prompt(trained, spelling):
    """With NFC and lower-casing alone, the caption of tag "ＧＴＡ５" was encoded as full-width bytes
    while the zero-shot class "gta5" was prompted in ASCII ("straße"/"strasse", "lets  play"/"lets
    play", "οδοσ"/"οδος" likewise): the class a sample trained on was never the prompt it scored."""
    train_tokenize, eval_tokenize = trained
    meta = {"title": "x", "tags": [spelling]}
    (cls,) = label_values(meta["tags"], "tags")  # the zero-shot class, as eval and the tag metrics name it
    caption_ids = train_tokenize([_caption(meta)])["input_ids"]
    prompt_ids = eval_tokenize([TEMPLATE.format(cls)])["input_ids"]
    assert caption_ids.tolist() == prompt_ids.tolist(), (spelling, cls)


def test_upper_and_lower_case_greek_titles_are_one_text(trained):
    """The tokenizer lower-cased a word-final "Σ" to "σ", where lower-case Greek writes "ς": the
    title "ΟΔΟΣ" and the title "οδος" were two texts to a lower-casing tokenizer."""
    train_tokenize, _ = trained
    ids = train_tokenize(["ΟΔΟΣ ΣΑΣ", "οδος σας"])["input_ids"].tolist()
    assert ids[0] == ids[1]


def test_a_long_title_keeps_its_end_of_text_after_normalising(trained):
    """Emoji ZWJ sequences, right-to-left text and full-width letters past the context length: the
    last token is still the eos CLIP pools at, and the padding-free row holds no other eos."""
    train_tokenize, eval_tokenize = trained
    title = "👨‍👩‍👧 שלום ＧＡＭＥ " * 40
    for tokenize in trained:
        row = tokenize([title])["input_ids"][0].tolist()
        assert row[-1] == 1 and row.count(1) == 1 and len(row) == CONTEXT
    assert train_tokenize([title])["input_ids"].tolist() == eval_tokenize([title])["input_ids"].tolist()
