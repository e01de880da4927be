"""``python -m vutrain.bench data``: the training data stream alone, against plain JPEG decoding.

    python -m vutrain.bench data --shards 'DIR/{00000..00007}.tar' --workers 2 --batch-size 64
    python -m vutrain.bench data --write-shards DIR --shard-size-wh 480x360   # thumbnail-like shards

Measures, in one run on the same files:

- ``decode_per_s``: PIL ``Image.open(...).convert("RGB")`` (full decode) of the shards' JPEGs (and
  any PNG or WebP they hold: ``decode_formats`` counts them) on one core, taken evenly from every
  shard, each time in a freshly forked process (see :func:`fresh_decode_rate`) after one untimed
  pass, measured before and after the stream runs of each round (their mean is that round's
  floor). It is the floor of the design: a worker cannot do less than decode each image.
- ``--rounds R`` (default 3) interleaved rounds; every ratio is taken within its round and the
  median round is reported (the rates of a shared machine drift by tens of percent; ratios less).
- ``samples_per_s``: batches of the real ``TrainStream`` (shuffle buffer, captions, the BPE
  tokenizer the presets train, collation, worker queues) with ``--workers`` loader processes,
  timed in steady state (after every worker's first batches, from a moment the queue was empty).
  ``samples_per_s_per_worker`` divides it by the workers; ``ratio`` = per worker / decode.
- with ``--workers N > 1`` also the 1-worker rate, and ``scaling`` = rate(N) / (N * rate(1)).
- the same per CPU second (``cpu_ratio``: samples per worker-CPU-second / decodes per
  CPU-second), which is what the wall-clock ratio is on idle, dedicated cores and stays
  meaningful on a shared, oversubscribed machine.
- with ``--compare`` also the processor-exact float path (PIL resize and normalisation in the
  worker, fp32 batches), the pipeline before the uint8 fast path.

Prints a table and, as its last line, one JSON object with all figures.
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import math
import os
import platform
import pstats
import shlex
import shutil
import sys
import tarfile
import tempfile
import time
from collections import Counter

import numpy as np

from kernels.provenance import commit


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_images(spec: str, limit: int) -> tuple[list[bytes], Counter]:
    """About ``limit`` image members (encoded bytes) that PIL fully decodes, spread evenly over the
    shards, and the count of each image extension read (``undecodable`` for those left out).

    Spread: the stream draws its samples from every shard alike, so a floor over the first shards
    only (one source of an ``A::B`` spec) would time other images than the stream reads. Damaged
    images are left out and counted: the stream skips them too, and one stopped the floor's
    process (a traceback).
    """
    from PIL import Image

    from vutrain.data.samples import IMAGE_EXTS, iter_raw_samples
    from vutrain.data.shards import ShardListError, expand_shards

    try:
        urls = expand_shards(spec, "--shards")
    except ShardListError as e:
        raise SystemExit(str(e)) from None
    if len(urls) > limit:  # more shards than images: every len/limit-th shard
        urls = [urls[i * len(urls) // limit] for i in range(limit)]
    quota = math.ceil(limit / len(urls))
    images: list[bytes] = []
    formats: Counter = Counter()
    for url in urls:
        taken = 0
        for raw in iter_raw_samples(url):
            ext = next((e for e in IMAGE_EXTS if e in raw), None)
            if ext is None:
                continue
            try:
                with Image.open(io.BytesIO(raw[ext])) as img:
                    img.convert("RGB")
            except Exception:  # PIL raises many types (OSError, SyntaxError, ...)
                formats["undecodable"] += 1
                continue
            images.append(raw[ext])
            formats[ext] += 1
            taken += 1
            if taken >= quota or len(images) >= limit:
                break
        if len(images) >= limit:
            break
    if not images:
        raise SystemExit(f"--shards {spec}: no decodable images found ({dict(formats) or 'none'})")
    return images, formats


def decode_rate(images: list[bytes], min_seconds: float = 2.0) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of a full PIL decode to RGB on one core.

    One untimed pass first: the stream's figure leaves out its start-up, and a fresh process's
    first pass over the images was 30% slower per image than the later ones.
    """
    from PIL import Image

    def decode_all() -> None:
        for data in images:
            with Image.open(io.BytesIO(data)) as img:
                img.convert("RGB")

    decode_all()
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        decode_all()
        done += len(images)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed, done / max(time.process_time() - cpu, 1e-9)


def _decode_in_child(images: list[bytes], min_seconds: float, conn) -> None:
    conn.send(decode_rate(images, min_seconds))
    conn.close()


def fresh_decode_rate(images: list[bytes], min_seconds: float = 2.0) -> tuple[float, float]:
    """:func:`decode_rate` in a freshly forked process.

    Why: on the 2-core development VM, PIL's decode rate of the same JPEGs is multimodal by
    process (2000 or 1300-1450 images/s for 480x360, 3600, 2550 or 2280 for 341x256) and can
    change within a process after a stream run, while simplejpeg and the stream's workers (fresh
    processes every run) are stable. A floor measured in one long-lived process is one draw of
    that lottery for the whole run; a fresh process per measurement samples it every round.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # inherits the images; the stream is closed here
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_decode_in_child, args=(images, min_seconds, sender), daemon=True)
    child.start()
    sender.close()
    try:
        return receiver.recv()
    finally:
        child.join()


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's live children (the loader workers)."""
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # a child that just exited
            pass
    return total


def make_tokenize(spec: str, context_length: int, work: str):
    """The presets' tokenizer: a BPE trained on the shards' captions (as the trainer does)."""
    from vutrain.data.tokenizer import iter_shard_texts, train_bpe_tokenizer
    from vutrain.data.tokenizer import make_tokenize as make

    tok = train_bpe_tokenizer(
        iter_shard_texts(spec, "{title}", limit=5000), os.path.join(work, "tok"), 4096, context_length
    )
    return make(tok, context_length)


def build_stream(args, tokenize, workers: int, path: str):
    """The training stream over ``args.shards`` with the ``fast`` or the PIL preprocessing path."""
    from vutrain.data.preprocess import make_fast_preprocess, make_preprocess
    from vutrain.data.webdataset import TrainStream

    processor = {
        "size": {"shortest_edge": args.image_size},
        "crop_size": {"height": args.image_size, "width": args.image_size},
    }
    preprocess = make_fast_preprocess(processor) if path == "fast" else make_preprocess(processor)
    return TrainStream(
        args.shards,
        preprocess=preprocess,
        tokenize=tokenize,
        batch_size=args.batch_size,
        rank=0,
        world_size=1,
        num_workers=workers,
        seed=0,
        caption_template="{title}",
        shuffle_buffer=args.shuffle_buffer,
        resampled=True,
        num_samples=10**9,
        prefetch_factor=args.prefetch_factor,
        pin_memory=False,
    )


_MIN_CPU_S = 0.05
"""Workers' CPU seconds below which a run's per-CPU-second figures are not reported."""


def stream_rate(args, tokenize, workers: int, path: str) -> dict:
    """Steady-state samples/s of the stream with ``workers`` loader processes."""
    stream = build_stream(args, tokenize, workers, path)
    batches = args.batches or max(8, math.ceil(args.samples_per_worker * max(1, workers) / args.batch_size))
    try:
        start = time.perf_counter()
        for _ in range((args.prefetch_factor + 1) * max(1, workers)):  # start-up and buffer fill
            next(stream)
        warmup = time.perf_counter() - start
        for _ in range(4 * max(1, workers)):  # drain what was prefetched: start the clock on a wait
            t = time.perf_counter()
            batch = next(stream)
            if time.perf_counter() - t > 0.005:
                break
        start, cpu = time.perf_counter(), _children_cpu_seconds()
        for _ in range(batches):
            batch = next(stream)
        elapsed, cpu = time.perf_counter() - start, _children_cpu_seconds() - cpu
        skipped = stream.skipped()
    finally:
        stream.close()
    pixels = batch["pixel_values"]
    rate = batches * args.batch_size / elapsed
    return {
        "path": path,
        "workers": workers,
        "samples_per_s": rate,
        "samples_per_s_per_worker": rate / max(1, workers),
        # None when the workers' CPU time is too short to read (psutil's clock ticks are 10 ms)
        "samples_per_worker_cpu_s": batches * args.batch_size / cpu if cpu >= _MIN_CPU_S else None,
        "measured_samples": batches * args.batch_size,
        "seconds": elapsed,
        "warmup_s": warmup,
        "pixel_dtype": str(pixels.dtype).replace("torch.", ""),
        "batch_mib": pixels.numel() * pixels.element_size() / 2**20,
        "skipped": skipped,  # samples the stream left out, by reason (damaged images among them)
    }


def profile_worker(args, tokenize, path: str, batches: int = 6) -> str:
    """cProfile of the stream run in this process (num_workers=0): where a worker's time goes."""
    stream = build_stream(args, tokenize, 0, path)
    next(stream)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(batches):
        next(stream)
    profiler.disable()
    stream.close()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
    return out.getvalue()


def photo_like(rng: np.random.Generator, width: int, height: int):
    """A thumbnail-like RGB image: smooth colour field, a few solid shapes, mild sensor noise."""
    from PIL import Image, ImageDraw

    field = rng.integers(0, 256, size=(4, 6, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 3, size=(height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_thumbnail_shards(
    out: str,
    num_samples: int,
    width: int,
    height: int,
    shard_size: int = 256,
    quality: int = 85,
    seed: int = 0,
) -> str:
    """Shards of ``width`` x ``height`` thumbnail-like JPEGs (img2dataset layout, sizes.json).

    Returns the brace spec of the tars.
    """
    os.makedirs(out, exist_ok=True)
    sizes = {}
    for shard in range(math.ceil(num_samples / shard_size)):
        name = f"{shard:05d}.tar"
        keys = range(shard * shard_size, min(num_samples, (shard + 1) * shard_size))
        with tarfile.open(os.path.join(out, name), "w") as tar:
            for key in keys:
                rng = np.random.default_rng([seed, key])
                buf = io.BytesIO()
                photo_like(rng, width, height).save(buf, "JPEG", quality=quality)
                title = f"thumbnail {key}: a video about {int(rng.integers(1000))} things"
                meta = {
                    "key": f"{key:09d}",
                    "title": title,
                    "tags": ["bench"],
                    "width": width,
                    "height": height,
                    "category_name": "bench",
                }
                for ext, payload in (
                    ("jpg", buf.getvalue()),
                    ("json", json.dumps(meta).encode()),
                    ("txt", title.encode()),
                ):
                    info = tarfile.TarInfo(f"{key:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        sizes[name] = len(keys)
    with open(os.path.join(out, "sizes.json"), "w", encoding="utf-8") as fh:
        json.dump(sizes, fh)
    last = len(sizes) - 1
    return os.path.join(out, "00000.tar" if last == 0 else f"{{00000..{last:05d}}}.tar")


def median_row(rows: list[dict]) -> dict:
    """The round whose ``ratio`` is the median (the lower middle one for an even count)."""
    ordered = sorted(rows, key=lambda r: r["ratio"])
    return dict(ordered[(len(ordered) - 1) // 2], rounds=len(rows))


def table(rows: list[dict]) -> str:
    """The data benchmark rows as a markdown table."""
    lines = [
        "| path | workers | pixels | samples/s | per worker | decode/s (1 core) | per worker / decode "
        "| per worker-CPU-s / decode-CPU-s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['workers']} | {r['pixel_dtype']} | {r['samples_per_s']:.0f} | "
            f"{r['samples_per_s_per_worker']:.0f} | {r['decode_per_s']:.0f} | {r['ratio']:.2f} | "
            f"{'n/a' if r['cpu_ratio'] is None else format(r['cpu_ratio'], '.2f')} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of ``python -m vutrain.bench data``."""
    parser = argparse.ArgumentParser(
        prog="python -m vutrain.bench data", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", help="brace-expandable shard spec ('::' joins several)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="model input size S")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--prefetch-factor", type=int, default=2)
    parser.add_argument("--batches", type=int, default=0, help="timed batches (0: --samples-per-worker)")
    parser.add_argument("--samples-per-worker", type=int, default=1024)
    parser.add_argument("--decode-images", type=int, default=256, help="JPEGs timed for decode_per_s")
    parser.add_argument("--decode-seconds", type=float, default=2.0, help="time each decode measurement")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved decode/stream rounds (the median is reported)"
    )
    parser.add_argument("--compare", action="store_true", help="also time the processor-exact float path")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the worker loop")
    parser.add_argument("--write-shards", metavar="DIR", help="first write thumbnail-like shards to DIR")
    parser.add_argument("--shard-size-wh", default="480x360", help="their image size, WxH")
    parser.add_argument("--shard-samples", type=int, default=2048)
    args = parser.parse_args(argv)
    if not args.shards and not args.write_shards:
        parser.error("give --shards SPEC (or --write-shards DIR)")
    refuse_counts_it_cannot_use(parser, args)
    try:  # checked here: it was a ValueError traceback after the argument parsing
        args.shard_wh = tuple(int(v) for v in args.shard_size_wh.lower().split("x"))
    except ValueError:
        args.shard_wh = ()
    if len(args.shard_wh) != 2 or min(args.shard_wh) < 1:
        parser.error(f"--shard-size-wh {args.shard_size_wh}: give WIDTHxHEIGHT, e.g. 480x360")
    return args


_LEAST = {
    "workers": 1, "batch_size": 1, "rounds": 1, "decode_images": 1, "shard_samples": 1,
    "samples_per_worker": 1, "prefetch_factor": 1, "image_size": 1, "context_length": 1,
    "batches": 0, "shuffle_buffer": 0, "decode_seconds": 0,
}  # fmt: skip
"""The least value each numeric option can mean: below it a run reported negative samples/s
(--batches -1) or ended in a ValueError traceback from the stream (--prefetch-factor 0,
--image-size 0) after the shards were written and read."""


def refuse_counts_it_cannot_use(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One usage line (exit 2) for the first numeric option below its least value."""
    for name, least in _LEAST.items():
        value = getattr(args, name)
        if not (value >= least and math.isfinite(value)):  # nan or inf: the decode floor never ended
            parser.error(f"--{name.replace('_', '-')} must be >= {least} and finite, got {value}")


def main(argv: list[str] | None = None) -> int:
    """Run the measurement; the last printed line is the JSON summary."""
    from vutrain.data.tokenizer import TokenizerTextError

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(1)  # the decode floor is one core, and so is each worker
    if args.write_shards:
        w, h = args.shard_wh
        args.shards = write_thumbnail_shards(args.write_shards, args.shard_samples, w, h)
        print(f"wrote {args.shard_samples} {w}x{h} JPEGs: {args.shards}", flush=True)
    images, formats = read_images(args.shards, args.decode_images)
    if formats["undecodable"]:
        print(f"decode floor: {formats['undecodable']} undecodable images left out", flush=True)
    # The tokenizer's folder: removed at the end (every run left a vutrain-bench-data-* folder).
    work = tempfile.mkdtemp(prefix="vutrain-bench-data-")
    try:
        summary = measure_all(
            args, argv, images, make_tokenize(args.shards, args.context_length, work), formats
        )
    except TokenizerTextError as e:  # shards without captions: one line, not a traceback
        raise SystemExit(f"--shards {args.shards}: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary), flush=True)
    return 0


def measure_all(args, argv: list[str], images: list[bytes], tokenize, formats: Counter | None = None) -> dict:
    """Every round of the decode floor and the stream runs; prints the table, returns the summary.

    ``formats``: :func:`read_images`' count of the floor's images by extension (and undecodable).
    """
    from PIL import Image

    from vutrain.data.epoch_plan import usable_cores

    shapes = Counter(Image.open(io.BytesIO(d)).size for d in images)
    if args.profile:
        print(profile_worker(args, tokenize, "fast"), flush=True)
    runs = [("fast", args.workers)]
    if args.workers > 1:
        runs.append(("fast", 1))
    if args.compare:
        runs.append(("processor", args.workers))
    # Rounds interleave the decode floor and every stream run, and each run's ratios are taken
    # against the decode rates of its own round (the mean of the measurements either side): on a
    # shared machine both rates drift by tens of percent within a minute, their ratio much less.
    # The median round is reported; every round is in the JSON.
    decodes = [fresh_decode_rate(images, args.decode_seconds)]
    rounds: list[list[dict]] = []
    for _ in range(args.rounds):
        measured = [stream_rate(args, tokenize, workers, path) for path, workers in runs]
        decodes.append(fresh_decode_rate(images, args.decode_seconds))
        (wall0, cpu0), (wall1, cpu1) = decodes[-2], decodes[-1]
        for row in measured:
            row["decode_per_s"], decode_cpu = (wall0 + wall1) / 2, (cpu0 + cpu1) / 2
            row["decode_per_cpu_s"] = decode_cpu
            row["ratio"] = row["samples_per_s_per_worker"] / row["decode_per_s"]
            per_cpu_s = row["samples_per_worker_cpu_s"]
            row["cpu_ratio"] = per_cpu_s / decode_cpu if per_cpu_s is not None else None
        rounds.append(measured)
    rows = [median_row([r[i] for r in rounds]) for i in range(len(runs))]
    decode, decode_cpu = rows[0]["decode_per_s"], rows[0]["decode_per_cpu_s"]
    print(table(rows), flush=True)
    main_row = rows[0]
    summary = {
        "samples_per_s": main_row["samples_per_s"],
        "samples_per_s_per_worker": main_row["samples_per_s_per_worker"],
        "decode_per_s": decode,
        "ratio": main_row["ratio"],
        # CPU-time figures: what the wall-clock ones would be on idle, dedicated cores
        "decode_per_cpu_s": decode_cpu,
        "samples_per_worker_cpu_s": main_row["samples_per_worker_cpu_s"],
        "cpu_ratio": main_row["cpu_ratio"],
        "rounds": args.rounds,
        "decode_per_s_each": [wall for wall, _ in decodes],
        # the conservative figure: against the fastest decode floor seen in any process
        "ratio_vs_fastest_decode": main_row["samples_per_s_per_worker"] / max(w for w, _ in decodes),
        "ratio_each_round": [r[0]["ratio"] for r in rounds],
        "cpu_ratio_each_round": [r[0]["cpu_ratio"] for r in rounds],
        "workers": args.workers,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "source_sizes": {f"{w}x{h}": n for (w, h), n in shapes.most_common(3)},
        # the floor's images by extension ("undecodable": left out of it), and what the stream
        # skipped (summed over its runs, start-up included): damaged samples are counted, not a crash
        "decode_formats": dict(formats or {"images": len(images)}),
        "decode_images": len(images),
        "stream_skipped": dict(sum((Counter(r["skipped"]) for rs in rounds for r in rs), Counter())),
        "runs": rows,
        "cores": os.cpu_count(),
        # the cores this run could use (its affinity mask: taskset, a SLURM task's share); "cores"
        # alone, the machine's count, described a 128-core node for a run pinned to 8 of them
        "cores_usable": usable_cores(),
        "cpu": _cpu_name(),
        "load_avg_1m": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        # quoted as a shell reads it: joined bare, the documented --shards 'DIR/{00000..00007}.tar'
        # was recorded unquoted, and pasted back the shell expanded it into 8 arguments (a usage error)
        "command": shlex.join(["python", "-m", "vutrain.bench", "data", *argv]),
        "commit": commit(),
    }
    if args.workers > 1:  # runs[1] is ("fast", 1): scaling within each round, then the median
        summary["samples_per_s_1_worker"] = rows[1]["samples_per_s"]
        each = [r[0]["samples_per_s"] / (args.workers * r[1]["samples_per_s"]) for r in rounds]
        summary["scaling"], summary["scaling_each_round"] = float(np.median(each)), each
    print(
        f"per worker / decode: {summary['ratio']:.2f} (median round); "
        f"against the fastest decode floor measured: {summary['ratio_vs_fastest_decode']:.2f}",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    sys.exit(main())
