"""Fourth review of blank tags: blank-looking letters and symbols (Hangul fillers, the braille blank).

A caption of a Hangul filler alone was skipped as empty (``has_visible_text`` counted it blank), but a
tag of it alone was a tag: one id shared by every sample that had it, rendered into captions'
``{tags}``, written by `dataset_tools build` and counted by `dataset_tools vocab`. Captions and
tags now share one rule (``tag_text.has_visible_text``)."""

from __future__ import annotations

from test_dataset_tools_subcommands import _plain_shard

from dataset_tools import vocab, youtube
from vutrain import tag_text
from vutrain.data import captions
from vutrain.data.captions import has_visible_text
from vutrain.data.labels import sample_label
from vutrain.data.samples import SkipSample, decode_caption
from vutrain.tag_text import invisible_format_pattern, normalize_tag, tag_values

# U+3164 Hangul filler, U+115F/U+1160 Hangul choseong/jungseong fillers, U+FFA0 halfwidth Hangul
# filler, U+2800 braille blank, U+034F combining grapheme joiner: letters, a symbol and a mark that
# render as nothing (YouTube channels use them for blank-looking titles and tags).
BLANK_LOOKING = ["\u3164", "\u115f", "\u1160", "\uffa0", "\u2800", "\u034f", " \u3164\u3164 ", "\u2800\u200b"]


def test_a_tag_of_blank_looking_characters_alone_is_no_tag():
    for value in BLANK_LOOKING:
        assert tag_values([value, "cats"]) == ["cats"], ascii(value)
        assert tag_values(f"{value}|cats") == ["cats"], ascii(value)
        assert normalize_tag(value) == "", ascii(value)
        assert sample_label({"tags": [value]}, "tags") == [], ascii(value)
        assert youtube.parse_tags([value, "cats"]) == ["cats"], ascii(value)  # what build writes


def test_captions_and_tags_share_one_blank_rule():
    """The caption's empty check and the tag reader are one function, so they cannot drift."""
    assert captions.has_visible_text is tag_text.has_visible_text
    for char in tag_text.BLANK_CHARS:
        assert not has_visible_text(char) and normalize_tag(char) == ""
    for value in BLANK_LOOKING:
        # Rendered alone into a caption, such a tag made a caption that was skipped as empty.
        assert captions.render_caption("{tags}", {"tags": [value, "cats"]}, None) == "cats"
        raw = {"__key__": "k", "txt": value.encode()}
        try:
            decode_caption(raw, {}, "{txt}")
        except SkipSample as skip:
            assert skip.reason == "empty_caption"
        else:
            raise AssertionError(f"{ascii(value)} passed as a caption")
    # Letters next to a filler keep the tag (a filler inside old Hangul text is part of it).
    assert tag_values(["\u3164cats"]) == ["\u3164cats"]
    assert has_visible_text("\x07") is False and tag_values(["\x07", "a"]) == ["a"]  # controls too


def test_the_invisible_format_definition_is_unchanged():
    """Blank-looking characters are not format characters: the tokenizer's pattern leaves them,
    and the tag reader leaves them out as whole tags only."""
    pattern = invisible_format_pattern()
    assert not any(char in pattern for char in tag_text.BLANK_CHARS)


def test_vocab_counts_no_blank_looking_tag(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 2, tags="music, \u3164, \u2800")
    result = vocab.build_vocab(str(src), min_count=1)
    assert [(e["name"], e["count"]) for e in result["tags"]] == [("music", 2)]
