"""Third review of invisible format characters: the build's tags and the preset tokenizer's text.

Training and `dataset_tools vocab` read "music\\u200b" as "music" and a lone U+200B as no tag
(test_review_tags2.py), but `dataset_tools build` wrote them into the shards as they came, so the
shards' json/txt held "cats\\u200b" and the tag "\\u200b" where training reads "cats" and nothing.
The preset tokenizer kept them in titles: "I love \\u200bcats" tokenised apart from "I love cats".
Both now use the one definition of an invisible character (``tag_text.is_invisible_format``), which
keeps ZWNJ and ZWJ between letters (Persian spelling, emoji sequences)."""

from __future__ import annotations

import re
import sys
import unicodedata

from test_review_tags2 import INVISIBLE_ONLY, MUSIC_SPELLINGS
from transformers import AutoTokenizer

from dataset_tools import metadata, youtube
from vutrain.data.tokenizer import text_normalizer, train_bpe_tokenizer
from vutrain.tag_text import invisible_format_pattern, is_invisible_format, normalize_tag, tag_values

PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # "می‌خواهم": ZWNJ inside the word
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # man ZWJ woman ZWJ girl
SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"


def test_built_tags_lose_invisible_format_characters():
    """`build` wrote "music\\u200b", "\\ufeffMusic", "mu\\u00adsic" as three tags besides "music"."""
    assert youtube.parse_tags(MUSIC_SPELLINGS) == ["music", "Music"]
    assert youtube.parse_tags("|".join(MUSIC_SPELLINGS)) == ["music", "Music"]
    assert youtube.parse_tags(['"\u200bdogs"', "a \u200b b"]) == ["dogs", "a b"]


def test_a_built_tag_of_invisible_characters_alone_is_left_out():
    """A lone U+200B (or U+2060 + BOM, bidi marks, a stray ZWJ, "&#8203;") was written as a tag."""
    for value in INVISIBLE_ONLY:
        assert youtube.parse_tags([value, "cats"]) == ["cats"], ascii(value)
        assert youtube.parse_tags(f"{value},cats") == ["cats"], ascii(value)
        assert youtube.parse_tags([value]) == [], ascii(value)


def test_built_tags_keep_the_format_characters_that_carry_meaning():
    """ZWNJ, ZWJ and flag tag characters inside a tag stay (distinct tags stay distinct); joiners at
    its ends join nothing and go, as training drops them."""
    assert youtube.parse_tags([PERSIAN, FAMILY, SCOTLAND]) == [PERSIAN, FAMILY, SCOTLAND]
    assert youtube.parse_tags(["\u200c" + PERSIAN + "\u200c", "\u200d" + FAMILY]) == [PERSIAN, FAMILY]


def test_training_reads_a_built_tag_list_as_it_reads_the_input():
    """The shards hold the tags training reads: read again they are unchanged, and they id as
    training ids the input's tags."""
    inputs = [
        MUSIC_SPELLINGS,
        INVISIBLE_ONLY + ["cats"],
        [PERSIAN + "\u200b", "\ufeff" + FAMILY, SCOTLAND, '"\u2060quoted\u200e"', "&quot;x\u00ad&quot;"],
        "music\u200b|\u200b|\u202edogs\u202c",
    ]
    for value in inputs:
        built = youtube.parse_tags(value)
        assert tag_values(built) == built, ascii(built)
        trained = {normalize_tag(t) for t in tag_values(value)}
        assert {normalize_tag(t) for t in built} == trained, ascii(value)


def test_a_csv_build_writes_the_tags_without_invisible_characters(tmp_path):
    """Through the real metadata reader: a Kaggle-style ``|``-joined tags column and a JSON-list one."""
    path = tmp_path / "videos.csv"
    path.write_text(
        "video_id,title,tags\n"
        'abcdefghijk,One,"cats\u200b|\u200b|\ufeffMusic"\n'
        f'bcdefghijkl,Two,"[""\u2060"", ""{PERSIAN}\u200c"", ""dogs\u00ad""]"\n',
        encoding="utf-8",
    )
    result = metadata.read_metadata([str(path)])
    assert [r["tags"] for r in result.rows] == [["cats", "Music"], [PERSIAN, "dogs"]]
    assert result.values_left_out["tags"] == 0  # blank and invisible items are no tag, as ",," is


def test_the_tokenizer_normalises_invisible_characters_as_tags_do():
    """The tokenizer's text form is ``normalize_tag``'s, format characters included."""
    normalizer = text_normalizer()
    texts = MUSIC_SPELLINGS[:-1] + [
        "I love \u200bcats",
        "mu\u00adsic \ufeffVideo\u2060 \u202eLive\u202c",
        PERSIAN + " \u200c" + FAMILY + "\u200d",
        SCOTLAND,
        "a\u200d\u3000b",
    ]
    for text in texts:
        assert normalizer.normalize_str(text) == normalize_tag(text), ascii(text)
    assert normalizer.normalize_str("I love \u200bcats") == "i love cats"
    assert normalizer.normalize_str(PERSIAN) == PERSIAN  # ZWNJ kept: a different word without it


def test_the_tokenizer_pattern_is_the_one_definition_of_invisible():
    """The tokenizer's character class holds exactly the characters tags lose."""
    pattern = re.compile(invisible_format_pattern())
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if unicodedata.category(char) == "Cf":
            assert bool(pattern.fullmatch(char)) == is_invisible_format(char), hex(code)
    assert not pattern.search("abc \u200c\u200d\U000e0067 \u0600")


def test_a_trained_tokenizer_encodes_a_title_as_it_encodes_it_without_invisible_characters(tmp_path):
    """Trained, saved and loaded back as training and eval load it: a zero-width space, a BOM or a
    soft hyphen no longer changes a title's tokens ("cats" lost its leading-space token)."""
    corpus = ["I love cats", "I love music videos", "cats and dogs", PERSIAN + " music"] * 20
    train_bpe_tokenizer(corpus, str(tmp_path / "tok"), vocab_size=300, max_length=32)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    pairs = [
        ("I love \u200bcats", "I love cats"),
        ("\ufeffmu\u00adsic vid\u2060eos", "music videos"),
        ("\u200d" + PERSIAN + "\u200e music", PERSIAN + " music"),
    ]
    for with_marks, without in pairs:
        assert tok(with_marks)["input_ids"] == tok(without)["input_ids"], ascii(with_marks)
    assert tok(PERSIAN)["input_ids"] != tok(PERSIAN.replace("\u200c", ""))["input_ids"]
