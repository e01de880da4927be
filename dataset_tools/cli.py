"""Command line: one sub-parser per subcommand, each handing a typed config to its module."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from dataset_tools import youtube
from dataset_tools.politeness import PolitenessConfig

_P = PolitenessConfig()


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends an option's default to its help: `build --help` showed none of the figures the
    README quotes (16 connections, 50 requests/s, 3 retries, 1000 per shard). Options without a
    value of their own (None, a flag's False, '') and help that already names its default are
    left as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        if "default" in text:
            return action.help
        return f"{text} (default: %(default)s)".lstrip()


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build",
        help="download thumbnails into img2dataset-layout webdataset shards",
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument(
        "--input",
        nargs="+",
        action="extend",  # `--input a.csv --input b.csv` read only b.csv: the second replaced the first
        required=True,
        metavar="META",
        help="metadata files, globs or directories (Kaggle CSV, CSV/TSV/parquet/JSONL, yt-dlp JSON lines)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="shard folder (a rerun resumes it)")
    p.add_argument(
        "--input-format",
        default="auto",
        choices=["auto", "kaggle", "csv", "jsonl", "ytdlp"],
        help="input reader",
    )
    p.add_argument(
        "--categories-json",
        help=(
            "YouTube API videoCategories JSON (default: <REGION>_category_id.json next to the input, "
            "then the built-in table)"
        ),
    )
    p.add_argument("--url-template", default=youtube.DEFAULT_URL_TEMPLATE, help="thumbnail URL")
    p.add_argument(
        "--variants", default=",".join(youtube.DEFAULT_VARIANTS), help="thumbnail ladder, best first"
    )
    p.add_argument(
        "--caption-template", default="{title}", help="e.g. '{title}. Tags: {tags}. {category_name}'"
    )
    p.add_argument("--image-size", type=int, default=256, help="side in pixels after resizing")
    p.add_argument(
        "--resize-mode",
        default="keep_ratio",
        choices=["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"],
        help="img2dataset resize mode",
    )
    p.add_argument("--resize-only-if-bigger", action="store_true")
    p.add_argument("--encode-quality", type=int, default=95, help="JPEG quality")
    p.add_argument(
        "--crop-letterbox", action="store_true", help="remove black bars of 4:3 thumbnails before resizing"
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--processes", type=int, default=1, help="download processes")
    p.add_argument("--threads", type=int, default=16, help="download threads per process")
    p.add_argument(
        "--distributor",
        default="multiprocessing",
        choices=["multiprocessing", "pyspark", "ray"],
        help="img2dataset distributor",
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="also re-attempt rows that failed in complete shards"
    )
    p.add_argument(
        "--max-attempts",
        type=int,
        metavar="N",
        help="with --retry-failed: do not retry rows downloaded N times already (default: no limit)",
    )
    p.add_argument(
        "--max-connections", type=int, default=_P.max_connections, help="concurrent requests, whole build"
    )
    p.add_argument(
        "--requests-per-second", type=float, default=_P.requests_per_second, help="whole build; 0 = no cap"
    )
    p.add_argument("--retries", type=int, default=_P.retries, help="re-attempts after 429/5xx/timeouts")
    p.add_argument(
        "--backoff-base",
        type=float,
        default=_P.backoff_base,
        help="first backoff in seconds, doubled per retry",
    )
    p.add_argument(
        "--backoff-max",
        type=float,
        default=_P.backoff_max,
        help="longest single wait in seconds (also caps a Retry-After)",
    )
    p.add_argument("--deadline", type=float, default=_P.deadline, help="wall-clock seconds per request")
    p.add_argument("--max-bytes", type=int, default=_P.max_bytes, help="largest response body")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=_P.max_pixels,
        help="largest image, width x height, read from its header",
    )
    p.add_argument("--user-agent", default=_P.user_agent, help="identifies the build to the host")
    p.add_argument(
        "--ignore-x-robots-tag",
        action="store_true",
        help="do not drop images whose X-Robots-Tag says noai/noimageai/noindex/noimageindex",
    )


def _build_config(args):
    from dataset_tools.build import BuildConfig

    politeness = PolitenessConfig(
        max_connections=args.max_connections,
        requests_per_second=args.requests_per_second,
        retries=args.retries,
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        deadline=args.deadline,
        max_bytes=args.max_bytes,
        max_pixels=args.max_pixels,
        user_agent=args.user_agent,
        disallowed_directives=() if args.ignore_x_robots_tag else _P.disallowed_directives,
    )
    variants = _parse_variants(args.variants)
    return BuildConfig(
        inputs=args.input,
        output=args.output,
        input_format=args.input_format,
        categories_json=args.categories_json,
        url_template=args.url_template,
        variants=variants,
        caption_template=args.caption_template,
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        resize_only_if_bigger=args.resize_only_if_bigger,
        encode_quality=args.encode_quality,
        crop_letterbox=args.crop_letterbox,
        shard_size=args.shard_size,
        processes=args.processes,
        threads=args.threads,
        distributor=args.distributor,
        retry_failed=args.retry_failed,
        politeness=politeness,
        max_attempts=args.max_attempts,
    )


def _at_least(minimum: int):
    """An argparse type: a whole number >= ``minimum``, else argparse's one usage line.
    ``inspect --top -2`` sliced off the last two rows of every table instead of refusing."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value}: must be {minimum} or more")
        return value

    return whole_number


# A variant is one file name of the thumbnail's URL path (hqdefault, maxres1, hq720).
_VARIANT_RE = re.compile(r"[A-Za-z0-9_.-]+")


def _parse_variants(text: str) -> tuple[str, ...]:
    """The ``--variants`` ladder, or a one-line SystemExit. A space-separated list was one variant
    "mqdefault hqdefault" whose URL every request refused (InvalidURL): every row failed after
    the whole download and the shards counted as complete, so a fixed rerun kept the failures."""
    variants = tuple(v.strip() for v in text.split(",") if v.strip())
    example = ",".join(youtube.DEFAULT_VARIANTS)
    if not variants:
        raise SystemExit(f"--variants is empty; give at least one, e.g. {example}")
    for variant in variants:
        if not _VARIANT_RE.fullmatch(variant):
            raise SystemExit(
                f"--variants {text!r}: {variant!r} is not a thumbnail name (letters, digits, _ . - only); "
                f"separate the variants with commas, e.g. {example}"
            )
    repeated = sorted({v for v in variants if variants.count(v) > 1})
    if repeated:  # a missing thumbnail would be asked for twice: only more load on the host
        raise SystemExit(f"--variants {text!r}: {', '.join(repeated)} listed twice; name each variant once")
    return variants


def _add_others(sub) -> None:
    p = sub.add_parser(
        "inspect",
        help="counts, failure reasons, tag/category histograms, variant mix",
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("dir")
    p.add_argument(
        "--verify", action="store_true", help="decode every image, check every sample; exit 1 on corruption"
    )
    p.add_argument("--top", type=_at_least(0), default=10, help="rows per count table")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p = sub.add_parser("finalize", help="sizes.json, __len__ and manifest.json for open_clip")
    p.add_argument("dir")
    p = sub.add_parser(
        "split",
        help="train/validation split by channel, video-id hash or publish date",
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("dir")
    p.add_argument("--output", required=True, help="writes <output>/train and <output>/val shards")
    p.add_argument(
        "--by",
        choices=["channel", "hash", "date"],
        default="channel",
        help="date: published before the cut -> train, on or after it -> val (undated -> train)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="share of samples in val (default 0.1); with --by date, the newest samples",
    )
    p.add_argument(
        "--cut", help="--by date: ISO date or date time (UTC), e.g. 2024-01-01; replaces --val-fraction"
    )
    p.add_argument("--seed", default="0", help="salt of the hash")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per output shard")
    p = sub.add_parser("vocab", help="tag and category vocabularies", formatter_class=_DefaultsHelpFormatter)
    p.add_argument("dir")
    p.add_argument("--output", required=True, help="JSON file")
    p.add_argument(
        "--min-count", type=_at_least(0), default=5, help="drop tags and categories seen less often"
    )
    p = sub.add_parser(
        "dedup",
        help="exact (sha256) and perceptual duplicates, repeats of one video too",
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("dir")
    p.add_argument("--report", help="JSON report path (default DIR/_build/dedup.json)")
    p.add_argument("--max-distance", type=int, default=4, help="perceptual hash Hamming distance")
    p.add_argument("--filter-output", help="write shards without the duplicates here")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per --filter-output shard")


def _program_name() -> str:
    """The name the user typed: usage lines and errors said "python -m dataset_tools" to someone
    who ran the ``vutrain-dataset`` console script (which then has no ``python -m`` form to copy)."""
    if os.path.basename(sys.argv[0] if sys.argv else "").startswith("vutrain-dataset"):
        return "vutrain-dataset"
    return "python -m dataset_tools"


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m dataset_tools``: every subcommand and its options."""
    parser = argparse.ArgumentParser(
        prog=_program_name(),
        description="YouTube metadata -> thumbnails (img2dataset, polite to one host) -> webdataset shards.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_build(sub)
    _add_others(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dataset_tools``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from dataset_tools.metadata import MetadataError

    try:
        return _run(args)
    except (MetadataError, FileNotFoundError) as err:
        # The user's input is at fault: one line naming the file (and line), not a traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C is how a user stops a long build or --verify: it was a 30-line traceback out of
        # the download pool's wait, which read like a crash and never said the build resumes.
        print(_interrupted_line(args.command), file=sys.stderr, flush=True)
        return 130


def _interrupted_line(command: str) -> str:
    if command == "build":
        return (
            "[dataset_tools] build stopped by SIGINT (Ctrl-C); run the same command again to resume "
            "(complete shards are kept)"
        )
    return f"[dataset_tools] {command} stopped by SIGINT (Ctrl-C); run the same command again"


def _run(args) -> int:
    """Dispatch one parsed subcommand; returns the exit code."""
    if args.command == "build":
        from dataset_tools.build import build, exit_code

        return exit_code(build(_build_config(args)))
    if args.command == "inspect":
        from dataset_tools import inspect_shards

        report = inspect_shards.inspect_dir(args.dir, verify=args.verify)
        print(json.dumps(report, indent=2) if args.json else inspect_shards.format_report(report, args.top))
        return 1 if report.get("corrupt") else 0
    if args.command == "finalize":
        from dataset_tools import finalize

        print(json.dumps(finalize.finalize(args.dir), indent=2))
        return 0
    if args.command == "split":
        from dataset_tools import split

        print(
            json.dumps(
                split.split(
                    args.dir,
                    args.output,
                    by=args.by,
                    val_fraction=args.val_fraction,
                    seed=args.seed,
                    shard_size=args.shard_size,
                    cut=args.cut,
                ),
                indent=2,
            )
        )
        return 0
    if args.command == "vocab":
        from dataset_tools import vocab

        result = vocab.build_vocab(args.dir, min_count=args.min_count)
        vocab.save(result, args.output)
        # The samples read and the rows left out, as the JSON has them: the line gave only the
        # vocabulary sizes, so a vocabulary of 40 samples passed for one of the whole folder.
        print(
            f"{len(result['tags'])} tags, {len(result['categories'])} categories from {result['samples']} "
            f"samples ({result['failures']} failed rows left out) -> {args.output}"
        )
        return 0
    if args.command == "dedup":
        from dataset_tools import dedup

        report = dedup.dedup(
            args.dir,
            report_path=args.report,
            max_distance=args.max_distance,
            filter_output=args.filter_output,
            shard_size=args.shard_size,
        )
        print(json.dumps({k: v for k, v in report.items() if k != "groups"}, indent=2))
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
