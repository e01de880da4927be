"""Review of invisible format characters in tags (``tag_text.normalize_tag`` and ``tag_values``).

Zero-width spaces, byte order marks, word joiners, soft hyphens and bidi marks ride along with tags
copied from web pages and spreadsheets: "music\\u200b" and "\\ufeffmusic" were tags apart from
"music" in `dataset_tools vocab` and in training, and a tag of a lone U+200B was a real tag id that
made unrelated samples positives of each other under ``loss.positives=tags``. The format characters
that carry meaning inside a word (ZWNJ in Persian, ZWJ in emoji sequences, flag tag characters)
keep distinct tags distinct."""

from __future__ import annotations

from test_dataset_tools_subcommands import _plain_shard

from dataset_tools import vocab
from vutrain.data.labels import sample_label, tag_id
from vutrain.data.tokenizer import iter_shard_texts, text_normalizer
from vutrain.tag_text import normalize_tag, tag_items, tag_values

# Spellings of the tag "music" with invisible format characters, as scraped tag lists hold them.
MUSIC_SPELLINGS = [
    "music\u200b",  # zero-width space
    "\ufeffMusic",  # byte order mark (a spreadsheet export's first cell)
    "\u2060music\u200e",  # word joiner, left-to-right mark
    "mu\u00adsic",  # soft hyphen
    "\u200dmusic\u200c",  # joiners that join nothing
    "&#8203;music",  # a zero-width space as an HTML entity
]
INVISIBLE_ONLY = ["\u200b", "\u2060\ufeff", "\u200e\u200f", "\u200d", " \u200b ", "&#8203;"]
INVISIBLE_ONLY.append("\U000e0067\U000e007f")  # flag tag characters without their flag


def test_a_tag_with_invisible_format_characters_is_the_tag_without_them():
    """Each spelling is read as the tag "music" and ids as "music" does (each was its own id)."""
    assert tag_values(MUSIC_SPELLINGS) == ["music", "Music", "music", "music", "music", "music"]
    assert {normalize_tag(t) for t in MUSIC_SPELLINGS[:-1]} == {"music"}  # entities: tag_values
    assert sample_label({"tags": MUSIC_SPELLINGS}, "tags") == [tag_id("music")]
    # A joined string, as plain img2dataset shards keep tags, reads alike.
    assert sample_label({"tags": "|".join(MUSIC_SPELLINGS)}, "tags") == [tag_id("music")]


def test_a_tag_of_invisible_characters_alone_is_no_tag():
    """A lone U+200B was a tag id shared by every sample that had one: unrelated samples became
    positives of each other. It is left out as an empty tag is (not counted as a non-tag item)."""
    for value in INVISIBLE_ONLY:
        assert tag_values([value, "cats"]) == ["cats"], ascii(value)
        assert tag_values(f"{value},cats") == ["cats"], ascii(value)
        assert normalize_tag(value.replace("&#8203;", "\u200b")) == "", ascii(value)
    assert tag_items(["\u200b", ""]) == (["\u200b", ""], 0)  # text items: read as written
    assert [sample_label({"tags": [v]}, "tags") for v in INVISIBLE_ONLY] == [[]] * len(INVISIBLE_ONLY)


def test_format_characters_that_carry_meaning_keep_tags_apart():
    """Stripping every Cf character would merge distinct tags: the Persian word with its ZWNJ, an
    emoji family joined by ZWJ, the Scottish flag (black flag + tag characters)."""
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # "می‌خواهم"
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    scotland = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
    for tag, without in [
        (persian, persian.replace("\u200c", "")),
        (family, family.replace("\u200d", "")),
        (scotland, "\U0001f3f4"),
    ]:
        assert tag_values([tag]) == [tag]
        assert normalize_tag(tag) == tag
        assert tag_id(tag) != tag_id(without)
    assert normalize_tag("\u200b" + persian + "\u200c") == persian  # stray marks at the ends go


def test_vocab_and_the_tokenizer_texts_read_invisible_spellings_as_the_one_tag(tmp_path):
    """`dataset_tools vocab` counts "music\\u200b" and "\\ufeffMusic" as "music" (they were three
    entries and the lone U+200B a fourth), and the tokenizer trains on the tag texts the vocabulary
    names once normalised as it normalises text (NFKC, lower case, whitespace), not on the ZWSP."""
    src = tmp_path / "src"
    src.mkdir()
    _plain_shard(src, 0, 2, tags="music\u200b, \u200b, cats")
    _plain_shard(src, 1, 2, tags="\ufeffMusic|\u2060|Cats\u200e")
    result = vocab.build_vocab(str(src), min_count=1)
    assert [(e["name"], e["count"]) for e in result["tags"]] == [("cats", 4), ("music", 4)]

    texts = list(iter_shard_texts(f"{src}/{{00000..00001}}.tar", "{txt}"))
    tag_texts = [t for t in texts if t != "c"]  # the caption of every sample is "c"
    assert len(tag_texts) == 4
    normalizer = text_normalizer()
    names = {e["name"] for e in result["tags"]}
    for text in tag_texts:
        assert set(normalizer.normalize_str(text).split(", ")) == names, ascii(text)
