"""Merge a ``--retry-failed`` pass back into the shards it came from.

The retry pass writes ``_build/retry/NNNNN.{tar,parquet}`` holding only the re-attempted rows,
with the same keys. Merging removes ``NNNNN_stats.json`` (the shard is incomplete from then on),
replaces those rows in ``NNNNN.parquet`` (each retried row's ``attempts`` one more than before),
adds new successes to ``NNNNN.tar`` (still sorted, written through a temporary name) and writes
the stats last. Before it touches the shard the merge saves each row's ``attempts`` in
``_build/attempts/NNNNN.json``. A merge killed midway leaves the shard without stats; the next
``build`` finishes it from what is on disk (``finish_stopped_merges``), with no download: a
shard downloaded again from the plan asked the host once more for every row of it. Where it
cannot (the retried rows are gone with ``_build/retry/``, a tar that is neither the old one nor
the merged one), the shard is downloaded again from the plan and counts on from the saved
attempts (``apply_attempt_records``); they started again at 1 once, so a row could be retried
past ``--max-attempts`` for ever.

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
_NOT_MERGED = ": retry of shard"  # how a refusal goes on after its problem


def merge_retry(output: str, retry_dir: str, name: str) -> dict:
    """Merge shard ``name`` from ``retry_dir`` into ``output``; returns the new stats."""
    old_rows, schema = shards.read_parquet_rows(os.path.join(output, f"{name}.parquet"))
    new_rows, _ = shards.read_parquet_rows(os.path.join(retry_dir, f"{name}.parquet"))
    replaced = {r["key"]: r for r in new_rows}
    rows = [_merged_row(r, replaced.pop(r["key"], None)) for r in old_rows]
    schema = _with_attempts(schema)
    if replaced:  # a retry row always comes from this shard; anything else is a bug, say so
        raise RuntimeError(f"retry rows {sorted(replaced)[:3]} are not in shard {name}")
    successes = {r["key"] for r in rows if r["status"] == shards.SUCCESS}
    _refuse_damaged_tar(output, name, old_rows, successes)
    samples = shards.read_tar(os.path.join(output, f"{name}.tar"))
    samples.update(shards.read_tar(os.path.join(retry_dir, f"{name}.tar")))
    # The parquet is the source of truth: keep exactly the samples it calls successes.
    samples = {k: v for k, v in samples.items() if k in successes}
    start = shards.now()
    _save_attempt_record(output, name, rows)
    # The old stats go first: while tar and parquet are replaced one after the other the shard
    # is incomplete, so a merge killed midway is finished by the next build (tar first, then the
    # parquet, which tells a merged shard) instead of leaving stats that disagree with the tar or
    # the parquet.
    stats_path = os.path.join(output, f"{name}_stats.json")
    if os.path.exists(stats_path):
        os.remove(stats_path)
    shards.write_tar(os.path.join(output, f"{name}.tar"), samples.items())
    shards.write_parquet(os.path.join(output, f"{name}.parquet"), rows, schema)
    return _write_stats_and_clean_up(output, retry_dir, name, rows, start)


def _write_stats_and_clean_up(output: str, retry_dir: str, name: str, rows: list[dict], start: float) -> dict:
    """The merge's last steps, once tar and parquet are merged: the stats (the shard is complete
    again), then the retried rows and the saved attempts, spent."""
    stats = shards.stats_from_rows(rows, start, shards.now())
    shards.write_stats(output, int(name), stats, len(name))
    _remove_retry_files(retry_dir, name)
    os.remove(_attempt_record_path(output, name))  # merged whole: nothing to count on from
    return stats


def _remove_retry_files(retry_dir: str, name: str) -> None:
    for suffix in (".tar", ".parquet", "_stats.json"):
        path = os.path.join(retry_dir, f"{name}{suffix}")
        if os.path.exists(path):
            os.remove(path)


def finish_stopped_merges(output: str) -> list[str]:
    """Finish each merge a stopped build left (a saved attempts record, the shard's stats missing
    or still the ones from before the merge); returns one line per shard saying what was done.
    Called before the build chooses the shards to download, and before a ``--retry-failed``
    empties ``_build/retry/``. Until 2026-12-07 a shard left half-merged was downloaded again in
    full, every row of it asked of the host once more.

    The merge saves the record, removes the stats, replaces the tar, then the parquet, and writes
    the stats. A parquet whose ``attempts`` are the saved ones is merged (a retried row counts one
    more than before, so the old parquet never matches), and the tar written before it is checked
    against it: only the stats and the clean-up are left. Else, with the retried shard complete in
    ``_build/retry/``, the merge runs again from the old parquet (its tar check takes the old tar
    or the merged one). A shard without stats that cannot be finished is downloaded again from the
    plan, as before; its retried rows are removed first, so that they are never merged into it."""
    folder = os.path.join(output, plan_mod.BUILD_DIR, ATTEMPTS)
    retry_dir = os.path.join(output, plan_mod.BUILD_DIR, "retry")
    lines = []
    for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        name = entry.removesuffix(".json")
        if not entry.endswith(".json") or not name.isdigit():
            continue
        with open(os.path.join(folder, entry), encoding="utf-8") as f:
            record = json.load(f)
        stats = shards.read_stats(output, name)[0]
        if stats is not None and stats != record["stats_before"]:
            if _merged_parquet(output, name, record["attempts"]) is not None:  # stopped after its stats
                _remove_retry_files(retry_dir, name)
                os.remove(os.path.join(folder, entry))
            continue  # else downloaded again since: apply_attempt_records' case
        untouched = stats is not None  # stopped after saving the record, before the shard changed
        if untouched and int(name) not in shards.complete_shards(retry_dir):
            continue  # nothing to merge: the shard stays as it was
        why = _finish_stopped_merge(output, retry_dir, name, record["attempts"], untouched)
        if why is None:
            lines.append(
                f"[dataset_tools] shard {name}: finished the --retry-failed merge a stopped build left"
            )
            continue
        _remove_retry_files(retry_dir, name)
        then = "left as it was" if untouched else "downloaded again from the plan"
        lines.append(
            f"[dataset_tools] shard {name}: the --retry-failed merge a stopped build left cannot be "
            f"finished ({why}); the shard is {then}"
        )
    return lines


def _finish_stopped_merge(output: str, retry_dir: str, name: str, saved: dict, untouched: bool) -> str | None:
    """Finish the stopped merge of shard ``name`` (``saved``: its record's attempts); None when
    done, else why it cannot be."""
    parquet, tar = (os.path.join(output, f"{name}.{ext}") for ext in ("parquet", "tar"))
    if not (os.path.exists(parquet) and os.path.exists(tar)):
        return f"{name}.tar or {name}.parquet is missing"
    problem = shards.parquet_problem(parquet)
    if problem:
        return problem
    rows = None if untouched else _merged_parquet(output, name, saved)
    if rows is not None:
        successes = {r["key"] for r in rows if r["status"] == shards.SUCCESS}
        problem, keys = shards.tar_check(tar, len(successes))
        if problem or keys != successes:
            return problem or f"{name}.tar holds other samples than its merged parquet calls successes"
        _write_stats_and_clean_up(output, retry_dir, name, rows, shards.now())
        return None
    if int(name) not in shards.complete_shards(retry_dir):
        return f"its retried rows are not in {plan_mod.BUILD_DIR}/retry/"
    try:
        merge_retry(output, retry_dir, name)
    except SystemExit as refused:
        if not isinstance(refused.code, str):  # SIGTERM's exit status: the build stops
            raise
        return refused.code.split(_NOT_MERGED)[0]  # the problem, without the advice for a merge
    return None


def _merged_parquet(output: str, name: str, saved: dict) -> list[dict] | None:
    """The rows of shard ``name``'s parquet when the merge that saved ``saved`` wrote it, else None."""
    path = os.path.join(output, f"{name}.parquet")
    if not os.path.exists(path) or shards.parquet_problem(path):
        return None
    rows, schema = shards.read_parquet_rows(path)
    merged = ATTEMPTS in schema.names and {r["key"]: r[ATTEMPTS] for r in rows} == saved
    return rows if merged else None


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


def _refuse_damaged_tar(output: str, name: str, rows: list[dict], merged_successes: set[str]) -> None:
    """Stop, before anything is changed, when the shard's tar is not whole or lacks samples its
    parquet calls successes. tarfile reads a tar cut at a member boundary without a word: the
    merge rewrote it without those samples, kept them as successes in the parquet and wrote
    stats that agreed with the parquet, not the tar (cut inside a member, a tarfile traceback).
    A tar holding exactly ``merged_successes`` is the one a merge stopped before its parquet
    wrote: taken as it is (the retried samples are added to it again, the same)."""
    successes = sum(1 for r in rows if r["status"] == shards.SUCCESS)
    problem, keys = shards.tar_check(os.path.join(output, f"{name}.tar"))
    if not problem and len(keys) != successes and keys != merged_successes:
        problem = f"{name}.tar: holds {len(keys)} samples, its stats say {successes}"
    if problem:
        raise SystemExit(
            f"{problem}{_NOT_MERGED} {name} not merged. Put back an intact {name}.tar, or delete "
            f"{name}_stats.json so that build downloads the shard again, then run build --retry-failed again"
        )
