"""A bracketed tags string that spells no JSON/Python list, read alike by `build` and the trainer.

``youtube.parse_tags`` (what `dataset_tools build` writes) dropped the outer brackets of such a
string and split it on ",": ``[remix] best of [live]`` was the tag "remix] best of [live". The
trainer (``tag_text.tag_values``, and split/dedup's ``reshard.conform_row``) kept the text, so an
unquoted list ``[music, live]`` (as R and JavaScript print one) trained as "[music" and "live]".
One rule now: an unquoted bracketed list with no brackets inside is its items; other bracketed
text is split on "|", else ",", brackets kept.

Runtime: under 1 s.
"""

from __future__ import annotations

import pyarrow as pa
import pytest

from dataset_tools import youtube
from dataset_tools.reshard import conform_row
from vutrain.tag_text import tag_values

# By form: the tags string, and the tags both readers take from it.
FORMS = {
    "bracketed_words": ("[remix] best of [live]", ["[remix] best of [live]"]),
    "unquoted_list": ("[music, live]", ["music", "live"]),
    "unquoted_list_spaced": (" [ lofi hip hop ,beats, ] ", ["lofi hip hop", "beats"]),
    "unquoted_list_with_entities": ("[Tom &amp; Jerry, cartoon]", ["Tom & Jerry", "cartoon"]),
    "unquoted_and_quoted_items": ("[music, 'live']", ["music", "live"]),
    "blank_items_only": ("[ , ]", []),
    "nested_list": ('[["a", "b"]]', []),  # a list whose item is no tag (test_review_tags.py)
    "kaggle_pipe_bracketed": ("[MV]|BTS|Dynamite [MV]", ["[MV]", "BTS", "Dynamite [MV]"]),
    "pipe_inside_brackets": ("[a|b]", ["[a", "b]"]),
    "bracketed_commas": ("[live] music, [remix] dance", ["[live] music", "[remix] dance"]),
    # Unchanged forms, for the record: a list literal, Kaggle's "no tags", plain joined text.
    "json_list": ('["x, y", "z"]', ["x, y", "z"]),
    "none": ("[none]", []),
    "plain_commas": ("music,live", ["music", "live"]),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_build_and_trainer_read_a_bracketed_string_alike(form):
    text, tags = FORMS[form]
    assert youtube.parse_tags(text) == tags
    assert [t.strip() for t in tag_values(text)] == tags
    assert tag_values(youtube.parse_tags(text)) == tags  # a built shard trains on the same tags


@pytest.mark.parametrize("form", list(FORMS))
def test_split_and_dedup_write_a_bracketed_string_as_the_trainer_reads_it(form):
    """A plain string conformed into a list column (split/dedup) holds the tags it trained on."""
    text, tags = FORMS[form]
    parts = conform_row({"tags": text}, pa.schema([("tags", pa.list_(pa.string()))]))["tags"]
    assert [t.strip() for t in tag_values(parts)] == tags
