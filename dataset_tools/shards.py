"""Shard files of the img2dataset layout: names, atomic writes, reading back, stats.

``DIR/NNNNN.tar`` (members sorted by key), ``DIR/NNNNN.parquet`` (every row, failures too),
``DIR/NNNNN_stats.json`` (written last: its presence marks the shard complete).
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import re
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

STATS_RE = re.compile(r"^(\d+)_stats\.json$")
SHARD_TAR_RE = re.compile(r"^\d+\.tar$")
# Tar names a user may mean as shards (the trainer reads the compressed ones too).
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
SUCCESS = "success"


def shard_name(shard_id: int, oom_shard_count: int = 5) -> str:
    """The zero-padded shard name, e.g. ``00042`` for shard 42 with 5 digits."""
    return f"{shard_id:0{oom_shard_count}d}"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write through a temporary name of its own (``_own_temp_file``), fsync, rename: readers
    never see half a file. Through one ``path.tmp``, two ``finalize`` runs on one folder (or two
    ``dedup`` reports of one input) wrote into the same file: one renamed the other's half-written
    bytes into place, and the other's rename was a FileNotFoundError traceback."""
    with _own_temp_file(path) as (f, tmp):
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)


def save_json(path: str, obj, what: str) -> None:
    """Write ``obj`` as indented UTF-8 JSON to ``path`` atomically (creating its folder), so a
    kill or a full disk mid-write leaves the previous file whole instead of a truncated one.
    A write the disk refuses is a one-line SystemExit naming ``what`` and ``path``, and so is a
    ``path`` under a file (``vocab --output videos.csv/v.json``: a FileExistsError traceback, after
    every shard was read)."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as err:
        raise SystemExit(
            f"{path}: could not create the folder of the {what} ({_why_no_folder(folder, err)}); "
            "pick another path"
        ) from None
    data = json.dumps(obj, ensure_ascii=False, indent=2).encode("utf-8")
    try:
        atomic_write_bytes(path, data)
    except OSError as err:
        raise SystemExit(
            f"{path}: could not write the {what} ({err.strerror or err}); free space or pick another "
            "path and run again (any earlier file there is left as it was)."
        ) from None


def _why_no_folder(folder: str, err: OSError) -> str:
    """Why ``folder`` could not be created: the file it would lie under, else the system's reason
    ("File exists" named the file nowhere)."""
    existing = folder
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"{existing} is a file, not a folder"
    return err.strerror or str(err)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def write_tar(path: str, samples: Iterable[tuple[str, dict[str, bytes]]]) -> None:
    """Write ``(key, {ext: bytes})`` samples sorted by key, members of a sample sorted by ext,
    through a temporary name of its own. mtime is fixed so identical inputs give identical tars.
    PAX (POSIX.1-2001): a member name of over 100 characters without a ``/`` (which GNU and PAX
    tars of other tools hold, and split/dedup copy) gets a pax header; the USTAR writer raised
    ``ValueError: name is too long`` after the output was claimed. An ASCII name that fits USTAR's
    fields is written byte for byte as before; a longer or non-ASCII one gets a pax header, which
    ``tarfile``, webdataset and the training stream's reader read."""
    with _own_temp_file(path) as (f, tmp):
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for key, members in sorted(samples, key=lambda s: s[0]):
                for ext in sorted(members):
                    data = members[ext]
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    info.uname = info.gname = "bigdata"
                    tar.addfile(info, io.BytesIO(data))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)


@contextmanager
def _own_temp_file(path: str) -> Iterator[tuple[BinaryIO, str]]:
    """``(file, name)`` of a new temporary file beside ``path`` that no other writer shares,
    removed if the write fails. With one ``path.tmp`` for every writer, a second writer of the
    same shard (an orphaned pyspark/ray worker of a killed build beside its resume, two
    ``split``s into one folder) truncated and overwrote the first one's file while it was being
    written: a tar of mixed bytes was renamed into place, or the other rename failed with a
    FileNotFoundError. The name still ends in ``.tmp``: ``build`` deletes leftovers at its start."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp"
    f = open(tmp, "xb")
    try:
        yield f, tmp
    except BaseException:
        # On a full disk close() fails too (it flushes what is buffered): it raised here, before
        # the removal, and every refused write left its temporary file behind.
        _close_quietly(f)
        _remove_quietly(tmp)
        raise
    finally:
        f.close()


def _close_quietly(f: BinaryIO) -> None:
    try:
        f.close()
    except OSError:
        pass


@contextmanager
def exclusive_lock(lock_path: str, refusal: Callable[[str], str]) -> Iterator[None]:
    """Hold the kernel lock (``flock``) of ``lock_path`` (created with its folder) while the block
    runs, with this pid written in it; while another process holds it, a one-line SystemExit of
    ``refusal(that process's pid)``. The kernel drops the lock when its
    holder dies, so a killed run never leaves it behind."""
    os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
    with open(lock_path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise SystemExit(refusal(lock.read().strip() or "unknown")) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield


def sample_member(member_name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a tar member as the trainer names it (vutrain/data/samples.py
    ``_split_name``): key = the path up to the first dot of the basename, extension lower-cased;
    None for a member the trainer skips (no extension). Keyed by basename, ``x/a.jpg`` and
    ``y/a.jpg`` were merged into one sample (split, dedup and inspect saw one where training sees
    two), and ``a.JPG`` was not taken for the image the trainer reads."""
    slash = member_name.rfind("/")
    dot = member_name.find(".", slash + 1)
    if dot <= slash + 1:
        return None
    return member_name[:dot], member_name[dot + 1 :].lower()


def read_tar(path: str) -> dict[str, dict[str, bytes]]:
    """``{key: {ext: bytes}}`` of a shard, keys and extensions as the trainer reads them
    (``sample_member``)."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            parts = sample_member(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, ext = parts
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def tar_problem(path: str, expected_samples: int | None = None) -> str | None:
    """None when the tar at ``path`` is whole, else why not (one phrase naming the file).

    Whole: a whole number of 512-byte blocks ending in the two zero blocks that close an archive
    (``tarfile`` would silently read a tar cut at a member boundary), every header readable, and,
    when ``expected_samples`` is given (the stats' successes), that many sample keys.
    """
    return tar_check(path, expected_samples)[0]


def tar_check(path: str, expected_samples: int | None = None) -> tuple[str | None, set[str]]:
    """``(tar_problem, sample keys)`` of the tar at ``path``, from one pass over its headers."""
    name = os.path.basename(path)
    keys: set[str] = set()
    try:
        size = os.path.getsize(path)
        if size == 0 or size % 512:
            why = f"{size} bytes is not a whole number of 512-byte tar blocks (truncated)"
            return trailing_data_problem(path) or f"{name}: {why}", keys
        with open(path, "rb") as f:
            f.seek(-1024, os.SEEK_END)
            if f.read(1024) != bytes(1024):
                return trailing_data_problem(path) or f"{name}: no end-of-archive blocks (truncated)", keys
        with tarfile.open(path, "r") as tar:
            for member in tar:
                if member.isfile():
                    if member.offset_data + member.size > size:
                        return f"{name}: member {member.name} runs past the end of the file (truncated)", keys
                    parts = sample_member(member.name)
                    if parts is not None:
                        keys.add(parts[0])
    except (tarfile.TarError, OSError, EOFError) as err:
        return f"{name}: unreadable ({err})", keys
    if expected_samples is not None and len(keys) != expected_samples:
        return f"{name}: holds {len(keys)} samples, its stats say {expected_samples}", keys
    return None, keys


def trailing_data_problem(path: str) -> str | None:
    """The problem of a tar whose archive ends (in its two zero blocks) before the file does, None
    for any other tar. Bytes appended after a whole archive were "not a whole number of 512-byte tar
    blocks (truncated)" or "no end-of-archive blocks (truncated)", the wrong cause: inspect --verify
    said it right, but split, dedup and finalize (``tar_check``) still said "truncated"."""
    name = os.path.basename(path)
    try:
        with tarfile.open(path, "r") as tar:
            for _member in tar:  # to the first zero block: where every reader stops
                pass
            end = tar.offset
        with open(path, "rb") as f:
            f.seek(end)
            if f.read(1024) != bytes(1024):  # no end-of-archive blocks there: cut, or garbage mid-archive
                return None
            rest = f.read()
    except (tarfile.TarError, OSError, EOFError):
        return None
    extra = rest.lstrip(b"\0")  # after the zero padding a tar writer adds to a whole record
    if not extra:  # only zeros after the archive: a cut record, as "truncated" as before
        return None
    return (
        f"{name}: {len(extra)} bytes of trailing data after the end of the archive (readers stop at "
        f"its end-of-archive blocks and never see them: a tar appended to?); cut the file to its first "
        f"{end + 1024 + len(rest) - len(extra)} bytes if they hold no samples, else rebuild the shard"
    )


def write_parquet(path: str, rows: list[dict], schema: pa.Schema) -> None:
    """Write ``rows`` as a parquet file with ``schema``, atomically (missing fields are null),
    through a temporary name of its own (see ``_own_temp_file``)."""
    table = pa.Table.from_pylist([{n: r.get(n) for n in schema.names} for r in rows], schema=schema)
    with _own_temp_file(path) as (f, tmp):
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, path)


def parquet_problem(path: str) -> str | None:
    """None when the parquet at ``path`` reads whole, else why not (one phrase naming the file).
    A parquet cut short by a copy was a pyarrow traceback out of inspect --verify, split, dedup
    and vocab, naming no shard (or not what to do)."""
    try:
        pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        return f"{os.path.basename(path)}: unreadable ({' '.join(str(err).split())})"
    return None


def read_parquet_rows(path: str) -> tuple[list[dict], pa.Schema]:
    """All rows of a parquet file, with its schema."""
    table = pq.read_table(path)
    return table.to_pylist(), table.schema


def stats_from_rows(rows: list[dict], start_time: float, end_time: float) -> dict:
    """img2dataset's ``_stats.json`` keys, computed from the shard's parquet rows."""
    status = Counter()
    for row in rows:
        status[SUCCESS if row["status"] == SUCCESS else (row.get("error_message") or row["status"])] += 1
    return {
        "count": len(rows),
        "successes": sum(1 for r in rows if r["status"] == SUCCESS),
        "failed_to_download": sum(1 for r in rows if r["status"] == "failed_to_download"),
        "failed_to_resize": sum(1 for r in rows if r["status"] == "failed_to_resize"),
        "duration": end_time - start_time,
        "start_time": start_time,
        "end_time": end_time,
        "status_dict": dict(status),
    }


def write_stats(folder: str, shard_id: int, stats: dict, oom_shard_count: int = 5) -> None:
    """Write a shard's ``NNNNN_stats.json`` atomically."""
    path = os.path.join(folder, f"{shard_name(shard_id, oom_shard_count)}_stats.json")
    atomic_write_bytes(path, json.dumps(stats, indent=4).encode())


def stats_problem(name: str, stats) -> str | None:
    """Why ``stats`` (a parsed ``NNNNN_stats.json`` of shard ``name``) is not a build stats file
    that sizes the shard, or None. Such a file parses, so ``complete_shards`` takes the shard as
    complete; its readers (build's totals, finalize) check it here instead of a KeyError or
    TypeError traceback on ``{}``, ``[]`` or another tool's JSON."""
    if not isinstance(stats, dict):
        return f"{name}_stats.json is not a JSON object (not a build stats file)"
    counts = (stats.get("successes"), stats.get("count"))
    if not all(map(_is_count, counts)):
        return f"{name}_stats.json has no whole-number successes and count (not a build stats file)"
    if counts[0] > counts[1]:
        return f"{name}_stats.json counts more successes than rows (not a build stats file)"
    status = stats.get("status_dict", {})
    if not isinstance(status, dict) or not all(_is_count(n) for n in status.values()):
        return f"{name}_stats.json has a status_dict that is not counts by reason (not a build stats file)"
    return None


def _is_count(n) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 0


def read_stats(folder: str, name: str) -> tuple[dict | None, str | None]:
    """``(stats, None)`` of shard ``name``'s stats file, or ``(None, why not)`` when it does not
    read as a build stats file (torn, not JSON, or ``stats_problem``)."""
    try:
        with open(os.path.join(folder, f"{name}_stats.json"), encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError) as err:
        return None, f"{name}_stats.json: unreadable ({err})"
    problem = stats_problem(name, stats)
    return (None, problem) if problem else (stats, None)


def complete_shards(folder: str) -> dict[int, str]:
    """``{shard_id: name}`` of shards whose stats parse and whose tar and parquet exist.
    Other ``*.json`` (sizes.json, manifests) are ignored rather than crashing the resume."""
    done = {}
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        match = STATS_RE.match(entry)
        if not match:
            continue
        name = match.group(1)
        if not _stats_parse(os.path.join(folder, entry)):
            continue
        if all(os.path.exists(os.path.join(folder, f"{name}.{ext}")) for ext in ("tar", "parquet")):
            _refuse_two_names_of_one_shard(folder, done.get(int(name)), name)
            done[int(name)] = name
    return done


def _stats_parse(path: str) -> bool:
    """Whether the stats file at ``path`` parses, so its shard counts as complete. A torn file is
    not (redo the shard), nor one gone since the folder was listed (a concurrent build or reshard
    replacing it) or a dangling symlink: such a shard is incomplete, left out and named as such by
    every caller. One that exists and cannot be read (no read permission, a folder of that name) is
    a one-line SystemExit: it was an OSError traceback out of build, inspect, split, vocab, dedup
    and finalize, and no rebuild mends it."""
    try:
        with open(path, encoding="utf-8") as f:
            json.load(f)
    except (ValueError, FileNotFoundError):
        return False  # torn, or gone since the listing: the shard is not complete
    except OSError as err:
        raise SystemExit(
            f"{path}: cannot read this shard's stats file ({err.strerror or err}); make it a readable "
            "file (or delete it and run the same build again to redo the shard), then run again"
        ) from None
    return True


def _refuse_two_names_of_one_shard(folder: str, earlier: str | None, name: str) -> None:
    """A one-line SystemExit when two complete shards have one number (``00001`` and ``000001``:
    two builds of other zero padding, or a user's copy, in one folder). Keyed by number, one
    replaced the other: finalize, split, dedup and vocab left its samples out (listed as
    incomplete, "no stats yet"), and build took it for the other one."""
    if earlier is not None:
        first, second = sorted((earlier, name))
        raise SystemExit(
            f"{folder}: shards {first}.tar and {second}.tar are both shard number {int(name)} (two "
            f"builds' shards in one folder?). Move one of them (its .tar, .parquet and _stats.json) "
            "to a folder of its own, then run again."
        )


def tars_not_named_as_shards(folder: str) -> list[str]:
    """File names, sorted, of the tars in ``folder`` that no tool here reads as shards, as they are
    not named ``NNNNN.tar`` (digits, lower-case ``.tar``, uncompressed): ``shard-00001.tar``,
    ``00001.TAR``, ``00001.tar.gz``. Hidden files (``._00001.tar`` of a macOS copy) are no shards."""
    entries = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(
        entry
        for entry in entries
        if entry.lower().endswith(TAR_SUFFIXES)
        and not entry.startswith(".")
        and not SHARD_TAR_RE.match(entry)
        and os.path.isfile(os.path.join(folder, entry))
    )


def require_shards(folder: str) -> dict[int, str]:
    """complete_shards, or a SystemExit that says what to do when there are none."""
    done = complete_shards(folder)
    if not done:
        raise SystemExit(
            f"{folder}: no complete shards (NNNNN.tar + NNNNN.parquet + NNNNN_stats.json). "
            "Run `python -m dataset_tools build --output DIR ...` first, or check the path."
        )
    return done


def iter_shard_names(folder: str) -> Iterator[str]:
    """Names (``00000``...) of complete shards, sorted."""
    for _sid, name in sorted(complete_shards(folder).items()):
        yield name


def now() -> float:
    """Wall-clock time in seconds (one place for the stats' start and end times)."""
    return time.time()
