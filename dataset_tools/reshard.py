"""Read samples out of complete shards and write them into new shards (split, dedup filter)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import pyarrow as pa

from dataset_tools import shards
from dataset_tools.plan import BUILD_DIR
from vutrain.tag_text import tag_string_parts, tag_values

Sample = tuple[str, dict[str, bytes], dict]  # key, members, parquet row


def video_of(row: dict) -> str:
    """The video a row shows: its video id; plain img2dataset shards have none (every row compared
    as None, one video), so their url, as stable, or else the key."""
    return row.get("video_id") or row.get("url") or row["key"]


def iter_samples(folder: str, names: Sequence[str] | None = None) -> Iterator[Sample]:
    """Successful samples of every complete shard (or of the shards ``names``), in shard then key
    order."""
    for name in shards.iter_shard_names(folder) if names is None else names:
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        by_key = {r["key"]: r for r in rows if r["status"] == shards.SUCCESS}
        for key, members in sorted(shards.read_tar(os.path.join(folder, f"{name}.tar")).items()):
            yield key, members, by_key.get(key) or _row_from_tar_sample(key, members)


def iter_sample_rows(folder: str, names: Sequence[str] | None = None) -> Iterator[tuple[str, dict]]:
    """``(key, row)`` of each sample ``iter_samples`` yields, in its order, read from the parquets
    and the tars' headers: a tar's members are read only when one of its samples has no successful
    parquet row (its row is then its ``.json``). For the tools that count samples or read their
    metadata without their images (split's publish times, vocab)."""
    for name in shards.iter_shard_names(folder) if names is None else names:
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        keys = shards.tar_check(os.path.join(folder, f"{name}.tar"))[1]
        yield from shard_sample_rows(folder, name, rows, keys)


def shard_sample_rows(folder: str, name: str, rows: list[dict], keys: set[str]) -> Iterator[tuple[str, dict]]:
    """``(key, row)`` of each sample ``keys`` of shard ``name`` (its tar's sample keys, as
    ``shards.tar_check`` gives them), sorted: its successful parquet row among ``rows``, else its
    ``.json`` (the tar's members are read only then)."""
    by_key = {r["key"]: r for r in rows if r["status"] == shards.SUCCESS}
    from_tar = shards.read_tar(os.path.join(folder, f"{name}.tar")) if keys - by_key.keys() else {}
    for key in sorted(keys):
        yield key, by_key.get(key) or _row_from_tar_sample(key, from_tar[key])


def _row_from_tar_sample(key: str, members: dict[str, bytes]) -> dict:
    """The row of a tar sample its parquet has no successful row for: its ``.json`` object (or just
    its key), marked a success, as it is one (it is in the tar and goes into the output tar, whose
    stats must count it for finalize). A build's ``.json`` has no status: the row was a KeyError
    out of the output stats, after part of the output was written."""
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except ValueError:
        meta = {}
    return {**(meta if isinstance(meta, dict) else {}), "key": key, "status": shards.SUCCESS}


def require_whole_shards(folder: str, command: str, names: Sequence[str] | None = None) -> None:
    """Refuse (SystemExit naming the shards) when a complete shard's tar is truncated or holds
    another number of samples than its stats say, or its parquet does not read. ``tarfile`` reads
    a tar cut at a member boundary without complaint: its lost samples were silently missing from
    the output (train + val short of the input), and a tar cut inside a member was a ReadError
    traceback naming no file, after part of the output was written. A stats file without a
    whole-number ``successes`` (``{}``, ``[]``, another tool's JSON) is refused the same way: it
    was a KeyError or TypeError traceback. ``names``: the shards to check (default: every complete
    shard)."""
    names = list(shards.iter_shard_names(folder) if names is None else names)
    problems, foreign = [], {}
    for name in names:
        successes, stats_problem = _stats_successes(folder, name)
        problem, keys = shards.tar_check(os.path.join(folder, f"{name}.tar"), successes)
        problem = stats_problem or problem or shards.parquet_problem(os.path.join(folder, f"{name}.parquet"))
        if problem:
            problems.append((name, problem))
        _note_foreign_keys(foreign, name, keys, same_width=len({len(n) for n in names}) == 1)
    refuse_broken_shards(folder, command, problems)
    refuse_repeated_keys(folder, command, _repeated_keys(folder, names, foreign))


def _stats_successes(folder: str, name: str) -> tuple[int | None, str | None]:
    """``(successes, None)`` of shard ``name``'s stats file, or ``(None, why not)``. Not the whole
    ``shards.stats_problem``: more successes than parquet rows is a shard whose tar-only samples
    (their ``.json`` is their row) its stats count, which these tools read."""
    try:
        with open(os.path.join(folder, f"{name}_stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"{name}_stats.json: unreadable ({err})"
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(successes, int) and not isinstance(successes, bool) and successes >= 0:
        return successes, None
    return None, f"{name}_stats.json has no whole-number successes (not a build stats file)"


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


def skipped_incomplete_shards(folder: str, command: str, names: Sequence[str] | None = None) -> list[str]:
    """Names of the shards ``command`` leaves out because they are not complete (a tar or parquet
    without parseable stats: a build stopped mid-shard), said on stderr: they were skipped
    without a word, their samples missing from the output. Then the file names of the tars left
    out as they are not named as shards (``note_tars_not_named_as_shards``). ``names``: the
    shards ``command`` reads (default: the complete shards now), so a shard a running build
    completes meanwhile is reported as what the command did with it."""
    entries = set(os.listdir(folder))
    misnamed = shards.tars_not_named_as_shards(folder)
    # A shard whose only tar is misnamed (00001.TAR beside 00001.parquet and stats) is not waiting
    # for a build: it was reported as "no stats yet, run the same build again", the wrong remedy.
    misnamed_only = {m.split(".")[0] for m in misnamed} - {n[:-4] for n in entries if n.endswith(".tar")}
    found = {f.split(".")[0] for f in entries if f.endswith((".tar", ".parquet"))}
    complete = set(shards.complete_shards(folder).values() if names is None else names)
    skipped = sorted(n for n in found - complete - misnamed_only if n.isdigit())
    if skipped:
        print(
            f"[dataset_tools] {command}: skipping {len(skipped)} incomplete shard(s) (no stats yet): "
            f"{' '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}. Run the same build again "
            f"to complete them, then {command} again to include them.",
            file=sys.stderr,
        )
    return skipped + note_tars_not_named_as_shards(folder, command)


def note_tars_not_named_as_shards(folder: str, command: str) -> list[str]:
    """The tars ``command`` leaves out as they are not named ``NNNNN.tar`` (``shard-00001.tar``,
    ``00001.TAR``, ``00001.tar.gz``), said on stderr: a shard so named, with its parquet and stats,
    was left out of split, dedup and vocab without a word (finalize only listed it as incomplete)."""
    misnamed = shards.tars_not_named_as_shards(folder)
    if misnamed:
        print(
            f"[dataset_tools] {command}: leaving out {len(misnamed)} tar(s) not named as shards "
            f"(NNNNN.tar: digits, lower-case .tar, uncompressed): {' '.join(misnamed[:10])}"
            f"{' ...' if len(misnamed) > 10 else ''}. If they are shards, decompress them and rename "
            f"each to NNNNN.tar, its .parquet and _stats.json to NNNNN.parquet and NNNNN_stats.json "
            f"(NNNNN a number no other shard has), then {command} again to include them.",
            file=sys.stderr,
        )
    return misnamed


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


# Columns whose string form is a joined list (``|`` when it holds one, else ``,``), as training reads
# them (vutrain/tag_text.py tag_values): `build` writes tags as a list, plain img2dataset as a string.
COMMA_LIST_COLUMNS = ("tags",)


def input_schema(
    folder: str, command: str = "reshard", names: Sequence[str] | None = None
) -> pa.Schema | None:
    """One schema for every output shard: the union of the complete input shards' parquet schemas
    (None when there are none). Inferred per output shard, a column missing from a shard's first
    row was dropped and an all-empty one became type null, so the output parquets disagreed and
    pyarrow.dataset refused to read them together. A tags column that is a list in some shards and
    a string in others is a list of the string's parts (``conform_row``); any other
    column of two types is a one-line SystemExit naming it: it was a pyarrow traceback after part
    of the output was written, or output parquets of two schemas. ``names``: the shards to read
    (default: every complete shard)."""
    import pyarrow.parquet as pq

    names = shards.iter_shard_names(folder) if names is None else names
    named = [(n, pq.read_schema(os.path.join(folder, f"{n}.parquet"))) for n in names]
    named = _comma_strings_as_lists(named)
    try:
        return pa.unify_schemas([s for _, s in named], promote_options="permissive") if named else None
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        column, (shard_a, type_a), (shard_b, type_b) = _first_type_conflict(named)
        raise SystemExit(
            f"{folder}: refusing to {command}: column {column!r} is {type_a} in {shard_a}.parquet and "
            f"{type_b} in {shard_b}.parquet (shards of two tools in one folder?); every output parquet "
            f"needs one type. Put each kind of shard in its own folder and {command} each one."
        ) from None


def _comma_strings_as_lists(named: list[tuple[str, pa.Schema]]) -> list[tuple[str, pa.Schema]]:
    """``named`` with each string field of COMMA_LIST_COLUMNS typed list<string> where another
    shard holds that column as a list."""
    listed = {
        f.name for _, s in named for f in s if f.name in COMMA_LIST_COLUMNS and pa.types.is_list(f.type)
    }

    def as_list(field: pa.Field) -> pa.Field:
        is_text = pa.types.is_string(field.type) or pa.types.is_large_string(field.type)
        return field.with_type(pa.list_(pa.string())) if field.name in listed and is_text else field

    return [(n, pa.schema([as_list(f) for f in s], metadata=s.metadata)) for n, s in named]


def _first_type_conflict(named: list[tuple[str, pa.Schema]]) -> tuple[str, tuple, tuple]:
    """``(column, (shard, type), (other shard, other type))`` of the first column the shards
    disagree on beyond what a permissive unify promotes."""
    seen: dict[str, tuple[str, pa.DataType]] = {}
    for name, schema in named:
        for field in schema:
            if field.name not in seen:
                seen[field.name] = (name, field.type)
                continue
            first_shard, first_type = seen[field.name]
            try:
                merged = pa.unify_schemas(
                    [pa.schema([(field.name, first_type)]), pa.schema([field])], promote_options="permissive"
                )
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                return field.name, (first_shard, first_type), (name, field.type)
            seen[field.name] = (first_shard, merged.field(field.name).type)
    raise AssertionError("unify_schemas failed without a column of two types")


def conform_row(row: dict, schema: pa.Schema | None) -> dict:
    """``row`` with each joined string of a COMMA_LIST_COLUMNS column that ``schema`` types as a
    list split into its parts (``_joined_parts``)."""
    if schema is None:
        return row
    fixes = {
        name: _joined_parts(row[name])
        for name in COMMA_LIST_COLUMNS
        if isinstance(row.get(name), str)
        and name in schema.names
        and pa.types.is_list(schema.field(name).type)
    }
    return {**row, **fixes} if fixes else row


def _joined_parts(text: str) -> list[str]:
    """The parts of a joined tags string, split as training splits it (on ``|`` when it holds one,
    else ``,``; ``tag_text.tag_string_parts``) and kept as they are (joined, they give the stripped
    string back), so training, vocab and inspect read the same tags from the list as from the
    string. A string that spells a list (``['a', 'b']``, pandas' CSV form) is that list's items. A
    string training reads no tags from ("", ``[none]``, ``nan``) is no tags. Split on ``,`` alone,
    Kaggle's ``a|b|c`` was the one tag "a|b|c" and ``[none]`` the tag "[none]"."""
    if not tag_values(text):
        return []
    return tag_string_parts(text)


def refuse_output_under_a_file(path: str, flag: str, given: str | None = None) -> None:
    """A one-line SystemExit when ``path`` (an output folder, or the folder a file goes into) is a
    file or lies under one: ``split --output videos.csv`` or ``dedup --filter-output`` under a file
    was a NotADirectoryError traceback out of the publishing-marker check. Creates nothing, so an
    input refused afterwards leaves no output folder behind. ``given``: the path the user typed."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(
            f"{flag} {given or path}: {existing} is a file, not a folder; give the path of a new or "
            "empty folder"
        )


def refuse_output_holding_input(folder: str, output: str, flag: str, given: str | None = None) -> None:
    """A one-line SystemExit when the input shard folder ``folder`` is the output folder ``output``
    or lies inside it (``split data/train --output data`` writes ``data/train``). The output was
    refused as "not empty ... or delete this one first": a remedy that deleted the input.
    ``given``: the path the user typed."""
    source, target = os.path.realpath(folder), os.path.realpath(output)
    if os.path.commonpath([source, target]) == target:
        raise SystemExit(
            f"{flag} {given or output}: the output folder {output} is the input folder {folder} or "
            "holds it; give a new folder outside the input"
        )


def check_empty_output(folder: str) -> None:
    """Refuse an output folder that already holds files: shards are numbered from 00000 again,
    so an earlier run's higher-numbered shards would stay beside the new ones (counted twice by
    finalize, and, for split, samples of one side left in the other). The lock file of
    ``claim_outputs`` alone does not count: a run stopped before its first shard leaves it."""
    if os.path.isdir(folder) and _entries_besides_lock(folder):
        why = (
            "an earlier run was stopped while moving its shards in, so it holds part of them"
            if os.path.isdir(_staging_dir(folder))
            else "an earlier run's shards would mix with the new ones"
        )
        raise SystemExit(
            f"{folder}: output folder is not empty ({why}). Pass an empty or new folder, or delete "
            "this one first."
        )


# Where ShardSink writes its shards until the whole output is done (``publish``), inside BUILD_DIR.
STAGING = "partial"


def _staging_dir(folder: str) -> str:
    return os.path.join(folder, BUILD_DIR, STAGING)


def _entries_besides_lock(folder: str) -> list[str]:
    """The folder's entries, none when it holds only the lock and a killed run's staged shards
    (``claim_outputs`` removes those: none of them was ever published)."""
    entries = os.listdir(folder)
    build_dir = os.path.join(folder, BUILD_DIR)
    if (
        entries == [BUILD_DIR]
        and os.path.isdir(build_dir)
        and set(os.listdir(build_dir)) <= {"lock", STAGING}
    ):
        return []
    return entries


@contextmanager
def claim_outputs(folders: Sequence[str], command: str) -> Iterator[None]:
    """Hold each output folder's lock (``_build/lock``, the one ``build`` takes) while the block
    writes into them, after checking they are empty. Two runs into one empty folder both passed
    the emptiness check and both wrote shards 00000...: the later rename won file by file, so a
    shard's tar could come from one run and its parquet and stats from the other. The second
    run is now refused in one line naming the first one's pid."""
    with ExitStack() as locks:
        for folder in folders:
            lock_path = os.path.join(folder, BUILD_DIR, "lock")
            locks.enter_context(shards.exclusive_lock(lock_path, _refusal(folder, command)))
        for folder in folders:
            check_empty_output(folder)
            # Shards a killed run staged and never published: safe to drop while we hold the lock.
            shutil.rmtree(_staging_dir(folder), ignore_errors=True)
        yield


def _refusal(folder: str, command: str) -> Callable[[str], str]:
    def refusal(holder: str) -> str:
        return (
            f"{folder}: refusing to {command}: another dataset_tools run (pid {holder}) is writing "
            f"into this folder. Wait for it to finish, or stop it and delete this folder, then "
            f"{command} into an empty folder."
        )

    return refusal


class ShardSink:
    """Collects samples and writes ``NNNNN.tar/.parquet/_stats.json`` every ``shard_size``, staged
    in ``folder/_build/partial`` until ``publish`` moves them into ``folder``. Written straight into
    ``folder``, a killed split or dedup left finished shards there that nothing marked as part of
    a set: a glob or brace spec over the folder trained on a part of the data without a word."""

    def __init__(
        self, folder: str, shard_size: int, oom_shard_count: int = 5, schema: pa.Schema | None = None
    ):
        check_empty_output(folder)
        if shard_size < 1:
            raise SystemExit(f"--shard-size {shard_size}: must be at least 1 (samples per shard, e.g. 1000)")
        self.folder, self.staging = folder, _staging_dir(folder)
        os.makedirs(self.staging, exist_ok=True)
        self.shard_size, self.oom = shard_size, oom_shard_count
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
        rows = [conform_row(row, self.schema) for _, _, row in self.buffer]
        shards.write_tar(
            os.path.join(self.staging, f"{name}.tar"), [(key, members) for key, members, _ in self.buffer]
        )
        shards.write_parquet(
            os.path.join(self.staging, f"{name}.parquet"), rows, self.schema or _schema_for(rows)
        )
        shards.write_stats(
            self.staging, self.shard_id, shards.stats_from_rows(rows, start, shards.now()), self.oom
        )
        self.count += len(self.buffer)
        self.buffer, self.shard_id = [], self.shard_id + 1

    def close(self) -> int:
        """Write the last partial shard; returns the number of samples written in all."""
        self.flush()
        return self.count

    def publish(self) -> None:
        """Move the staged shards into the folder, each shard's stats last (they mark it complete),
        and remove the staging folder. Call once every sink of the run is closed."""
        for shard_id in range(self.shard_id):
            name = shards.shard_name(shard_id, self.oom)
            for file in (f"{name}.tar", f"{name}.parquet", f"{name}_stats.json"):
                os.replace(os.path.join(self.staging, file), os.path.join(self.folder, file))
        shutil.rmtree(self.staging, ignore_errors=True)


# In an output folder's ``_build/`` from the moment every shard of the run is staged until the
# folder is finalized: ``{"settings", "result", "samples"}`` (``samples``: this folder's count),
# e.g. ``OUT/train/_build/split_publishing.json`` and ``OUT/_build/dedup_publishing.json``.
def publishing_marker(folder: str, command: str) -> str:
    return os.path.join(folder, BUILD_DIR, f"{command}_publishing.json")


def publish_and_finalize(
    sinks: Sequence[ShardSink], command: str, settings: dict, result: dict, finalize: Callable[[str], object]
) -> None:
    """Publish every closed sink and finalize its folder (``finalize``, when it has samples),
    recording first in each folder a marker that lets ``finish_interrupted_publish`` complete the
    run if it is killed on the way. Without it, a run killed after publishing left its shards
    without ``sizes.json`` (or some folders without their shards), and the rerun refused the
    folder as "not empty", giving a reason that did not say how to finish it."""
    for sink in sinks:
        marker = {"settings": settings, "result": result, "samples": sink.count}
        shards.save_json(publishing_marker(sink.folder, command), marker, f"{command} marker")
    for sink in sinks:  # only now: a killed run published none of its folders' shards
        sink.publish()
    for sink in sinks:
        _finalize_published(sink.folder, command, sink.count, finalize)


def _finalize_published(folder: str, command: str, samples: int, finalize: Callable[[str], object]) -> None:
    if samples:  # an empty output has no shards to describe
        finalize(folder)
    os.remove(publishing_marker(folder, command))


def finish_interrupted_publish(
    folders: Sequence[str],
    command: str,
    settings: dict,
    rerun_hint: Callable[[dict], str],
    finalize: Callable[[str], object],
) -> dict | None:
    """Finish a ``command`` run into ``folders`` with the same ``settings`` that was killed after
    staging all its shards (while moving them in, or before ``sizes.json``); returns its result,
    or None when there is none. Other settings are a one-line SystemExit giving the earlier ones
    (``rerun_hint(earlier settings)``: the arguments to pass), as finishing would write output the
    user did not ask for. Several ``folders`` (split's train and val) are named by their parent."""
    markers = [m for m in (_read_marker(publishing_marker(f, command)) for f in folders) if m is not None]
    if not markers:
        return None
    if markers[0]["settings"] != settings:
        output = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
        raise SystemExit(
            f"{output}: an earlier {command} into this folder was stopped before it finished; to "
            f"finish it, run {command} again with its settings: {rerun_hint(markers[0]['settings'])} "
            f"(or delete the output folder and {command} into it again)"
        )
    with ExitStack() as locks:
        for folder in folders:
            refusal = (
                f"another dataset_tools run (pid {{}}) is finishing the {command} into {folder}; wait for it"
            )
            locks.enter_context(
                shards.exclusive_lock(os.path.join(folder, BUILD_DIR, "lock"), refusal.format)
            )
        for folder in folders:
            marker = _read_marker(publishing_marker(folder, command))
            if marker is not None:
                _publish_staged(folder)
                _finalize_published(folder, command, marker["samples"], finalize)
            elif os.path.isdir(_staging_dir(folder)):
                _finish_unmarked(folder, finalize)
            # else: finished by a run that held the lock before us
    print(
        f"[dataset_tools] {command}: finished the earlier {command} that was stopped while publishing "
        f"its output: {markers[0]['result']}",
        file=sys.stderr,
    )
    return markers[0]["result"]


def _finish_unmarked(folder: str, finalize: Callable[[str], object]) -> None:
    """Publish and finalize a folder whose marker the killed run never wrote: killed between two
    folders' markers (split's train marked, val not), as markers are written once every sink is
    closed, what is staged there is all of that folder's output. The rerun finished only the marked
    folders and returned the full result, while val's shards stayed staged, never published."""
    staged = any(name.endswith("_stats.json") for name in os.listdir(_staging_dir(folder)))
    _publish_staged(folder)
    if staged:  # a sink stages a shard only when it has samples
        finalize(folder)


def _read_marker(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def _publish_staged(folder: str) -> None:
    """Move what a killed ``ShardSink.publish`` left staged into the folder, stats last (they mark
    a shard complete), then drop the staging folder."""
    staging = _staging_dir(folder)
    if not os.path.isdir(staging):
        return
    names = sorted(os.listdir(staging), key=lambda name: (name.endswith("_stats.json"), name))
    for name in names:
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    os.rmdir(staging)
