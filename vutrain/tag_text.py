"""Tags as text: which values of a metadata ``tags`` field are tags, and the one form of each.

Torch-free, so that `dataset_tools vocab` (which must count tags as training ids them) shares
these two rules with the trainer instead of a copy that drifted: the copy lower-cased and
stripped while training came to apply NFC and collapse inner whitespace.
"""

from __future__ import annotations

import unicodedata


def tag_values(value) -> list[str]:
    """The tags of a metadata ``tags`` value: a list's strings (and numbers, as text: a scraper may
    write the tag "2024" as 2024; a lone number is one tag), or a comma-separated string's parts
    (some metadata sources keep tags as one string), blanks left out. Training's tag positives,
    the validation tag metrics, captions' ``{tags}`` and `dataset_tools vocab` all read tags
    through this, so they agree (a string was iterated character by character: a vocabulary of
    letters; a number was dropped from the tags but rendered in captions, blanks too)."""
    if isinstance(value, str):
        value = value.split(",")
    elif _as_text(value) is not None:
        value = [value]  # a lone number is one tag, as in a list (a column whose rows are all numbers)
    if not isinstance(value, (list, tuple)):
        return []
    tags = [_as_text(t) for t in value]
    return [t for t in tags if t is not None and t.strip()]


def _as_text(tag) -> str | None:
    if isinstance(tag, str):
        return tag
    if isinstance(tag, int) and not isinstance(tag, bool):
        return str(tag)
    if isinstance(tag, float) and tag.is_integer():
        return str(int(tag))
    return None


def normalize_tag(tag: str) -> str:
    """The one form of a tag that training ids, the tag metrics, zero-shot tag classes and the
    dataset tools' vocabulary all use.

    NFC then lower-case, as the tokenizers normalise text, so two spellings the text tower cannot
    tell apart are one tag: "café" typed composed or decomposed (NFD, as macOS file names and some
    scrapers write it) hashed to two ids and made two tag-metric columns with identical prompts.
    Whitespace runs count as one space ("lets  play" is "lets play"), leading and trailing none."""
    return " ".join(unicodedata.normalize("NFC", tag).lower().split())
