"""Merge a ``--retry-failed`` pass back into the shards it came from.

The retry pass writes ``_build/retry/NNNNN.{tar,parquet}`` holding only the re-attempted rows,
with the same keys. Merging removes ``NNNNN_stats.json`` (the shard is incomplete from then on),
replaces those rows in ``NNNNN.parquet`` (each retried row's ``attempts`` one more than before),
adds new successes to ``NNNNN.tar`` (still sorted, written through a temporary name) and writes
the stats last. A merge killed midway leaves the
shard without stats, so the next ``build`` redoes it from the plan. Before it touches the shard
the merge saves each row's ``attempts`` in ``_build/attempts/NNNNN.json``: a shard redone from
the plan counts on from there (``apply_attempt_records``); its attempts started again at 1, so a
row could be retried past ``--max-attempts`` for ever.

``attempts`` counts the downloads of a row: a shard written before the column existed (and a
first build, whose parquet img2dataset writes) reads as 1 attempt per row. Without it a row
that had failed five times looked like one that failed once, replaced whole by its last error.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa

from dataset_tools import plan as plan_mod
from dataset_tools import shards

ATTEMPTS = "attempts"


def merge_retry(output: str, retry_dir: str, name: str) -> dict:
    """Merge shard ``name`` from ``retry_dir`` into ``output``; returns the new stats."""
    old_rows, schema = shards.read_parquet_rows(os.path.join(output, f"{name}.parquet"))
    new_rows, _ = shards.read_parquet_rows(os.path.join(retry_dir, f"{name}.parquet"))
    replaced = {r["key"]: r for r in new_rows}
    rows = [_merged_row(r, replaced.pop(r["key"], None)) for r in old_rows]
    schema = _with_attempts(schema)
    if replaced:  # a retry row always comes from this shard; anything else is a bug, say so
        raise RuntimeError(f"retry rows {sorted(replaced)[:3]} are not in shard {name}")
    _refuse_damaged_tar(output, name, old_rows)
    samples = shards.read_tar(os.path.join(output, f"{name}.tar"))
    samples.update(shards.read_tar(os.path.join(retry_dir, f"{name}.tar")))
    successes = {r["key"] for r in rows if r["status"] == shards.SUCCESS}
    # The parquet is the source of truth: keep exactly the samples it calls successes.
    samples = {k: v for k, v in samples.items() if k in successes}
    start = shards.now()
    _save_attempt_record(output, name, rows)
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
    os.remove(_attempt_record_path(output, name))  # merged whole: nothing to count on from
    return stats


def _attempt_record_path(output: str, name: str) -> str:
    return os.path.join(output, plan_mod.BUILD_DIR, ATTEMPTS, f"{name}.json")


def _save_attempt_record(output: str, name: str, rows: list[dict]) -> None:
    """Each row's ``attempts`` in the merged shard ``name``, saved (atomically) before the merge
    touches the shard, for the download that redoes the shard if the merge is stopped midway;
    with the shard's stats as they are, to tell a stop before the merge touched anything."""
    path = _attempt_record_path(output, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    attempts_now = {r["key"]: r[ATTEMPTS] for r in rows}
    record = {"stats_before": shards.read_stats(output, name)[0], "attempts": attempts_now}
    shards.atomic_write_bytes(path, json.dumps(record).encode())


def apply_attempt_records(output: str, complete: dict[int, str]) -> list[str]:
    """Count on the attempts of each ``complete`` shard downloaded again after a stopped merge:
    a row's ``attempts`` becomes its saved count plus this download. Returns those shards' names.

    Redone after a stop at any point: a parquet that has the column already was counted (an
    img2dataset download never writes it), so only its record is left to remove."""
    folder = os.path.join(output, plan_mod.BUILD_DIR, ATTEMPTS)
    names = set(complete.values())
    applied = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        name = entry.removesuffix(".json")
        if not entry.endswith(".json") or name not in names:
            continue  # not downloaded again yet: the record waits for that download
        with open(os.path.join(folder, entry), encoding="utf-8") as f:
            record = json.load(f)
        parquet = os.path.join(output, f"{name}.parquet")
        rows, schema = shards.read_parquet_rows(parquet)
        # The same stats: stopped before the merge touched the shard, which is as it was.
        downloaded_again = shards.read_stats(output, name)[0] != record["stats_before"]
        if downloaded_again and ATTEMPTS not in schema.names:
            rows = [{**r, ATTEMPTS: record["attempts"].get(r["key"], 0) + 1} for r in rows]
            shards.write_parquet(parquet, rows, _with_attempts(schema))
            applied.append(name)
        os.remove(os.path.join(folder, entry))
    return applied


def attempts(row: dict) -> int:
    """How many times ``row`` (a shard parquet row) was downloaded; 1 where nothing counted."""
    return row.get(ATTEMPTS) or 1


def _merged_row(old: dict, retried: dict | None) -> dict:
    """The shard's row after a retry: the retried one (its result whatever it is) counting one
    more attempt than ``old``, else ``old`` with its count."""
    if retried is None:
        return {**old, ATTEMPTS: attempts(old)}
    return {**retried, ATTEMPTS: attempts(old) + 1}


def _with_attempts(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the ``attempts`` column appended (extended, never renamed or reordered)."""
    if ATTEMPTS in schema.names:
        return schema
    return schema.append(pa.field(ATTEMPTS, pa.int64()))


def _refuse_damaged_tar(output: str, name: str, rows: list[dict]) -> None:
    """Stop, before anything is changed, when the shard's tar is not whole or lacks samples its
    parquet calls successes. tarfile reads a tar cut at a member boundary without a word: the
    merge rewrote it without those samples, kept them as successes in the parquet and wrote
    stats that agreed with the parquet, not the tar (cut inside a member, a tarfile traceback)."""
    successes = sum(1 for r in rows if r["status"] == shards.SUCCESS)
    problem = shards.tar_problem(os.path.join(output, f"{name}.tar"), successes)
    if problem:
        raise SystemExit(
            f"{problem}: retry of shard {name} not merged. Put back an intact {name}.tar, or delete "
            f"{name}_stats.json so that build downloads the shard again, then run build --retry-failed again"
        )
