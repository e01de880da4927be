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
    names = list(shards.iter_shard_names(folder))
    problems, foreign = [], {}
    for name in names:
        with open(os.path.join(folder, f"{name}_stats.json")) as f:
            successes = json.load(f)["successes"]
        problem, keys = shards.tar_check(os.path.join(folder, f"{name}.tar"), successes)
        problem = problem or shards.parquet_problem(os.path.join(folder, f"{name}.parquet"))
        if problem:
            problems.append((name, problem))
        _note_foreign_keys(foreign, name, keys, same_width=len({len(n) for n in names}) == 1)
    refuse_broken_shards(folder, command, problems)
    refuse_repeated_keys(folder, command, _repeated_keys(folder, names, foreign))


def _note_foreign_keys(foreign: dict[str, list[str]], name: str, keys: set[str], same_width: bool) -> None:
    """Add to ``foreign`` (key -> shards) the keys of shard ``name`` not named after it. A key
    repeated in two shards of one name width is foreign to one of them at least (it cannot start
    with both names), so only foreign keys are kept: not every key of the folder in memory."""
    for key in keys:
        if not (same_width and key.startswith(name)):
            foreign.setdefault(key, []).append(name)


def _repeated_keys(folder: str, names: list[str], foreign: dict[str, list[str]]) -> list[tuple]:
    """``(key, shards)`` of each key in more than one shard, sorted: a foreign key repeats another
    foreign one, or the key of the shard it is named after (read again, rarely: only then)."""
    width = len(names[0]) if names else 0
    existing, owner_keys = set(names), {}
    for key, holders in foreign.items():
        owner = key[:width]
        if owner in existing and owner not in holders:
            if owner not in owner_keys:
                owner_keys[owner] = shards.tar_check(os.path.join(folder, f"{owner}.tar"))[1]
            if key in owner_keys[owner]:
                holders.append(owner)
    return sorted((key, sorted(holders)) for key, holders in foreign.items() if len(holders) > 1)


def refuse_repeated_keys(folder: str, command: str, repeated: list[tuple]) -> None:
    """A one-line SystemExit when a sample key is in two shards (two builds' folders copied into
    one: keys restart at each build's 00000). Samples are told apart by key: an output shard
    held two members of one name (readers keep one), finalize then refused it with a wrong
    remedy after the output was written, and dedup merged the two samples into one."""
    if repeated:
        key, names = repeated[0]
        raise SystemExit(
            f"{folder}: refusing to {command}: {len(repeated)} sample key(s) are in more than one shard, "
            f"e.g. {key} in {' and '.join(f'{n}.tar' for n in names)} (shards of two builds in one "
            f"folder?). Keep each build in its own folder and {command} each one, or build them as one."
        )


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
