"""``{tags}`` renders each tag once, as training ids it.

YouTube tag lists repeat a tag in other cases or widths ("Cats", "cats"; "ＧＴＡ５", "gta5"), and
the caption said "tags: Cats, cats" while the tag positives (``labels.sample_label``), the tag
metrics and `dataset_tools vocab` count one tag (``normalize_tag``). Now each normalised tag is
rendered once, in its first spelling, in the list's order; tags that are two ids ("#cats",
"cats") stay two.

Runtime: under 1 s.
"""

from __future__ import annotations

import json

import pytest

from vutrain.data.captions import MAX_CAPTION_CHARS, render_caption
from vutrain.data.labels import sample_label
from vutrain.data.samples import decode_caption

TEMPLATE = "{title}. tags: {tags}"

# By case: the tags field, and the tags the caption renders.
CASES = {
    "case": (["Cats", "funny", "cats", "CATS"], "Cats, funny"),
    "first_spelling_kept": (["cats", "Cats"], "cats"),
    "full_width": (["ＧＴＡ５", "gta5", "minecraft"], "ＧＴＡ５, minecraft"),
    "inner_whitespace": (["Lets  Play", "lets play"], "Lets  Play"),
    "surrounding_whitespace": ([" cats ", "cats"], "cats"),
    "case_folded": (["Straße", "music", "STRASSE"], "Straße, music"),
    "joined_string": ("Cats, funny ,cats", "Cats, funny"),
    "entities": (["Tom &amp; Jerry", "tom & jerry"], "Tom & Jerry"),
    "number_and_text": ([2024, "2024"], "2024"),
    # Distinct tags untouched, in their order.
    "distinct_order_kept": (["zebra", "apple", "mango"], "zebra, apple, mango"),
    "hash_is_another_tag": (["#cats", "cats"], "#cats, cats"),
}


def _raw(meta: dict) -> dict:
    return {"__key__": "000000001", "json": json.dumps(meta).encode()}


@pytest.mark.parametrize("case", list(CASES))
def test_tags_render_each_normalised_tag_once(case):
    tags, rendered = CASES[case]
    meta = {"title": "t", "tags": tags}
    assert decode_caption(_raw(meta), meta, TEMPLATE) == f"t. tags: {rendered}"
    # As many tags as training has tag ids for the sample.
    assert len(rendered.split(", ")) == len(sample_label(meta, "tags"))


def test_tags_format_spec_applies_to_the_distinct_tags():
    """A text spec (``{tags:.N}``) cuts the rendered list, which no longer holds the repeats."""
    meta = {"title": "t", "tags": ["Cats", "cats", "dogs"]}
    assert render_caption("{tags:.9}", meta, None) == "Cats, dog"
    assert render_caption("{tags:.200}", meta, None) == "Cats, dogs"


def test_many_repeats_make_a_short_caption():
    """A tag list of one tag repeated in many spellings is one tag, not a caption cut at the limit."""
    meta = {"title": "t", "tags": ["Cats", "cats", "CATS", " cats "] * 5000}
    assert len(", ".join(meta["tags"])) > MAX_CAPTION_CHARS
    assert render_caption(TEMPLATE, meta, None) == "t. tags: Cats"
