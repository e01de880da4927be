"""Merge a ``--retry-failed`` pass back into the shards it came from.

The retry pass writes ``_build/retry/NNNNN.{tar,parquet}`` holding only the re-attempted rows,
with the same keys. Merging removes ``NNNNN_stats.json`` (the shard is incomplete from then on),
replaces those rows in ``NNNNN.parquet``, adds new successes to ``NNNNN.tar`` (still sorted,
written through a temporary name) and writes the stats last. A merge killed midway leaves the
shard without stats, so the next ``build`` redoes it from the plan.
"""

from __future__ import annotations

import os

from dataset_tools import shards


def merge_retry(output: str, retry_dir: str, name: str) -> dict:
    """Merge shard ``name`` from ``retry_dir`` into ``output``; returns the new stats."""
    old_rows, schema = shards.read_parquet_rows(os.path.join(output, f"{name}.parquet"))
    new_rows, _ = shards.read_parquet_rows(os.path.join(retry_dir, f"{name}.parquet"))
    replaced = {r["key"]: r for r in new_rows}
    rows = [replaced.pop(r["key"], r) for r in old_rows]
    if replaced:  # a retry row always comes from this shard; anything else is a bug, say so
        raise RuntimeError(f"retry rows {sorted(replaced)[:3]} are not in shard {name}")
    samples = shards.read_tar(os.path.join(output, f"{name}.tar"))
    samples.update(shards.read_tar(os.path.join(retry_dir, f"{name}.tar")))
    successes = {r["key"] for r in rows if r["status"] == shards.SUCCESS}
    # The parquet is the source of truth: keep exactly the samples it calls successes.
    samples = {k: v for k, v in samples.items() if k in successes}
    start = shards.now()
    # The old stats go first: while tar and parquet are replaced one after the other the shard
    # is incomplete, so a merge killed midway is redone by the next build (from the plan, same
    # keys) instead of leaving stats that disagree with the tar or the parquet.
    stats_path = os.path.join(output, f"{name}_stats.json")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    shards.write_tar(os.path.join(output, f"{name}.tar"), samples.items())
    shards.write_parquet(os.path.join(output, f"{name}.parquet"), rows, schema)
    stats = shards.stats_from_rows(rows, start, shards.now())
    shards.write_stats(output, int(name), stats, len(name))
    for ext in ("tar", "parquet", "_stats.json"):
        path = os.path.join(retry_dir, f"{name}{'.' if ext != '_stats.json' else ''}{ext}")
        if os.path.exists(path):
            os.remove(path)
    return stats
