"""Read samples out of complete shards and write them into new shards (split, dedup filter)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pyarrow as pa

from dataset_tools import shards

Sample = tuple[str, dict[str, bytes], dict]  # key, members, parquet row


def video_of(row: dict) -> str:
    """The video a row shows: its video id; plain img2dataset shards have none (every row compared
    as None, one video), so their url, as stable, or else the key."""
    return row.get("video_id") or row.get("url") or row["key"]


def iter_samples(folder: str) -> Iterator[Sample]:
    """Successful samples of every complete shard, in shard then key order."""
    for name in shards.iter_shard_names(folder):
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        by_key = {r["key"]: r for r in rows if r["status"] == shards.SUCCESS}
        for key, members in sorted(shards.read_tar(os.path.join(folder, f"{name}.tar")).items()):
            row = by_key.get(key)
            if row is None:
                row = json.loads(members["json"]) if "json" in members else {"key": key}
            yield key, members, row


def require_whole_shards(folder: str, command: str) -> None:
    """Refuse (SystemExit naming the shards) when a complete shard's tar is truncated or holds
    another number of samples than its stats say, or its parquet does not read. ``tarfile`` reads
    a tar cut at a member boundary without complaint: its lost samples were silently missing from
    the output (train + val short of the input), and a tar cut inside a member was a ReadError
    traceback naming no file, after part of the output was written."""
    problems = []
    for name in shards.iter_shard_names(folder):
        with open(os.path.join(folder, f"{name}_stats.json")) as f:
            successes = json.load(f)["successes"]
        problem = shards.tar_problem(os.path.join(folder, f"{name}.tar"), successes)
        problem = problem or shards.parquet_problem(os.path.join(folder, f"{name}.parquet"))
        if problem:
            problems.append((name, problem))
    refuse_broken_shards(folder, command, problems)


def skipped_incomplete_shards(folder: str, command: str) -> list[str]:
    """Names of the shards ``command`` leaves out because they are not complete (a tar or parquet
    without parseable stats: a build stopped mid-shard), said on stderr: they were skipped
    without a word, their samples missing from the output."""
    names = {f.split(".")[0] for f in os.listdir(folder) if f.endswith((".tar", ".parquet"))}
    skipped = sorted(n for n in names - set(shards.complete_shards(folder).values()) if n.isdigit())
    if skipped:
        print(
            f"[dataset_tools] {command}: skipping {len(skipped)} incomplete shard(s) (no stats yet): "
            f"{' '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}. Run the same build again "
            f"to complete them, then {command} again to include them.",
            file=sys.stderr,
        )
    return skipped


def refuse_broken_shards(folder: str, command: str, problems: list[tuple[str, str]]) -> None:
    """A one-line SystemExit naming each (shard, problem) and how to redo those shards; nothing
    when ``problems`` is empty."""
    if problems:
        names = " ".join(f"{n}_stats.json" for n, _ in problems)
        raise SystemExit(
            f"{folder}: refusing to {command}: {'; '.join(p for _, p in problems)}. "
            f"Delete {names} in that folder and run the same build again to redo "
            f"{'that shard' if len(problems) == 1 else 'those shards'}, then {command} again."
        )


def _schema_for(rows: list[dict]) -> pa.Schema:
    return pa.Table.from_pylist(rows).schema


def input_schema(folder: str) -> pa.Schema | None:
    """One schema for every output shard: the union of the complete input shards' parquet schemas
    (None when there are none). Inferred per output shard, a column missing from a shard's first
    row was dropped and an all-empty one became type null, so the output parquets disagreed and
    pyarrow.dataset refused to read them together."""
    import pyarrow.parquet as pq

    schemas = [pq.read_schema(os.path.join(folder, f"{n}.parquet")) for n in shards.iter_shard_names(folder)]
    try:
        return pa.unify_schemas(schemas, promote_options="permissive") if schemas else None
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # one column of two types: each shard its own, as before
        return None


def check_empty_output(folder: str) -> None:
    """Refuse an output folder that already holds files: shards are numbered from 00000 again,
    so an earlier run's higher-numbered shards would stay beside the new ones (counted twice by
    finalize, and, for split, samples of one side left in the other)."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise SystemExit(
            f"{folder}: output folder is not empty (an earlier run's shards would mix with the new "
            "ones). Pass an empty or new folder, or delete this one first."
        )


class ShardSink:
    """Collects samples and writes ``NNNNN.tar/.parquet/_stats.json`` every ``shard_size``."""

    def __init__(
        self, folder: str, shard_size: int, oom_shard_count: int = 5, schema: pa.Schema | None = None
    ):
        check_empty_output(folder)
        if shard_size < 1:
            raise SystemExit(f"--shard-size {shard_size}: must be at least 1 (samples per shard, e.g. 1000)")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.shard_size, self.oom = folder, shard_size, oom_shard_count
        self.schema = schema  # None: inferred from each shard's rows
        self.buffer: list[Sample] = []
        self.shard_id = 0
        self.count = 0

    def add(self, sample: Sample) -> None:
        """Buffer one sample; write a shard once ``shard_size`` samples are buffered."""
        self.buffer.append(sample)
        if len(self.buffer) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as the next shard (tar, parquet, stats); no-op when empty."""
        if not self.buffer:
            return
        start = shards.now()
        name = shards.shard_name(self.shard_id, self.oom)
        rows = [row for _, _, row in self.buffer]
        shards.write_tar(
            os.path.join(self.folder, f"{name}.tar"), [(key, members) for key, members, _ in self.buffer]
        )
        shards.write_parquet(
            os.path.join(self.folder, f"{name}.parquet"), rows, self.schema or _schema_for(rows)
        )
        shards.write_stats(
            self.folder, self.shard_id, shards.stats_from_rows(rows, start, shards.now()), self.oom
        )
        self.count += len(self.buffer)
        self.buffer, self.shard_id = [], self.shard_id + 1

    def close(self) -> int:
        """Write the last partial shard; returns the number of samples written in all."""
        self.flush()
        return self.count
