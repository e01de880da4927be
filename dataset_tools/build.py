"""``build``: metadata -> plan -> img2dataset download (our hooks) -> shards, resumable.

Re-running on the same output continues: complete shards (parseable stats + tar + parquet) are
skipped, anything else is redone from the plan. ``retry_failed`` also re-attempts the failed rows
of complete shards (those not yet downloaded ``max_attempts`` times) and merges them back
(``retry.py``); a shard whose merge is refused is counted and named, the others still merge,
and a merge a stopped build left midway is finished first, without downloading the shard again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.pool
import os
import re
import shutil
import signal
import string
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations phones home on import

from dataset_tools import metadata, retry, shards, youtube
from dataset_tools import plan as plan_mod
from dataset_tools.politeness import PolitenessConfig


@dataclass
class BuildConfig:
    """Options of ``python -m dataset_tools build`` (each field is a ``--flag``)."""

    inputs: list[str]
    output: str
    input_format: str = "auto"
    categories_json: str | None = None
    url_template: str = youtube.DEFAULT_URL_TEMPLATE
    variants: Sequence[str] = youtube.DEFAULT_VARIANTS
    caption_template: str = "{title}"
    image_size: int = 256
    resize_mode: str = "keep_ratio"
    resize_only_if_bigger: bool = False
    encode_quality: int = 95
    crop_letterbox: bool = False
    shard_size: int = 1000
    oom_shard_count: int = 5
    processes: int = 1
    threads: int = 16
    distributor: str = "multiprocessing"
    subjob_size: int = 1000
    max_shard_retry: int = 1
    retry_failed: bool = False
    politeness: PolitenessConfig = field(default_factory=PolitenessConfig)
    max_attempts: int | None = None  # with retry_failed: rows downloaded this often are not retried


def check_config(cfg: BuildConfig) -> None:
    """Refuse options that would fail midway or break the politeness caps, before anything is
    read or written: a SystemExit whose one line says what to change."""
    if cfg.shard_size < 1:
        raise SystemExit(f"--shard-size {cfg.shard_size}: must be at least 1 (samples per shard, e.g. 1000)")
    _check_max_attempts(cfg)
    # Values that started the build and then failed every row (--retries -1: "internal fetch
    # error" on each; --image-size 0, --deadline 0) or hung it (--threads 0).
    p = cfg.politeness
    for flag, value, ok, rule in (
        ("--image-size", cfg.image_size, cfg.image_size >= 1, "at least 1 (pixels, e.g. 256)"),
        ("--encode-quality", cfg.encode_quality, 0 <= cfg.encode_quality <= 100, "0 to 100 (e.g. 95)"),
        ("--threads", cfg.threads, cfg.threads >= 1, "at least 1 (e.g. 16)"),
        ("--retries", p.retries, p.retries >= 0, "0 (no re-attempt) or more (e.g. 3)"),
        ("--deadline", p.deadline, p.deadline > 0, "more than 0 seconds (e.g. 20)"),
        ("--requests-per-second", p.requests_per_second, p.requests_per_second >= 0, "0 (no cap) or more"),
        ("--backoff-base", p.backoff_base, p.backoff_base >= 0, "0 or more seconds (e.g. 0.5)"),
        ("--backoff-max", p.backoff_max, p.backoff_max >= 0, "0 or more seconds (e.g. 60)"),
        ("--max-bytes", p.max_bytes, p.max_bytes >= 1, "at least 1 (e.g. 8388608)"),
        ("--max-pixels", p.max_pixels, p.max_pixels >= 1, "at least 1 (e.g. 16777216)"),
    ):
        if not ok:
            raise SystemExit(f"{flag} {value}: must be {rule}")
    problem = (
        plan_mod.check_caption_template(cfg.caption_template)
        or _url_template_problem(cfg)
        or _remote_output_problem(cfg.output)
        or _output_is_input_problem(cfg)
    )
    if problem:
        raise SystemExit(problem)
    try:
        cfg.politeness.per_process(cfg.processes)
    except ValueError as err:
        raise SystemExit(str(err)) from None


def _check_max_attempts(cfg: BuildConfig) -> None:
    """``--max-attempts`` counts the first download too, so 1 is the least that means anything;
    without ``--retry-failed`` nothing is retried and the cap would be ignored without a word."""
    if cfg.max_attempts is None:
        return
    if cfg.max_attempts < 1:
        raise SystemExit(
            f"--max-attempts {cfg.max_attempts}: must be at least 1 (downloads of a row in all, the first "
            "included, e.g. 3)"
        )
    if not cfg.retry_failed:
        raise SystemExit(
            f"--max-attempts {cfg.max_attempts} only limits build --retry-failed: add --retry-failed, "
            "or drop --max-attempts"
        )


def _remote_output_problem(output: str) -> str | None:
    """None unless ``--output`` is a URL. The build's plan, lock and shard files are local files:
    ``--output s3://bucket/out`` made a local folder ``./s3:/bucket/out`` with a plan and a lock, then
    failed every shard ("Install s3fs") and exited 2."""
    if "://" not in output:
        return None
    scheme = output.split("://", 1)[0]
    return (
        f"--output {output}: build writes to a local (or mounted) folder path, not a {scheme}:// URL; build "
        "into a local folder and copy the shards up afterwards (e.g. aws s3 sync, gsutil rsync), or mount "
        "the bucket"
    )


def _output_is_input_problem(cfg: BuildConfig) -> str | None:
    """None unless an ``--input`` folder is the ``--output`` folder. The first build worked, and
    every later one (a resume, ``--retry-failed``) read the build's own ``NNNNN.parquet`` and
    ``_stats.json`` back as metadata and stopped on a parse error about a stats file."""
    output = os.path.realpath(cfg.output)
    for item in cfg.inputs:
        if os.path.isdir(item) and os.path.realpath(item) == output:
            return (
                f"--input {item} is also --output: the shards written there would be read back as "
                f"metadata by the next build. Give another --output, e.g. {os.path.join(item, 'shards')}"
            )
        if os.path.exists(item) or not any(ch in item for ch in "*?["):
            continue
        # A pattern reads the folders it matches (``data/*`` with ``--output data/shards``); the
        # output may not exist yet, so its name is matched too (the first build is refused, not
        # only the resume).
        matched = any(os.path.isdir(m) and os.path.realpath(m) == output for m in glob.glob(item))
        if matched or _pattern_matches(item, cfg.output):
            example = os.path.join(os.path.dirname(item), "*.csv")
            return (
                f"--input {item} matches the --output folder {cfg.output}, so the shards written there "
                "would be read back as metadata by the next build. Give an --output outside it, or "
                f"a pattern that names only the metadata files (e.g. {example})"
            )
    return None


def _pattern_matches(pattern: str, path: str) -> bool:
    """True when glob ``pattern`` names ``path``, whether it exists or not (``*`` stops at ``/``)."""
    parts = os.path.abspath(pattern).split(os.sep)
    names = os.path.abspath(path).split(os.sep)
    return len(parts) == len(names) and all(fnmatch.fnmatchcase(n, p) for p, n in zip(parts, names))


def _url_template_problem(cfg: BuildConfig) -> str | None:
    """None when ``--url-template`` names each thumbnail, else a one-line error. A typo such as
    ``{id}`` failed every row of a resumed build ("internal fetch error"); a template without
    ``{video_id}`` fetched one image for every video."""
    hint = "e.g. https://i.ytimg.com/vi/{video_id}/{variant}.jpg"
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(cfg.url_template) if name is not None}
        youtube.thumbnail_url("dQw4w9WgXcQ", cfg.variants[0], cfg.url_template)
    except (ValueError, KeyError, IndexError, AttributeError) as err:
        return f"--url-template {cfg.url_template!r}: {err!r}; use only {{video_id}} and {{variant}}, {hint}"
    if "video_id" not in names:
        return (
            f"--url-template {cfg.url_template!r}: has no {{video_id}}, so every video gets one image; {hint}"
        )
    if "variant" not in names and len(cfg.variants) > 1:
        return (
            f"--url-template {cfg.url_template!r}: has no {{variant}}, so every rung of --variants asks "
            f"for the same URL; add it or pass one variant, {hint}"
        )
    return None


def _make_downloader(cfg: BuildConfig, output_folder: str, column_list: list[str]):
    from img2dataset.resizer import Resizer

    from dataset_tools.img2dataset_hooks import SortedTarSampleWriter, YouTubeDownloader
    from dataset_tools.letterbox import LetterboxResizer

    resizer = Resizer(
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        encode_quality=cfg.encode_quality,
        encode_format="jpg",
    )
    if cfg.crop_letterbox:
        resizer = LetterboxResizer(resizer)
    per_process = cfg.politeness.per_process(cfg.processes)
    return YouTubeDownloader(
        sample_writer_class=SortedTarSampleWriter,
        resizer=resizer,
        # More threads than allowed connections would only queue on the limiter.
        thread_count=max(1, min(cfg.threads, per_process.max_connections)),
        save_caption=True,
        extract_exif=False,
        output_folder=output_folder,
        column_list=column_list,
        timeout=per_process.deadline,
        number_sample_per_shard=cfg.shard_size,
        oom_shard_count=cfg.oom_shard_count,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format="jpg",
        retries=0,
        user_agent_token=per_process.robots_token,
        disallowed_header_directives=list(per_process.disallowed_directives),
        variants=cfg.variants,
        url_template=cfg.url_template,
        politeness=per_process,
        # Only the multiprocessing pool's workers are children of this process.
        parent_pid=os.getpid() if cfg.distributor == "multiprocessing" else None,
    )


def _distribute(cfg: BuildConfig, downloader, jobs: list[tuple]) -> None:
    from img2dataset import distributor as dist

    if not jobs:
        return
    if cfg.distributor == "multiprocessing":
        fn = _watched_multiprocessing_distributor
    elif cfg.distributor == "pyspark":
        try:
            import pyspark  # noqa: F401
        except ImportError as err:
            raise SystemExit("--distributor pyspark needs `pip install pyspark`") from err
        fn = dist.pyspark_distributor
    elif cfg.distributor == "ray":
        try:
            import ray  # noqa: F401
        except ImportError as err:  # img2dataset would silently do nothing
            raise SystemExit("--distributor ray needs `pip install ray`") from err
        fn = dist.ray_distributor
    else:
        raise SystemExit(f"--distributor {cfg.distributor!r}: use multiprocessing, pyspark or ray")
    fn(cfg.processes, downloader, jobs, cfg.subjob_size, cfg.max_shard_retry)


class WorkerDied(Exception):
    """A download worker process died mid-build (SIGKILL from the OOM killer, a segfault)."""


class _SigintBlockedProcess(multiprocessing.context.SpawnProcess):
    """A spawn worker started with SIGINT blocked, which it keeps for life (the signal mask is
    inherited across fork and exec, and Python never unblocks it). A terminal's Ctrl-C goes to
    the whole process group: each worker printed its own KeyboardInterrupt traceback after the
    build's one line. The build alone stops on Ctrl-C and terminates its workers on the way out."""

    def start(self) -> None:
        # A mask, not SIG_IGN: the pool also starts workers from its handler thread (every 5
        # tasks), where signal.signal cannot be called; pthread_sigmask works in any thread, and
        # a Ctrl-C that lands while the main thread starts one stays pending for it, not lost.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class _WatchedPool(multiprocessing.pool.Pool):
    """img2dataset's spawn pool that keeps every worker process it starts, so that the build can
    see one that died: the pool quietly replaces it, and the shard it held never comes back."""

    def __init__(self, *args, **kwargs):
        self.workers: list = []  # set first: the base class starts the workers
        super().__init__(*args, **kwargs)

    def Process(self, ctx, *args, **kwds):
        process = _SigintBlockedProcess(*args, **kwds)
        self.workers.append(process)
        return process

    def dead_worker_signal(self) -> str | None:
        """How a worker that did not exit cleanly ended (a maxtasksperchild exit is code 0)."""
        self.workers = [p for p in self.workers if p.exitcode != 0]
        for process in self.workers:
            code = process.exitcode
            if code is not None:
                return signal.Signals(-code).name if code < 0 else f"exit code {code}"
        return None

    def run_shards(self, downloader, jobs: list[tuple]) -> list[tuple]:
        """Download ``jobs`` at most one per process at a time (so the shards in flight are the
        ones being downloaded); returns the jobs whose shard failed (img2dataset's status)."""
        from tqdm import tqdm

        pending, running, failed = list(reversed(jobs)), {}, []
        finished = threading.Event()
        with tqdm(total=len(jobs)) as bar:
            while pending or running:
                while pending and len(running) < self._processes:
                    job = pending.pop()
                    # (both callbacks take the result or the exception: Event.set takes neither)
                    result = self.apply_async(
                        downloader,
                        (job,),
                        callback=lambda _: finished.set(),
                        error_callback=lambda _: finished.set(),
                    )
                    running[result] = job
                finished.wait(0.2)  # the timeout is the dead-worker check's period
                finished.clear()
                for result in [r for r in running if r.ready()]:
                    job = running.pop(result)
                    if result.get()[0] is False:
                        failed.append(job)
                    bar.update()
                how = self.dead_worker_signal()
                if how:
                    raise WorkerDied(_worker_died_line(how, running.values()))
        return failed


def _worker_died_line(how: str, jobs_in_flight) -> str:
    names = ", ".join(sorted(os.path.splitext(os.path.basename(path))[0] for _, path in jobs_in_flight))
    return (
        f"[dataset_tools] a download worker died ({how}; e.g. the out-of-memory killer) while shards "
        f"{names or '(none)'} were downloading; the build stopped, complete shards are kept: run the "
        "same command again to resume"
    )


def _watched_multiprocessing_distributor(processes_count, downloader, jobs, _subjob_size, max_shard_retry):
    """img2dataset's ``multiprocessing_distributor`` (spawn pool, maxtasksperchild=5, shard
    retries), but a dead worker raises ``WorkerDied`` instead of hanging: ``Pool.imap_unordered``
    never gets the lost task back, so the build waited forever after its other shards."""
    spawn = multiprocessing.get_context("spawn")
    with _WatchedPool(
        processes_count, initializer=_unnamed_locks_in_worker, maxtasksperchild=5, context=spawn
    ) as pool:
        failed = pool.run_shards(downloader, jobs)
        for attempt in range(max_shard_retry):
            if not failed:
                break
            print(f"Retrying {len(failed)} shards, try {attempt + 1}")
            failed = pool.run_shards(downloader, failed)
        if failed:
            print(f"{len(failed)} shards still failed after {max_shard_retry} retries: run build again")


def _unnamed_locks_in_worker() -> None:
    """Pool initializer: the locks a download worker makes for itself (img2dataset's thread pool
    per shard) are unnamed, unlinked at birth. Under spawn they were named semaphores that only the
    worker's own exit unlinks; a worker the build ends on Ctrl-C or SIGTERM (or the OOM killer) never
    did, and the build's last line was multiprocessing's "There appear to be 4 leaked semaphore
    objects". Nothing in a worker starts processes, so the start method is only this lock choice."""
    multiprocessing.set_start_method("fork", force=True)


# The temporary names of a shard's files (``_own_temp_file``'s ``NNNNN.tar.<pid>-<random>.tmp``,
# and the shared ``NNNNN.tar.tmp`` of builds before it). Only these: every ``*.tmp`` was removed,
# the user's own ``notes.tmp`` in the output folder included.
_SHARD_TEMP_RE = re.compile(r"^\d+(?:\.tar|\.parquet|_stats\.json)(?:\.\d+-[0-9a-f]{12})?\.tmp$")


def _clean_partials(folder: str) -> None:
    """Temporary shard files of a crashed run are never valid shards."""
    for name in os.listdir(folder):
        if _SHARD_TEMP_RE.match(name):
            os.remove(os.path.join(folder, name))


# The temporary names of the files only ``build`` writes in ``_build/`` (``atomic_write_bytes``'s
# ``NAME.<pid>-<random>.tmp``, ``save_plan``'s ``plan.parquet.tmp``). Others' (``dedup.json``'s)
# are left alone: a dedup may be writing its report right now, the build lock does not cover it.
_BUILD_TEMP_RE = re.compile(
    r"^(?:(?:summary\.json|rejected_input\.jsonl|host_cooldown\.json|url_templates\.json)\.\d+-[0-9a-f]{12}"
    r"|plan\.parquet)\.tmp$"
)


def _clean_build_partials(build_dir: str) -> None:
    """Remove what a build killed mid-rename left in ``_build/``: with the lock held no other
    build is writing there, so these are stale, and nothing else ever removed them."""
    for name in os.listdir(build_dir):
        if _BUILD_TEMP_RE.match(name):
            os.remove(os.path.join(build_dir, name))


def _write_jobs(tmp_dir: str, groups: dict[int, list[dict]], oom: int) -> list[tuple]:
    os.makedirs(tmp_dir, exist_ok=True)
    jobs = []
    for shard_id, rows in sorted(groups.items()):
        path = os.path.join(tmp_dir, f"{shards.shard_name(shard_id, oom)}.feather")
        plan_mod.write_feather(path, rows)
        jobs.append((shard_id, path))
    return jobs


def _failed_rows(
    output: str, done: dict[int, str], planned: dict[str, dict], max_attempts: int | None = None
) -> tuple[dict[int, list[dict]], int]:
    """The failed rows of the ``done`` shards to download again, by shard, and how many failed
    rows were left out because they were downloaded ``max_attempts`` times already."""
    groups: dict[int, list[dict]] = {}
    exhausted = 0
    for shard_id, name in done.items():
        rows, _ = shards.read_parquet_rows(os.path.join(output, f"{name}.parquet"))
        for row in rows:
            if row["status"] == shards.SUCCESS or row["key"] not in planned:
                continue
            if max_attempts is not None and retry.attempts(row) >= max_attempts:
                exhausted += 1
            else:
                groups.setdefault(shard_id, []).append(planned[row["key"]])
    return groups, exhausted


def built_shards(output: str, say_redone: bool = False) -> dict[int, str]:
    """``complete_shards`` whose stats file reads as a build's (``shards.stats_problem``). Any other
    stats file that parses (``{}``, ``[]``, another tool's JSON) marks no shard built: the shard is
    redone, as after a torn one, instead of a KeyError or TypeError traceback out of the closing
    totals after the whole download. ``say_redone``: name each such file."""
    built = {}
    for shard_id, name in shards.complete_shards(output).items():
        _, problem = shards.read_stats(output, name)
        if problem is None:
            built[shard_id] = name
        elif say_redone:
            print(f"[dataset_tools] {problem}: shard {name} is downloaded again")
    return built


def summarize(output: str, elapsed: float | None = None, new_successes: int = 0) -> dict:
    """Totals over all complete shards: successes, failures by reason, images/s of this run."""
    reasons, count, ok = Counter(), 0, 0
    for name in sorted(built_shards(output).values()):
        stats, _ = shards.read_stats(output, name)
        count += stats["count"]
        ok += stats["successes"]
        for reason, n in stats.get("status_dict", {}).items():
            if reason != shards.SUCCESS:
                reasons[reason] += n
    summary = {
        "rows": count,
        "successes": ok,
        "failures": count - ok,
        "failures_by_reason": dict(reasons.most_common()),
    }
    if elapsed:
        summary.update(
            seconds=round(elapsed, 3),
            new_successes=new_successes,
            images_per_second=round(new_successes / elapsed, 2),
        )
    return summary


@contextmanager
def _stop_cleanly_on_sigterm() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a scheduler) ends the build like Ctrl-C: the download pool
    is terminated on the way out (its workers downloaded on as orphans otherwise) and one line
    says how to resume, instead of a BrokenPipeError traceback from every worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        print(
            f"[dataset_tools] build stopped by {signal.Signals(signum).name}; run the same command "
            "again to resume (complete shards are kept)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build(cfg: BuildConfig) -> dict:
    """Run (or continue) a build; returns the summary dict it also prints and saves."""
    check_config(cfg)
    _make_output_folder(cfg.output)
    with _one_build_per_output(cfg.output), _stop_cleanly_on_sigterm():
        return _build(cfg)


def _make_output_folder(output: str) -> None:
    """Create ``output/_build``, or a one-line SystemExit: an ``--output`` that is a file (the
    metadata CSV named by mistake) or under one, or in a folder the user cannot write, was a
    NotADirectoryError or PermissionError traceback out of the lock."""
    try:
        os.makedirs(os.path.join(output, plan_mod.BUILD_DIR), exist_ok=True)
    except OSError as err:
        raise SystemExit(
            f"--output {output}: cannot create the output folder there ({err.strerror or err}: "
            f"{err.filename}); give a folder path you can write to, e.g. shards/"
        ) from None


@contextmanager
def _one_build_per_output(output: str) -> Iterator[None]:
    """Refuse a second build on an output while one runs there (a requeued job whose earlier
    instance is still alive, the same command in two terminals): both downloaded the same
    shards, doubling the load on the host, and each deleted the other's temporary files. The
    lock is the kernel's, so a killed build never leaves it behind."""

    def refusal(holder: str) -> str:
        return (
            f"{output}: another build is running on this output (pid {holder}); wait for it to "
            "finish or stop it, then run this command again to resume"
        )

    with shards.exclusive_lock(os.path.join(output, plan_mod.BUILD_DIR, "lock"), refusal):
        yield


def _build(cfg: BuildConfig) -> dict:
    os.makedirs(cfg.output, exist_ok=True)
    build_dir = os.path.join(cfg.output, plan_mod.BUILD_DIR)
    os.makedirs(build_dir, exist_ok=True)
    _refuse_shards_without_plan(cfg.output)
    # Read first: a plan that does not read stops the build before it cleans or rewrites a thing,
    # and before minutes of reading a large input.
    previous = plan_mod.load_plan(cfg.output)
    _clean_partials(cfg.output)
    _clean_build_partials(build_dir)
    meta = metadata.read_metadata(cfg.inputs, cfg.input_format, cfg.categories_json)
    _save_rejected(os.path.join(build_dir, "rejected_input.jsonl"), meta.rejected)
    print(
        f"[dataset_tools] {meta.input_rows} input rows -> {len(meta.rows)} videos "
        f"({meta.duplicates} duplicate rows collapsed, {len(meta.rejected)} rejected: invalid id or "
        f"malformed row, listed in {plan_mod.BUILD_DIR}/rejected_input.jsonl)"
    )
    left_out = metadata.describe_left_out(meta)
    if left_out:
        print(left_out)
    cfg = _keep_planned_shard_size(cfg, previous)
    cfg = _keep_planned_image_options(cfg, previous)
    planned_template = plan_mod.planned_url_template(cfg.output, previous, cfg.url_template, cfg.variants[0])
    previous = _use_new_url_template(cfg, previous, planned_template)
    # A resume keeps the saved plan whatever the input says now; say what that means instead
    # of silently building removed rows and old captions beside the new ones.
    drift = plan_mod.input_drift(previous, meta.rows, cfg.caption_template)
    note = plan_mod.describe_drift(drift, bool(previous))
    if note:
        print(note)
    plan = plan_mod.extend_plan(
        previous,
        meta.rows,
        shard_size=cfg.shard_size,
        oom_shard_count=cfg.oom_shard_count,
        caption_template=cfg.caption_template,
        url_template=cfg.url_template,
        first_variant=cfg.variants[0],
    )
    plan_mod.save_plan(cfg.output, plan, cfg.shard_size, _image_options(cfg), cfg.url_template)
    # Before any download: a build killed midway has already fetched from this template.
    url_templates = _record_url_templates(build_dir, planned_template, cfg.url_template)

    # Before the shards to download are chosen, and before --retry-failed empties _build/retry/.
    for line in retry.finish_stopped_merges(cfg.output):
        print(line)
    done = built_shards(cfg.output, say_redone=True)
    retry.apply_attempt_records(cfg.output, done)  # a shard downloaded again by a stopped build
    todo = {sid: rows for sid, rows in plan_mod.by_shard(plan).items() if sid not in done}
    retry_groups, exhausted = (
        _failed_rows(cfg.output, done, {r["sample_key"]: r for r in plan}, cfg.max_attempts)
        if cfg.retry_failed
        else ({}, 0)
    )
    print(
        f"[dataset_tools] {len(done)} shards complete, {len(todo)} to download"
        + (f", {sum(map(len, retry_groups.values()))} failed rows to retry" if cfg.retry_failed else "")
        + (f", {exhausted} not (downloaded --max-attempts {cfg.max_attempts} times)" if exhausted else "")
    )
    before = summarize(cfg.output)["successes"]
    samples_before = _samples_by_shard(cfg.output)
    started = time.time()
    columns = [f.name for f in plan_mod.PLAN_SCHEMA if f.name != "shard_id"]
    tmp_dir = os.path.join(build_dir, "tmp")
    unmerged: dict[str, str] = {}
    worker_died = None
    try:
        _distribute(
            cfg, _make_downloader(cfg, cfg.output, columns), _write_jobs(tmp_dir, todo, cfg.oom_shard_count)
        )
        # A shard whose --retry-failed merge was stopped is downloaded again: its rows count on.
        retry.apply_attempt_records(cfg.output, built_shards(cfg.output))
        if retry_groups:
            unmerged = _retry_failed_rows(cfg, build_dir, tmp_dir, retry_groups, columns)
    except WorkerDied as died:
        # A machine that just lost a worker (to the OOM killer, most likely) is no place to
        # start the next shards; the rerun resumes from the complete ones.
        worker_died = str(died)
        reason = "a download worker died; run build --retry-failed again"
        unmerged = {shards.shard_name(sid, cfg.oom_shard_count): reason for sid in retry_groups}
    shutil.rmtree(tmp_dir, ignore_errors=True)
    elapsed = time.time() - started
    summary = summarize(cfg.output, elapsed, summarize(cfg.output)["successes"] - before)
    summary.update(
        input_rows=meta.input_rows,
        duplicates_collapsed=meta.duplicates,
        invalid_ids=len(meta.rejected),
        values_left_out=meta.values_left_out,
        planned=len(plan),
        shard_size=cfg.shard_size,
        image_options=_image_options(cfg),
        url_template=cfg.url_template,
        url_templates=url_templates,
        **drift,
        incomplete_shards=len(set(plan_mod.by_shard(plan)) - set(built_shards(cfg.output))),
        incomplete_retries=len(unmerged),
        incomplete_retry_reasons=dict(sorted(unmerged.items())),
        retried_rows=sum(map(len, retry_groups.values())),
        max_attempts=cfg.max_attempts,
        retries_exhausted=exhausted,
        download_worker_died=worker_died is not None,
    )
    shards.save_json(os.path.join(build_dir, "summary.json"), summary, "build summary")
    print_summary(summary)
    if worker_died:  # one line for all: every retried shard has the same reason
        print(worker_died, file=sys.stderr, flush=True)
    else:
        for reason in summary["incomplete_retry_reasons"].values():
            print(f"[dataset_tools] {reason}", file=sys.stderr, flush=True)
    _refresh_finalize_files(cfg.output, samples_before)
    return summary


FINALIZE_FILES = ("sizes.json", "__len__", "manifest.json")


def _samples_by_shard(output: str) -> dict[str, int]:
    """``{name: successes}`` of the built shards: what ``finalize``'s files record."""
    return {name: shards.read_stats(output, name)[0]["successes"] for name in built_shards(output).values()}


def _refresh_finalize_files(output: str, samples_before: dict[str, int]) -> None:
    """Run ``finalize`` again when the output was finalized and this build changed what its files
    count (new shards, samples a ``--retry-failed`` merge added). They were left as they were: the
    trainer sized its epochs from the old ``sizes.json`` (or, with shards missing from it, the old
    ``__len__``), and the manifest's brace left the new shards out, without a word."""
    if not any(os.path.exists(os.path.join(output, name)) for name in FINALIZE_FILES):
        return
    if _samples_by_shard(output) == samples_before:
        return
    from dataset_tools import finalize

    try:
        finalize.finalize(output)
    except SystemExit as refused:
        if not isinstance(refused.code, str):  # SIGTERM's exit status: the build stops
            raise
        print(
            f"[dataset_tools] {', '.join(FINALIZE_FILES)} describe the shards before this build and "
            f"could not be refreshed: {refused.code}",
            file=sys.stderr,
            flush=True,
        )
        return
    print(f"[dataset_tools] refreshed {', '.join(FINALIZE_FILES)} (finalize) for the shards built now")


def _save_rejected(path: str, rejected: list[dict]) -> None:
    """Write the rejected rows through a temporary name and rename: written in place, a build
    killed mid-write (or a full disk) left a truncated JSONL that the user's scripts choked on."""
    # backslashreplace: a lone surrogate in a rejected record (a JSON title cut mid-emoji) is
    # written as the JSON escape it came from, "\ud83d", instead of stopping the build.
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in rejected)
    try:
        shards.atomic_write_bytes(path, text.encode("utf-8", errors="backslashreplace"))
    except OSError as err:
        raise SystemExit(
            f"{path}: could not write the rejected input rows ({err.strerror or err}); free space "
            "and run the same build again"
        ) from None


def _refuse_shards_without_plan(output: str) -> None:
    """Refuse an output that holds shards but no plan: ``_build`` deleted, or a folder of other
    shards (img2dataset's, a split, another build's copy). The new plan numbered its shards from
    00000 again, every shard already there was taken as built from it, and the videos planned
    into them were never downloaded while the summary counted the old rows as this input's."""
    if os.path.exists(plan_mod.plan_path(output)):
        return
    found = sorted(name for name in os.listdir(output) if _SHARD_FILE_RE.match(name))
    if found:
        raise SystemExit(
            f"{output}: holds shards ({found[0]}, {len(found)} files) but no "
            f"{plan_mod.BUILD_DIR}/plan.parquet, so they cannot be matched to the input (they would "
            "be kept as if built from it). Use a new --output, or put back the plan.parquet of the "
            "build that wrote them"
        )


_SHARD_FILE_RE = re.compile(r"^\d+(\.tar|\.parquet|_stats\.json)$")


def _keep_planned_shard_size(cfg: BuildConfig, plan: list[dict]) -> BuildConfig:
    """``cfg`` with the shard size the saved plan was made with. A resume with another
    ``--shard-size`` (a requeue script, a changed default) planned its new videos in shards of
    the new size, with keys of another width beside the old ones, without a word."""
    planned = plan_mod.planned_shard_size(cfg.output, plan, cfg.shard_size, cfg.oom_shard_count)
    if planned == cfg.shard_size:
        return cfg
    print(
        f"[dataset_tools] --shard-size {cfg.shard_size} ignored: this output was planned with "
        f"--shard-size {planned}, kept so that its shards and keys stay alike (new videos go into new "
        f"shards of {planned}). To build with --shard-size {cfg.shard_size}, use a new --output"
    )
    return dataclasses.replace(cfg, shard_size=planned)


def _use_new_url_template(cfg: BuildConfig, plan: list[dict], old: str | None) -> list[dict]:
    """The saved plan with its URLs from the given ``--url-template`` when the resume changed it
    from ``old`` (the thumbnail host moved), said in one line. The download always asked the given
    template, but nothing said so, and each row that failed on the new host was recorded with the
    old host's URL (the plan's), as if the old host had still been asked."""
    if old is None:
        return plan
    print(
        f"[dataset_tools] --url-template changed since this output was planned: {old} -> "
        f"{cfg.url_template}; rows already downloaded keep their images and URLs, the rows still to "
        "download (and those --retry-failed retries) are fetched from the new one"
    )
    return plan_mod.with_url_template(plan, cfg.url_template, cfg.variants[0])


URL_TEMPLATES_FILE = "url_templates.json"
"""In ``_build/``: every ``--url-template`` the output was built with, first used first."""


def _record_url_templates(build_dir: str, planned: str | None, current: str) -> list[str]:
    """The templates this output's rows were fetched from, ``current`` included, kept in
    ``URL_TEMPLATES_FILE``: the plan records only the latest, so after a resume with a moved
    template nothing said that older shards came from another host. ``planned`` is the plan's
    template when it differs from ``current`` (it seeds the list of an output built before the
    file existed; a plan older than its recorded template gives a URL instead, not listed); the
    file is rewritten only when the list grows."""
    path = os.path.join(build_dir, URL_TEMPLATES_FILE)
    known = _read_url_templates(path)
    seed = [planned] if planned and "{video_id}" in planned else []
    templates = list(dict.fromkeys([*known, *seed, current]))
    if templates != known:
        shards.save_json(path, templates, "list of URL templates")
    return templates


def _read_url_templates(path: str) -> list[str]:
    """The list in ``path``; empty when it is missing or does not read as a list of strings (an
    edit, a torn copy): the plan's template and the given one still start it again."""
    try:
        with open(path) as f:
            templates = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
        return []
    return templates


def _image_options(cfg: BuildConfig) -> dict:
    return {name: getattr(cfg, name) for name in plan_mod.IMAGE_OPTIONS}


def _keep_planned_image_options(cfg: BuildConfig, plan: list[dict]) -> BuildConfig:
    """``cfg`` with the image options the saved plan was made with. A resume or ``--retry-failed``
    with another ``--image-size`` (or resize mode, quality, cropping, ``--variants`` ladder) wrote
    images of the new size (or thumbnail) into the shards beside the old ones, without a word. A
    plan saved before the options were recorded keeps the given ones (and records them)."""
    recorded = plan_mod.planned_image_options(cfg.output) if plan else None
    if not recorded:
        return cfg
    changed = {k: v for k, v in recorded.items() if _comparable(getattr(cfg, k)) != v}
    if not changed:
        return cfg
    kept = ", ".join(f"{_flag(k, v)} (given {_value(getattr(cfg, k))})" for k, v in changed.items())
    print(
        f"[dataset_tools] image options kept from this output's plan: {kept}, so that all its images "
        "are alike. To build with the given ones, use a new --output"
    )
    return dataclasses.replace(cfg, **changed)


def _comparable(value):
    """A config value as ``planned_image_options`` reads it back (a ladder given as a list is a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def _flag(name: str, value) -> str:
    """The option ``name`` with ``value`` as the command line spells it (a switch as on/off)."""
    return f"--{name.replace('_', '-')} {_value(value)}"


def _value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):  # --variants, as given: comma-separated
        return ",".join(map(str, value))
    return str(value)


def _retry_failed_rows(
    cfg: BuildConfig, build_dir: str, tmp_dir: str, retry_groups, columns
) -> dict[str, str]:
    """Re-download the failed rows of complete shards and merge them back; returns the shards
    whose retry did not complete, each with why and what to do."""
    retry_dir = os.path.join(build_dir, "retry")
    shutil.rmtree(retry_dir, ignore_errors=True)
    os.makedirs(retry_dir)
    _distribute(
        cfg,
        _make_downloader(cfg, retry_dir, columns),
        _write_jobs(tmp_dir, retry_groups, cfg.oom_shard_count),
    )
    unmerged = _merge_each_retry(cfg.output, retry_dir, sorted(retry_groups), cfg.oom_shard_count)
    if not unmerged:  # all merged: the folder is ours and spent (an empty _build/retry/ stayed for good)
        shutil.rmtree(retry_dir, ignore_errors=True)
    return unmerged


def merge_retries(output: str, retry_dir: str, shard_ids: list[int], oom_shard_count: int) -> list[str]:
    """Merge each retried shard that completed; returns the names of those that did not (their
    failed rows stay as they were, and the next ``--retry-failed`` tries them again)."""
    return list(_merge_each_retry(output, retry_dir, shard_ids, oom_shard_count))


def _merge_each_retry(
    output: str, retry_dir: str, shard_ids: list[int], oom_shard_count: int
) -> dict[str, str]:
    """``merge_retries``, with why each unmerged shard was not merged and what to do. A shard the
    merge refuses (a damaged tar) is one of them: its refusal stopped the whole build, so the
    retried shards after it were never merged (their downloads lost) and no summary was written."""
    unmerged = {}
    complete = shards.complete_shards(retry_dir)
    for shard_id in shard_ids:
        name = shards.shard_name(shard_id, oom_shard_count)
        if shard_id not in complete:
            unmerged[name] = f"retry of shard {name} did not complete; run build --retry-failed again"
            continue
        try:
            retry.merge_retry(output, retry_dir, name)
        except SystemExit as refused:
            if not isinstance(refused.code, str):  # SIGTERM's exit status: the build stops
                raise
            unmerged[name] = refused.code
    return unmerged


def exit_code(summary: dict) -> int:
    """0 when every planned shard is complete and every retried one merged and no download
    worker died, else 2 (run again)."""
    incomplete = ("incomplete_shards", "incomplete_retries", "download_worker_died")
    return 2 if any(summary.get(key) for key in incomplete) else 0


def print_summary(summary: dict) -> None:
    """Print the build summary: successes, failures by reason and this run's images/s."""
    print(
        f"[dataset_tools] {summary['successes']} / {summary['rows']} rows succeeded, "
        f"{summary['failures']} failed"
    )
    for reason, n in summary["failures_by_reason"].items():
        print(f"    {n:8d}  {reason}")
    if "images_per_second" in summary:
        print(
            f"[dataset_tools] this run: {summary['new_successes']} images in "
            f"{summary['seconds']:.1f}s = {summary['images_per_second']:.1f} images/s"
        )
    if summary.get("incomplete_shards"):
        print(f"[dataset_tools] {summary['incomplete_shards']} shards incomplete: run build again")
    if summary.get("retries_exhausted"):
        print(
            f"[dataset_tools] {summary['retries_exhausted']} failed rows not retried: downloaded "
            f"--max-attempts {summary['max_attempts']} times already"
        )
    if summary.get("incomplete_retries"):
        print(
            f"[dataset_tools] {summary['incomplete_retries']} retried shards not merged (why and what to "
            "do: on stderr, and incomplete_retry_reasons in summary.json)"
        )
