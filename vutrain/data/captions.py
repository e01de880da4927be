"""Caption templates: how a sample's text is built from its ``.txt`` and ``.json`` metadata.

Templates use ``str.format`` placeholders, e.g. ``"{title}"``, ``"{title}. tags: {tags}"``,
``"{category_name}"``. ``{txt}`` / ``{caption}`` is the ``<key>.txt`` member, ``{tags}`` the tag
list joined by ", " (each tag once as training ids it, in its first spelling), every other name a
``<key>.json`` field. ``{title}`` falls back to the ``.txt`` caption when the metadata has no
title (img2dataset writes the title as the caption).

A field is text when it is a string or a number (an integral float as its integer: 20.0 is what a
pandas column with gaps makes of 20). A field holding no text (a list, an object, true/false, NaN,
which pandas writes for a missing value) is missing, and so is a blank title: a missing title
falls back to the ``.txt``; without one the sample is skipped and counted. ``{category_id}`` renders
the class training and zero-shot read (``labels.category_label``): "20.0", " 20 " and 20 are "20".

Text has its HTML entities decoded, as `dataset_tools build` decodes titles and tags and as the
tags training ids are read (``tag_text``): the YouTube Data API escapes titles ("Tom &amp; Jerry"),
and shards made from its results with plain img2dataset trained on the escaped text while the
tag classes and zero-shot prompts say "Tom & Jerry".
"""

from __future__ import annotations

import math
import string

from vutrain.tag_text import has_visible_text, normalize_tag, tag_values, unescape_entities

from .labels import category_label

CAPTION_FIELDS = (
    "title",
    "tags",
    "category_name",
    "category_id",
    "txt",
    "caption",
    "video_id",
    "channel_title",
    "description",
    "variant",
)
"""Placeholders a caption template may use."""

MAX_CAPTION_CHARS = 32_768
"""Captions are cut to this many characters. The tokenizer truncates to the context length anyway
(77 tokens for CLIP, a few hundred characters), but only after encoding the whole text: a 5 MB
description pasted into a title took 40 s and 1.5 GB of a loader worker. The bound leaves room for
contexts of thousands of tokens, so the tokens training sees do not change."""


class MissingCaptionField(ValueError):
    """A sample lacks a field that the caption template needs (the sample is skipped and counted)."""

    def __init__(self, field: str, detail: str = ""):
        super().__init__(f"sample has no value for caption field {field!r}{detail}")
        self.field = field


def template_fields(template: str) -> list[str]:
    """Placeholders of ``template``; ValueError naming the valid ones if any is unknown."""
    fields = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"data.caption_template {template!r} is not a valid format string: {e}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name not in CAPTION_FIELDS:
            valid = ", ".join("{" + f + "}" for f in CAPTION_FIELDS)
            raise ValueError(
                f"data.caption_template {template!r} has unknown placeholder {{{name}}}; use one of {valid}."
            )
        fields.append(name)
    try:  # fields are rendered as text: a numeric format spec or a bad conversion fails every sample
        template.format(**{name: "text" for name in fields})
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise ValueError(
            f"data.caption_template {template!r} cannot be rendered: {e!r}. Fields are text: use "
            "string formatting only, e.g. {title:.200} or {category_id}."
        ) from None
    return fields


def _field_value(name: str, meta: dict, txt: str | None) -> str:
    if name in ("txt", "caption"):
        value = None if txt is None else unescape_entities(txt)
    elif name == "tags":
        tags = meta.get("tags")
        # The tags training reads (tag_text.tag_values), stripped, whatever form the field has: a
        # list rendered blanks and non-tags ("cats, , funny", "cats, None"), and a comma-separated
        # string or a lone number went in verbatim ("cats,, funny", "2024") while training read
        # "cats", "funny" and no tag.
        value = None if _is_absent(tags) else ", ".join(_distinct_tags(tag_values(tags)))
    elif name == "category_id":
        value = _category_id_text(meta.get(name))
    else:
        value = caption_text(meta.get(name))
        if name == "title" and not has_visible_text(value or ""):
            # A blank or non-text title is no title, as a missing one: it was skipped as an empty
            # caption (or rendered as "['a', 'b']", "nan") although the .txt held the caption; so is
            # a title of zero-width characters only (YouTube titles that look empty use them).
            value = None if txt is None else unescape_entities(txt)
    if value is None:
        raise MissingCaptionField(name, _no_text_detail(meta.get(name)))
    return value


def _distinct_tags(tags: list[str]) -> list[str]:
    """``tags`` stripped, each tag once as training ids it (``normalize_tag``), in the first spelling
    and order: "Cats" and "cats" rendered "tags: Cats, cats" while the tag positives, the tag
    metrics and the vocabulary count them as one tag. "#cats" and "cats" stay two, as they are two ids.
    """
    seen = set()
    distinct = []
    for tag in tags:
        form = normalize_tag(tag)
        if form not in seen:
            seen.add(form)
            distinct.append(tag.strip())
    return distinct


def caption_text(value) -> str | None:
    """``value`` as caption text, HTML entities decoded (``tag_text.unescape_entities``); None for a
    value that holds none (its repr is not a caption)."""
    if isinstance(value, str):
        return unescape_entities(value)
    if isinstance(value, bool):  # a JSON true/false: "True" is Python's spelling, not the data's
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def _category_id_text(value) -> str | None:
    # The id as the class it is: the text "20.0" (a float column written as text) was rendered
    # "20.0" beside "20" for the number: one category trained under two captions, one of them not
    # the zero-shot class name "20" that eval.zeroshot_field=category_id prompts with.
    label = category_label(value)
    return str(label) if label != -1 else caption_text(value)


def _is_absent(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _no_text_detail(value) -> str:
    if _is_absent(value) or isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return ""
    return f" (its .json value is {type(value).__name__} {str(value)[:40]!r}, not text)"


def render_caption(template: str, meta: dict, txt: str | None) -> str:
    """Render ``template`` for one sample (``meta``: its ``.json``, ``txt``: its ``.txt`` or None),
    cut to :data:`MAX_CAPTION_CHARS`.

    Raises:
        ValueError: unknown placeholder in the template.
        MissingCaptionField: the sample lacks a needed field.
    """
    values = {name: _field_value(name, meta, txt) for name in template_fields(template)}
    return template.format(**values)[:MAX_CAPTION_CHARS]
