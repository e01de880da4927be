"""``vocab DIR --output V.json``: tag and category vocabularies for zero-shot evaluation.

Tags are counted as training ids them (vutrain/tag_text.py: NFKC, case-folded, whitespace runs as
one space, so ``Cat `` and ``cat`` are one class), a comma-separated string split into its tags, over
successful samples; entries below ``min_count`` are dropped. Indices follow descending count, then name.
"""

from __future__ import annotations

import os
from collections import Counter

from dataset_tools import shards
from dataset_tools.reshard import refuse_broken_shards
from dataset_tools.split import skipped_shards
from vutrain.tag_text import normalize_tag, tag_values


def build_vocab(folder: str, min_count: int = 5) -> dict:
    """Tag and category vocabularies of the successful samples, entries below ``min_count`` dropped.
    Incomplete shards (no stats yet: a build still running or stopped) are left out, named on stderr
    and in ``skipped_incomplete_shards`` (tars not named ``NNNNN.tar`` in ``skipped_not_shards``),
    as split and dedup do: their tags were left out without a word, so a vocabulary of a half-built
    folder passed for one of the whole folder."""
    shards.require_shards(folder)
    skipped = skipped_shards(folder, "vocab")
    tags, categories = Counter(), Counter()
    for name in shards.iter_shard_names(folder):
        path = os.path.join(folder, f"{name}.parquet")
        problem = shards.parquet_problem(path)
        if problem:  # it was a pyarrow traceback
            refuse_broken_shards(folder, "vocab", [(name, problem)])
        rows, _ = shards.read_parquet_rows(path)
        for row in rows:
            if row["status"] != shards.SUCCESS:
                continue
            tags.update({normalize_tag(t) for t in tag_values(row.get("tags"))})
            if row.get("category_name"):
                categories[row["category_name"]] += 1

    def entries(counter):
        kept = sorted(((n, c) for n, c in counter.items() if c >= min_count), key=lambda t: (-t[1], t[0]))
        return [{"index": i, "name": n, "count": c} for i, (n, c) in enumerate(kept)]

    return {
        "min_count": min_count,
        "tags": entries(tags),
        "categories": entries(categories),
        **skipped,
    }


def save(vocab: dict, path: str) -> None:
    """Write a vocabulary as JSON to ``path`` (creating its folder), atomically: it was written in
    place, so a kill or a full disk mid-write replaced a good vocabulary with a truncated one."""
    shards.save_json(path, vocab, "vocabulary")
