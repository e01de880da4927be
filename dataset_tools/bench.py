"""``python -m dataset_tools.bench``: ours vs plain img2dataset on the same URLs and settings.

A loopback FakeThumbnailHost with ``--latency`` seconds per request serves N thumbnails that all
exist (maxresdefault, 1280x720), the case where the ladder must cost nothing. Both sides resize
to the same size with the same process/thread counts, no rate cap, sha256 on, EXIF off.
Prints (and with ``--out`` writes) measured images/s of each and the ratio ours/plain.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def commit() -> str | None:
    """HEAD of the checkout this file runs from (``+dirty`` with uncommitted changes to tracked
    files); None outside one, or for a copy the checkout does not track (an install into an
    ignored ``.venv``). dataset_tools imports nothing of vutrain or kernels, so this is its own."""
    here = os.path.abspath(__file__)
    root = os.path.dirname(os.path.dirname(here))

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        git("ls-files", "--error-unmatch", "--", here)
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, a SLURM task's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity masks
        return os.cpu_count() or 1


def where_measured(argv: list[str]) -> dict:
    """The record's provenance: CPUs, device, date and the command that reruns the measurement.

    BENCHMARKS.md rows name the command, date and device. The command is shell-quoted (joined
    bare, an ``--out`` path with a space did not rerun), and ``cpus_usable`` is the affinity mask:
    ``cpus`` alone, the machine's count, described a 128-core node for a run pinned to 8 of them.
    """
    cpus, usable = os.cpu_count(), _usable_cpus()
    cores = f"{cpus} cores" if usable == cpus else f"{usable} of {cpus} cores usable"
    return {
        "python": platform.python_version(),
        "cpus": cpus,
        "cpus_usable": usable,
        "device": f"CPU ({cores}, {platform.processor() or platform.machine()})",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "-m", "dataset_tools.bench", *argv]),
        "commit": commit(),
    }


def _ids(n: int):
    return [f"bench{i:06d}"[:11] for i in range(n)]


def run_plain(url_template: str, ids, out: str, args) -> float:
    """Download ``ids`` with plain img2dataset (no ladder, no hooks); returns the seconds taken."""
    import pandas as pd
    from img2dataset import download

    src = os.path.join(out, "plain_input.parquet")
    pd.DataFrame(
        {
            "url": [url_template.format(video_id=v, variant="maxresdefault") for v in ids],
            "caption": [f"title {v}" for v in ids],
        }
    ).to_parquet(src)
    start = time.time()
    download(
        url_list=src,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_folder=os.path.join(out, "plain"),
        output_format="webdataset",
        image_size=args.image_size,
        resize_mode="keep_ratio",
        processes_count=args.processes,
        thread_count=args.threads,
        number_sample_per_shard=args.shard_size,
        extract_exif=False,
        timeout=10,
        retries=0,
        compute_hash="sha256",
    )
    elapsed = time.time() - start
    done = stats_successes(os.path.join(out, "plain"))
    if done != len(ids):
        # Checked as ours is: a side that skipped failed downloads did less work, and its
        # images/s set beside the other's was not a ratio over the same thumbnails.
        raise SystemExit(f"plain img2dataset: only {done}/{len(ids)} succeeded; no ratio over unequal work")
    return elapsed


def stats_successes(folder: str) -> int:
    """Successes summed over img2dataset's ``*_stats.json`` in ``folder`` (0 when there are none)."""
    total = 0
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith("_stats.json"):
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                total += int(json.load(fh).get("successes", 0))
    return total


def run_ours(url_template: str, ids, out: str, args) -> float:
    """Download ``ids`` with our ``build`` (ladder, politeness, hooks); returns the seconds taken."""
    import pandas as pd

    from dataset_tools.build import BuildConfig, build
    from dataset_tools.politeness import PolitenessConfig

    src = os.path.join(out, "ours_input.csv")
    pd.DataFrame({"video_id": ids, "title": [f"title {v}" for v in ids]}).to_csv(src, index=False)
    cfg = BuildConfig(
        inputs=[src],
        output=os.path.join(out, "ours"),
        url_template=url_template,
        image_size=args.image_size,
        shard_size=args.shard_size,
        processes=args.processes,
        threads=args.threads,
        politeness=PolitenessConfig(
            max_connections=args.threads * args.processes, requests_per_second=0, retries=0, deadline=10
        ),
    )
    start = time.time()
    summary = build(cfg)
    elapsed = time.time() - start
    if summary["successes"] != len(ids):
        raise SystemExit(f"ours: only {summary['successes']}/{len(ids)} succeeded: {summary}")
    return elapsed


def require_img2dataset() -> None:
    """Both sides download through img2dataset: without it the run ended in a ModuleNotFoundError
    traceback, after the fake host had rendered every thumbnail. One line instead, exit 2."""
    try:
        import img2dataset  # noqa: F401
    except ImportError as exc:
        print(
            f"python -m dataset_tools.bench: img2dataset is not installed ({exc}); "
            "install the dataset tools' dependencies: pip install -e '.[data]'",
            file=sys.stderr,
        )
        raise SystemExit(2) from None


def main(argv=None) -> dict:
    """Run both sides against a fake host; print (with ``--out`` also write) the JSON result, return it."""
    # prog: argparse named the file ("usage: bench.py"), which cannot be typed to run it.
    p = argparse.ArgumentParser(prog="python -m dataset_tools.bench", description=__doc__)
    p.add_argument("-n", "--num", type=int, default=400)
    p.add_argument("--latency", type=float, default=0.05, help="seconds the fake host waits per request")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=200)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument(
        "--repeats", type=int, default=1, help="alternate plain/ours this many times, keep the best"
    )
    p.add_argument("--out", help="also write the result as JSON here")
    args = p.parse_args(argv)
    for flag, value in (
        ("--num", args.num),
        ("--repeats", args.repeats),
        ("--processes", args.processes),
        ("--threads", args.threads),
        ("--shard-size", args.shard_size),
    ):
        if value < 1:
            p.error(f"{flag} {value}: must be >= 1")
    # Refused here, before any download: a negative or nan latency failed every request of the
    # fake host, and the run ended with "plain img2dataset: only 0/N succeeded", which blamed
    # img2dataset; an image size of 0 was refused by ours' config check only after plain's run.
    if args.image_size < 1:
        p.error(f"--image-size {args.image_size}: must be >= 1 (pixels, e.g. 256)")
    if not (math.isfinite(args.latency) and args.latency >= 0):
        p.error(f"--latency {args.latency}: must be a finite number of seconds >= 0 (e.g. 0.05)")

    if args.out:  # made before the downloads: a missing folder was a traceback after the whole run
        try:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        except OSError as exc:
            p.error(f"--out {args.out}: its folder cannot be created ({exc.strerror})")
    require_img2dataset()
    from dataset_tools.fake_host import FakeThumbnailHost

    ids = _ids(args.num)
    times = {"plain": [], "ours": []}
    with FakeThumbnailHost(latency=args.latency, max_lifetime=3600) as host:
        for vid in ids:  # render once up front so neither side pays for image generation
            host.image(vid, "maxresdefault")
        for _ in range(args.repeats):
            for name, fn in (("plain", run_plain), ("ours", run_ours)):
                work = tempfile.mkdtemp(prefix=f"dt_bench_{name}_")
                try:
                    times[name].append(fn(host.url_template, ids, work, args))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    result = {
        "n": args.num,
        "latency_s": args.latency,
        "processes": args.processes,
        "threads": args.threads,
        "image_size": args.image_size,
        "shard_size": args.shard_size,
        "repeats": args.repeats,
        "plain_img2dataset_images_per_s": round(args.num / best["plain"], 2),
        "ours_images_per_s": round(args.num / best["ours"], 2),
        "ratio_ours_over_plain": round(best["plain"] / best["ours"], 3),
        "seconds": times,
        **where_measured(sys.argv[1:] if argv is None else list(argv)),
        "img2dataset": _version("img2dataset"),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
