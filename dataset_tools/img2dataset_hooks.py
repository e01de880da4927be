"""Where we plug into img2dataset 1.47: a Downloader subclass and a sample writer.

img2dataset keeps doing what it is good at: the per-shard thread pool, the resizer, hashing,
stats, and its distributors (multiprocessing, pyspark, ray). We replace two things:

* its per-URL fetch (``img2dataset.downloader.download_image_with_retry``, looked up as a module
  global at call time) with ``fetch.fetch_ladder``: variant ladder, placeholder rejection,
  politeness. The patch is installed inside each worker process (spawned workers re-import
  img2dataset, so a patch made in the parent would not reach them);
* its webdataset writer with ``SortedTarSampleWriter``: members sorted by key, tar and parquet
  written under temporary names and renamed, extra columns (variant, ladder trail), and every
  input row of the shard accounted for even if img2dataset dropped one on an exception.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pyarrow as pa
from img2dataset import downloader as i2d_downloader

from dataset_tools import fetch, shards
from dataset_tools.plan import BUILD_DIR
from dataset_tools.politeness import (
    COOL_DOWN_FILE,
    HostLimiter,
    PolitenessConfig,
    SharedCoolDown,
    template_host,
)

EXTRA_FIELDS = [
    pa.field("variant", pa.string()),
    pa.field("thumbnail_trail", pa.string()),
    pa.field("fetch_attempts", pa.int32()),
]
INTERNAL_COLUMNS = ("sample_key",)
ERR_LOST = "internal: row dropped by the download loop"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass
class _ShardContext:
    """Per-process state for the shard being downloaded (a worker runs one shard at a time)."""

    inputs: list[dict] = field(default_factory=list)  # input rows, by img2dataset row index
    video_ids: list[str] = field(default_factory=list)  # by img2dataset row index
    sample_keys: list[str] = field(default_factory=list)
    outcomes: dict[str, fetch.LadderResult] = field(default_factory=dict)  # by video id
    rows: list[dict] = field(default_factory=list)  # final parquet rows, set by the writer
    started: float = 0.0  # when download_shard began, for the stats


_CTX = _ShardContext()
_FETCH: dict[str, object] = {}  # config, limiter, variants, template for this process
_LOCK = threading.Lock()


def _ladder_download(row, timeout, retries, user_agent_token, disallowed_header_directives):
    """Drop-in for img2dataset's ``download_image_with_retry``: same arguments and return value
    ``(row_index, BytesIO or None, error or None)``; timeout/retries/UA come from our config."""
    index, _url = row
    video_id = _CTX.video_ids[index]
    try:
        result = fetch.fetch_ladder(
            video_id, _FETCH["variants"], _FETCH["template"], _FETCH["config"], _FETCH["limiter"]
        )
    except Exception as err:  # never let one row kill the shard; record why instead
        result = fetch.LadderResult(body=None, error=f"internal fetch error: {err!r}")
    _CTX.outcomes[video_id] = result
    if result.body is None:
        return index, None, result.error
    return index, io.BytesIO(result.body), None


def _write_our_stats(output_folder, shard_id, *_loop_counts_and_times, oom_shard_count=None):
    """Drop-in for img2dataset's ``write_stats`` (a module global of its downloader, looked up at
    call time; 1.47 passes every argument positionally, ``oom_shard_count`` last): the shard's
    only stats write is ours, atomic, counted from the parquet rows the writer completed.

    img2dataset's own wrote its loop's counts in place and ours replaced them only afterwards: a
    build killed in between left a shard that looked complete (stats, tar, parquet) with counts
    that disagree with its parquet (a row the loop lost counted as neither success nor failure),
    and the resume kept it."""
    if oom_shard_count is None:
        oom_shard_count = _loop_counts_and_times[-1]
    stats = shards.stats_from_rows(_CTX.rows, _CTX.started, shards.now())
    shards.write_stats(output_folder, shard_id, stats, oom_shard_count)


def _die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this worker when the build process that spawned it dies.

    img2dataset's spawn pool outlives a killed parent (SIGKILL, OOM killer, or SIGTERM from
    ``timeout``/``kill``): each orphan finished its shard, so the host got more connections than
    the caps allow, and the orphans wrote the same shard files as the resumed build. Linux only;
    elsewhere the pool behaves as before.
    """
    if _FETCH.get("parent_pid") == parent_pid:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return
    prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    _FETCH["parent_pid"] = parent_pid
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)


def cool_down_path(output_folder: str) -> str | None:
    """The build's cool-down file for a download into ``output_folder``: ``OUTPUT/_build/`` for
    the shards, the same file for ``--retry-failed`` (which writes into ``_build/retry``). None
    for a remote URL, which this process cannot write with plain file calls."""
    if "://" in output_folder:
        return None
    folder = os.path.normpath(output_folder)
    parent = os.path.dirname(folder)
    state_dir = parent if os.path.basename(parent) == BUILD_DIR else os.path.join(folder, BUILD_DIR)
    return os.path.join(state_dir, COOL_DOWN_FILE)


def _announce_pending_cool_down(path: str | None, max_seconds: float, host: str) -> None:
    """One line when a cool-down ``host`` asked for before this build is still running."""
    if path is None:
        return
    seconds = SharedCoolDown(path, max_seconds, host).remaining()
    if seconds > 0:
        print(
            f"[dataset_tools] the thumbnail host asked us to slow down (429/503, Retry-After) before "
            f"this download: waiting {seconds:.0f} s more before its first request (recorded in {path})",
            file=sys.stderr,
            flush=True,
        )


class YouTubeDownloader(i2d_downloader.Downloader):
    """img2dataset's Downloader with our fetch and exact per-row accounting.

    ``parent_pid``: the build process, when the workers are its children (the multiprocessing
    distributor); they then die with it instead of downloading on as orphans.
    """

    def __init__(
        self,
        *args,
        variants: Sequence[str],
        url_template: str,
        politeness: PolitenessConfig,
        parent_pid: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.variants = tuple(variants)
        self.url_template = url_template
        self.politeness = politeness
        self.parent_pid = parent_pid
        self.cool_down_file = cool_down_path(self.output_folder)
        self.host = template_host(url_template)
        _announce_pending_cool_down(self.cool_down_file, politeness.backoff_max, self.host)

    def _install(self) -> None:
        with _LOCK:
            if self.parent_pid is not None and self.parent_pid != os.getpid():
                _die_with_parent(self.parent_pid)
            # One limiter per host and its caps: another host has a rate and a cool-down of its own.
            limits = (self.politeness, self.cool_down_file, self.host)
            if _FETCH.get("limits") != limits:
                shared = None
                if self.cool_down_file is not None:
                    shared = SharedCoolDown(self.cool_down_file, self.politeness.backoff_max, self.host)
                _FETCH.update(
                    limits=limits,
                    config=self.politeness,
                    limiter=HostLimiter(
                        self.politeness.max_connections, self.politeness.requests_per_second, shared
                    ),
                )
            _FETCH.update(variants=self.variants, template=self.url_template)
            i2d_downloader.download_image_with_retry = _ladder_download
            i2d_downloader.write_stats = _write_our_stats

    def __call__(self, row):
        """Install our ladder fetch and host limiter into img2dataset, then run its Downloader on ``row``."""
        self._install()
        return super().__call__(row)

    def download_shard(self, row):
        """Download one planned shard: tar and parquet via our writer, then (through
        ``_write_our_stats``) its stats from the parquet rows the writer completed."""
        self._install()
        shard_id, shard_file = row
        _CTX.started = shards.now()
        table = pa.ipc.open_file(shard_file).read_all()
        _CTX.inputs = table.to_pylist()
        _CTX.video_ids = table.column("video_id").to_pylist()
        _CTX.sample_keys = table.column("sample_key").to_pylist()
        _CTX.outcomes, _CTX.rows = {}, []
        super().download_shard(row)


def output_schema(schema: pa.Schema) -> pa.Schema:
    """img2dataset's schema minus our internal columns plus the extra fields."""
    fields = [f for f in schema if f.name not in INTERNAL_COLUMNS]
    names = {f.name for f in fields}
    return pa.schema(fields + [f for f in EXTRA_FIELDS if f.name not in names])


class SortedTarSampleWriter:
    """img2dataset sample-writer interface; buffers one shard and writes it sorted and atomically.

    Memory: one shard of *resized* images (e.g. 1000 x ~20 KB at 256 px), which is why the
    default shard size is 1000.
    """

    def __init__(self, shard_id, output_folder, save_caption, oom_shard_count, schema, encode_format):
        self.folder = output_folder
        self.name = shards.shard_name(shard_id, oom_shard_count)
        self.save_caption = save_caption
        self.schema = output_schema(schema)
        self.encode_format = encode_format
        self.samples: dict[str, dict[str, bytes]] = {}
        self.rows: dict[str, dict] = {}
        self.fetched: dict[str, dict] = {}  # by key: what the ladder did for the row (_fetch_fields)
        self.closed = False

    def write(self, img_str, key, caption, meta):
        """Buffer one sample under its planned key, with the ladder's outcome in its metadata."""
        meta = dict(meta)
        key = meta.pop("sample_key", None) or key  # keep the planned key (stable across retries)
        meta["key"] = key
        # Kept apart from the row until it is recorded: a row whose members fail to build below
        # still gets the variant, URL and trail its fetch had (they were lost with the outcome).
        self.fetched[key] = _fetch_fields(_CTX.outcomes.pop(meta.get("video_id"), None))
        meta = _with_fetch_fields(meta, self.fetched[key])
        if img_str is not None:
            members = {
                self.encode_format: img_str,
                "json": json.dumps(meta, ensure_ascii=False, indent=4, default=str).encode(),
            }
            if self.save_caption:
                members["txt"] = ("" if caption is None else str(caption)).encode()
            self.samples[key] = members
        # Counted only once its members are built: a row whose member failed to encode was a
        # "success" in the parquet and the stats with no sample in the tar. Now img2dataset's
        # loop prints the error and ``close`` records the row as a failure (ERR_LOST).
        self.rows[key] = meta

    def close(self):
        """Record rows img2dataset lost as failures, then write the tar and parquet sorted by key.
        Once: a second call rewrote the shard with every row failed (ERR_LOST) and an empty tar."""
        if self.closed:
            return
        # Any row img2dataset's loop lost (it prints and continues on exceptions) becomes a failure.
        for index, key in enumerate(_CTX.sample_keys):
            if key not in self.rows:
                row = {k: v for k, v in _CTX.inputs[index].items() if k not in INTERNAL_COLUMNS}
                row.update(key=key, status="failed_to_download", error_message=ERR_LOST)
                self.rows[key] = _with_fetch_fields(row, self._fetch_of_lost_row(key, row))
        rows = [self.rows[k] for k in sorted(self.rows)]
        shards.write_tar(f"{self.folder}/{self.name}.tar", self.samples.items())
        shards.write_parquet(f"{self.folder}/{self.name}.parquet", rows, self.schema)
        _CTX.rows = rows
        self.samples, self.rows, self.fetched = {}, {}, {}
        self.closed = True  # not before: a close that failed (a full disk) may be called again

    def _fetch_of_lost_row(self, key: str, row: dict) -> dict:
        """What the ladder did for a row img2dataset's loop lost: kept by ``write`` when the row's
        members failed to build, else the outcome the loop never handed to ``write`` (an
        exception before it)."""
        if key in self.fetched:
            return self.fetched[key]
        return _fetch_fields(_CTX.outcomes.pop(row.get("video_id"), None))


def _fetch_fields(outcome: fetch.LadderResult | None) -> dict:
    """The parquet and json fields of a row's fetch (``EXTRA_FIELDS`` and the URL asked last);
    empty for a row never fetched."""
    if outcome is None:
        return {}
    return {
        "variant": outcome.variant,
        "url": outcome.url,
        "thumbnail_trail": ",".join(outcome.trail),
        "fetch_attempts": outcome.attempts,
    }


def _with_fetch_fields(row: dict, fields: dict) -> dict:
    """``row`` with ``fields`` (``_fetch_fields``), its planned URL kept when the fetch named none."""
    return {**row, **fields, "url": fields.get("url") or row.get("url")}
