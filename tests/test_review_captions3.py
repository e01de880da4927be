"""Captions and tags from shards the dataset tools did not build, read through the real stream.

Plain img2dataset run on YouTube Data API results or a Kaggle CSV writes the metadata as it came:
HTML-escaped titles ("Tom &amp; Jerry", "It&#39;s") and tags joined with "|" (``a|"b c"``). The
trainer reads them as `dataset_tools build` cleans them (``youtube.clean_title`` /
``youtube.parse_tags``), so a plain shard and a built shard of the same video give one caption and
one tag set, and eval's tag classes are the user's "Tom & Jerry".
"""

import json

import pytest
from tar_shards import image_bytes, read_captions, write_members

from dataset_tools.youtube import clean_title, parse_tags
from vutrain.data.captions import render_caption
from vutrain.data.labels import sample_label, tag_id
from vutrain.data.tokenizer import iter_shard_texts
from vutrain.data.val import collect_label_values
from vutrain.tag_text import normalize_tag, tag_values

TEMPLATE = "{title}. tags: {tags}"
# One video as the Data API / a Kaggle CSV hands it over: an escaped title (once more escaped where
# the title itself says "&amp;"), Kaggle's "|"-joined, quoted tags, one of them an escaped quote.
RAW_TITLE = "Tom &amp; Jerry: It&#39;s &quot;Cat&quot; Time &amp;amp; more"
RAW_TAGS = 'Tom &amp; Jerry|"cat and mouse"|&quot;Cartoon&quot;|[MV] clip'
TITLE = 'Tom & Jerry: It\'s "Cat" Time & more'
TAGS = ["Tom & Jerry", "cat and mouse", "Cartoon", "[MV] clip"]


def _sample(key: str, meta: dict, txt: str) -> list[tuple[str, bytes]]:
    return [
        (f"{key}.jpg", image_bytes()),
        (f"{key}.txt", txt.encode()),
        (f"{key}.json", json.dumps(meta).encode()),
    ]


@pytest.fixture
def shard(tmp_path):
    """Plain img2dataset's sample, `dataset_tools build`'s sample of the same video, and a Kaggle
    row without tags ("[none]")."""
    plain = {"title": RAW_TITLE, "tags": RAW_TAGS}
    built = {"title": clean_title(RAW_TITLE), "tags": parse_tags(RAW_TAGS)}
    untagged = {"title": "No tags &amp; no labels", "tags": "[none]"}
    members = _sample("000", plain, RAW_TITLE) + _sample("001", built, built["title"])
    members += _sample("002", untagged, untagged["title"])
    return write_members(tmp_path / "000000.tar", members)


def _read(shard: str) -> list[tuple[str, set[int]]]:
    return read_captions(shard, 3, TEMPLATE)  # one epoch, in tar order (shuffle_buffer 1)


def test_plain_and_built_shards_train_on_one_caption_and_one_tag_set(shard):
    """The plain shard trained on "Tom &amp; Jerry: It&#39;s ..." and on one tag 'Tom &amp;
    Jerry|"cat and mouse"|...' while the built shard of the same video trained on "Tom & Jerry" and
    four tags; Kaggle's "[none]" was a tag every untagged video shared (each other's positives)."""
    (plain, built, untagged) = sorted(_read(shard), key=lambda s: "No tags" in s[0])
    assert plain == built
    caption, labels = plain
    assert caption == f"{TITLE}. tags: {', '.join(TAGS)}"
    assert labels == {tag_id(t) for t in ("tom & jerry", "cat and mouse", "cartoon", "[mv] clip")}
    assert untagged == ("No tags & no labels. tags: ", set())


def test_eval_classes_and_tokenizer_texts_read_the_decoded_tags(shard):
    """Eval's tag classes are the user's spelling "tom & jerry" (a zero-shot prompt or eval tag
    written by hand), one class for both shards, and the tokenizer learns no "&amp;"."""
    classes = collect_label_values(shard, "tags")
    assert classes == sorted({normalize_tag(t) for t in TAGS}) and normalize_tag("Tom & Jerry") in classes
    texts = list(iter_shard_texts(shard, TEMPLATE))
    assert texts and not any("&amp;" in t or "&#39;" in t or "&quot;" in t or "|" in t for t in texts)


@pytest.mark.parametrize(
    "raw",
    [
        "rock &amp; roll &amp;amp; blues",  # escaped twice: the dataset tools decode until stable
        "Q&A: AT&T &lt;3",  # a bare "&" is text
        "It&#39;s &#x1F600; time",
        "&amp;lt;b&amp;gt; is bold",  # a title about HTML: decoded as the dataset tools decode it
    ],
)
def test_a_title_reads_as_the_dataset_tools_clean_it_and_a_clean_one_is_left_alone(raw):
    """Decoding in the trainer gives a plain shard's title the text a built shard holds, and leaves
    the built shard's (already decoded) title unchanged: no second decode of a title that says
    "&lt;b&gt;" after one."""
    built = clean_title(raw)
    assert render_caption("{title}", {"title": raw}, None) == built
    assert render_caption("{title}", {"title": built}, None) == built
    assert render_caption("{txt}", {}, raw) == built


@pytest.mark.parametrize(
    "raw",
    [
        'funny|"cat video"|cats',
        "music,live,rock",
        " a , b ,, c ",
        "&quot;quoted&quot;|x",
        "[none]",
        "[MV]|BTS",
    ],
)
def test_a_tag_string_reads_as_the_dataset_tools_split_it(raw):
    """Training's tags of a plain shard's tag string are the tags `dataset_tools build` writes for
    it, and reading the built list gives those tags again (ids, captions and vocab agree)."""
    plain = [normalize_tag(t) for t in tag_values(raw)]
    built = [normalize_tag(t) for t in tag_values(parse_tags(raw))]
    assert plain == built == [normalize_tag(t.strip('"')) for t in parse_tags(raw)]
    meta = {"tags": raw}
    assert sample_label(meta, "tags") == sorted({tag_id(t) for t in plain})
    assert render_caption("{tags}", meta, None) == ", ".join(t.strip() for t in tag_values(raw))
