"""``vocab DIR --output V.json``: tag and category vocabularies for zero-shot evaluation.

Tags are counted as training ids them (vutrain/tag_text.py: NFKC, case-folded, whitespace runs as
one space, so ``Cat `` and ``cat`` are one class), a comma-separated string split into its tags, over
successful samples; entries below ``min_count`` are dropped. Indices follow descending count, then name.
"""

from __future__ import annotations

import os
from collections import Counter

from dataset_tools import shards
from dataset_tools.reshard import iter_sample_rows, require_whole_shards
from dataset_tools.split import skipped_shards
from vutrain.tag_text import normalize_tag, tag_values


def build_vocab(folder: str, min_count: int = 5) -> dict:
    """Tag and category vocabularies of the successful samples, entries below ``min_count`` dropped.

    The samples are those split and dedup read (``iter_sample_rows``: every sample of a tar, its
    metadata from its parquet row, else from its ``.json`` as training reads it), counted in
    ``samples``; ``failures``: the parquet rows that are no sample (not a success), left out. Read
    from the parquets' successful rows alone, a sample only in the tar was left out (its tags, which
    training sees, missing), and a damaged tar that split and dedup refuse was not noticed. Incomplete
    shards (no stats yet: a build still running or stopped) are left out, named on stderr and in
    ``skipped_incomplete_shards`` (tars not named ``NNNNN.tar`` in ``skipped_not_shards``), as split
    and dedup do: their tags were left out without a word, so a vocabulary of a half-built folder
    passed for one of the whole folder."""
    shards.require_shards(folder)
    # Listed once: each step listed the shards anew, so one a running build completed meanwhile was
    # named skipped while its tags were counted, or counted without the check of its tar.
    names = list(shards.iter_shard_names(folder))
    require_whole_shards(folder, "vocab", names)  # an unreadable parquet or a damaged tar: one line
    skipped = skipped_shards(folder, "vocab", names)
    tags, categories = Counter(), Counter()
    samples = failures = 0
    for name in names:
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        failures += sum(row["status"] != shards.SUCCESS for row in rows)
    for _key, row in iter_sample_rows(folder, names):
        samples += 1
        tags.update({normalize_tag(t) for t in tag_values(row.get("tags"))})
        if row.get("category_name"):
            categories[row["category_name"]] += 1

    def entries(counter):
        kept = sorted(((n, c) for n, c in counter.items() if c >= min_count), key=lambda t: (-t[1], t[0]))
        return [{"index": i, "name": n, "count": c} for i, (n, c) in enumerate(kept)]

    return {
        "min_count": min_count,
        "samples": samples,
        "failures": failures,
        "tags": entries(tags),
        "categories": entries(categories),
        **skipped,
    }


def save(vocab: dict, path: str) -> None:
    """Write a vocabulary as JSON to ``path`` (creating its folder), atomically: it was written in
    place, so a kill or a full disk mid-write replaced a good vocabulary with a truncated one."""
    shards.save_json(path, vocab, "vocabulary")
