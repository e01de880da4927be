"""Training throughput benchmark: samples/s, per-step time split and peak memory.

    python -m vutrain.bench                       # CPU: the tiny preset, fp32, ZeRO-2, two batch sizes
    python -m vutrain.bench --preset vit-b-32 --precision bf16 --zero-stage 2 \
        --batch-sizes 64,128,256 --grad-ckpt both # GPU: the ViT-B/32 sweep of BENCHMARKS.md
    python -m vutrain.bench --compare open_clip   # against open_clip's step (vutrain/bench_compare.py)
    python -m vutrain.bench data --shards SPEC    # the data stream alone (vutrain/bench_data.py)

Each configuration runs in its own process (one rank; peak memory is per process) through the
real Trainer on synthetic shards, with the device synchronised around each phase so the split
(data, forward, loss, backward, optimizer) is honest. Rows are printed as a markdown table and
appended to a JSON file; nothing is estimated: a configuration that fails (e.g. out of memory) is
recorded with its error.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from kernels.provenance import commit
from vutrain.bench_report import md_cell, write_json

PHASES = ("data", "forward", "loss", "backward", "optimizer")


def device_name(device=None) -> str:
    """The name of ``device`` (a GPU's, or the CPU's core count and type); by default of the device
    a one-rank run here trains on. It was GPU 0's whenever one was visible: a run on the CPU of
    a GPU machine (VUTRAIN_DEVICE=cpu), or on another GPU, was recorded as made on GPU 0."""
    import torch

    from vutrain.distributed import resolve_device

    if device is None:
        try:
            device = resolve_device(0)[0]  # what the configuration's process resolves
        except RuntimeError:  # a bad VUTRAIN_DEVICE: the configuration's row says so
            device = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    """``CPU (8 of 128 cores usable, x86_64)``: the cores this process may run on (its affinity
    mask: taskset, a cgroup cpuset, a SLURM task's share) beside the machine's. The machine's count
    alone named a 128-core node for a figure measured on the 8 cores a job was given."""
    from vutrain.data.epoch_plan import usable_cores

    machine, usable = os.cpu_count(), usable_cores()
    cores = f"{machine} cores" if usable == machine else f"{usable} of {machine} cores usable"
    return f"CPU ({cores}, {platform.processor() or platform.machine()})"


def build_trainer(spec: dict, sync_timing: bool = True):
    """The real Trainer of one benchmark configuration (one rank, in this process, process group
    initialised), training on `spec['train_shards']`; also used by tools/profile_step.py."""
    from vutrain.config import load_config
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.trainer import Trainer

    cfg = load_config(None, spec_overrides(spec))
    info = resolve_dist_env()
    init_distributed(info)
    trainer = Trainer(cfg, info, sync_timing=sync_timing)
    trainer.engine.train()
    return trainer


def close_trainer(trainer) -> None:
    """End what a Trainer that never trains holds (train() ends it all itself): the data-wait
    watcher thread (it keeps the whole Trainer alive), the loader workers, the TensorBoard writer
    and the run folder's lock. Used by run_one, tools/profile_step.py and the comparison."""
    try:
        trainer.data_wait.close()
        # Left open, the loader worker processes lived on until this process exited, reading and
        # decoding for a Trainer that no longer steps (a sweep in one process ran them side by side).
        trainer.stream.close()
    finally:
        try:
            trainer.metrics.close()
        finally:
            # Nothing else frees run_dir for the next run in this process or another.
            trainer.release_run_dir()


def spec_overrides(spec: dict) -> list[str]:
    """The config overrides that make the Trainer of one benchmark configuration."""
    return [
        f"output_dir={spec['run_dir']}",
        f"data.train_shards={spec['train_shards']}",
        "data.val_shards=",
        "eval.every=0",
        f"model.preset={spec['preset']}",
        f"model.hidden_act={spec.get('hidden_act', '')}",
        f"train.precision={spec['precision']}",
        f"train.zero_stage={spec['zero_stage']}",
        f"train.micro_batch_size={spec['batch_size']}",
        # tools/profile_step.py profiles accumulation (GradCache or plain); the sweep steps one.
        f"train.grad_accum_steps={spec.get('grad_accum_steps', 1)}",
        f"train.accumulation={spec.get('accumulation', 'gradcache')}",
        f"model.gradient_checkpointing={flag_text(spec['grad_ckpt'])}",
        f"train.max_steps={spec['warmup'] + spec['steps']}",
        "train.checkpoint_every=0",
        "train.progress_bar=false",
        "train.resume=never",
        f"data.num_workers={spec['workers']}",
        f"loss.backend={spec['loss_backend']}",
        f"train.compile={flag_text(spec.get('compile', False))}",
        f"train.compile_backend={spec.get('compile_backend', 'inductor')}",
        f"train.compile_mode={spec.get('compile_mode', 'default')}",
        "data.resampled=true",
        "data.num_samples=100000",
    ]


def flag_text(value: bool | str) -> str:
    """A spec's on/off setting as ``true``/``false``: the config's override text and the table's
    cell. A bool, or the text tools/profile_step.py and rows written before 2026-12-07 hold (the
    sweep's grad_ckpt was the text "false", its compile the bool False: the table said both)."""
    if isinstance(value, str):
        return value.strip().lower()
    return str(bool(value)).lower()


PEAK_MEM_KINDS = {
    "peak_memory_gib": "GPU allocated",  # torch.cuda.max_memory_allocated
    "peak_rss_gib": "process RSS",  # the process's peak resident set (ru_maxrss): CPU runs
}
"""What a row's peak memory measures, by the key that holds it: the column's header says it."""


def run_one(spec: dict) -> dict:
    """Train `warmup + steps` steps in this process and measure the last `steps`."""
    import resource

    import torch

    from vutrain.distributed import cleanup

    trainer = build_trainer(spec)
    cuda = trainer.device.type == "cuda"
    rows = []
    try:
        for i in range(spec["warmup"] + spec["steps"]):
            if i == spec["warmup"] and cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            times, _ = trainer.train_step()
            if i >= spec["warmup"]:
                rows.append(times)
        # The wall figure over as many steps again, without the phase split's syncs (four a step
        # on a GPU): timed through those, it was lower than the open_clip comparison's, which
        # syncs once after its last step, and the two were set side by side.
        trainer.sync_timing = False
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(spec["steps"]):
            trainer.train_step()
        if cuda:
            torch.cuda.synchronize()
        wall = (time.perf_counter() - started) / spec["steps"]
    finally:
        try:
            close_trainer(trainer)
        finally:
            cleanup()
    med = {p: statistics.median(getattr(t, p) for t in rows) for p in PHASES}
    step = sum(med.values())
    samples = spec["batch_size"] * spec.get("grad_accum_steps", 1)  # a step's micro-batches
    result = dict(
        spec,
        device=device_name(trainer.device),
        step_time_s=step,
        samples_per_s=samples / step,
        # Steps end to end, one sync after the last: what the comparison with open_clip measures
        # (the phase medians above leave out the gaps between phases and steps).
        wall_step_time_s=wall,
        wall_samples_per_s=samples / wall,
        wall_timing="separate steps, no phase syncs, one sync after the last",
        **{f"{p}_s": v for p, v in med.items()},
    )
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # The two are not alike (the allocator's tensors against the whole process, Python included):
    # said in the row, so a JSON reader need not infer it from which key is there.
    result["peak_mem_kind"] = PEAK_MEM_KINDS["peak_memory_gib" if cuda else "peak_rss_gib"]
    return result


def table(rows: list[dict]) -> str:
    """The benchmark rows as a markdown table (failed configurations say why)."""
    # Which peak the memory column holds: "peak mem GiB" alone read as device memory on a CPU run.
    kinds = [kind for key, kind in PEAK_MEM_KINDS.items() if any(key in r for r in rows)]
    mem_head = "peak mem GiB" + (f" ({' / '.join(kinds)})" if kinds else "")
    lines = [
        "| preset | precision | ZeRO | batch | grad ckpt | compile | samples/s | wall samples/s | step s "
        f"| data | fwd | loss | bwd | opt | {mem_head} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(
                f"| {r['preset']} | {r['precision']} | {r['zero_stage']} | {r['batch_size']} | "
                f"{flag_text(r['grad_ckpt'])} | {flag_text(r.get('compile', False))} | "
                f"failed: {md_cell(r['error'][:60])} ||||||||| "
            )
            continue
        mem = r.get("peak_memory_gib", r.get("peak_rss_gib", float("nan")))
        lines.append(
            f"| {r['preset']} | {r['precision']} | {r['zero_stage']} | {r['batch_size']} | "
            f"{flag_text(r['grad_ckpt'])} | {flag_text(r.get('compile', False))} | "
            f"{r['samples_per_s']:.1f}{exit_note(r)} | {r.get('wall_samples_per_s', float('nan')):.1f} | "
            f"{r['step_time_s']:.3f} | "
            + " | ".join(f"{r[p + '_s']:.3f}" for p in PHASES)
            + f" | {mem:.2f} |"
        )
    return "\n".join(lines)


def exit_note(row: dict) -> str:
    """A measured row whose process then exited non-zero says so beside its figure."""
    if "exit_code" not in row:
        return ""
    return f" (then exit {row['exit_code']}: {md_cell(row['exit_error'][:60])})"


def parse_batch_sizes(text: str) -> list[int]:
    """--batch-sizes "16,32" as positive integers; ValueError naming the bad entry."""
    sizes = []
    for entry in text.split(","):
        try:
            size = int(entry)
        except ValueError:
            raise ValueError(f"--batch-sizes {text}: {entry.strip()!r} is not an integer") from None
        if size < 1:
            raise ValueError(f"--batch-sizes {text}: {size} is not a positive batch size")
        sizes.append(size)
    return sizes


def check_counts(args: argparse.Namespace) -> None:
    """ValueError for counts no configuration can run with, before the shards are written: with
    ``--steps 0`` every configuration's process failed on an empty median and the sweep wrote a
    row of errors per configuration; a negative ``--warmup`` timed warm-up steps."""
    counts = (("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--workers", args.workers, 0))
    for flag, value, minimum in counts:
        if value < minimum:
            raise ValueError(f"{flag} {value}: must be >= {minimum}")
    if args.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"--zero-stage {args.zero_stage}: choose 0, 1, 2 or 3")


def read_previous_rows(path: str) -> list:
    """The rows an earlier run left in ``path`` (kept: each run appends); ValueError when the file
    is not a JSON list, before anything is measured (it was a JSONDecodeError after the data)."""
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as fh:
            rows = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"--out {path} cannot be read as JSON ({exc}): move it aside or pass another --out"
        ) from None
    if not isinstance(rows, list):
        raise ValueError(f"--out {path} holds no list of rows: move it aside or pass another --out")
    return rows


def make_out_folder(path: str) -> None:
    """Create ``path``'s folder, or ValueError saying what to do, before the shards are written: a
    folder that cannot be made (``--out`` under a file, no permission) was a traceback after them."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out {path}: its folder cannot be created ({exc}); pass another --out") from None


def write_rows(path: str, rows: list) -> None:
    """Replace ``path`` by ``rows`` through a temporary file: a run killed while writing (a time
    limit) leaves the previous file whole, where an in-place rewrite left it cut, every earlier
    run's rows with it, and the next run then stopped on its JSON."""
    write_json(rows, path)


_RANK_PREFIX = re.compile(r"^\[rank\d+\]:\s?")


def failure_line(proc: subprocess.CompletedProcess) -> str:
    """What made a configuration's process fail: the last traceback's exception line, else the last
    line of its output. Lines printed after the traceback, such as NCCL's exit warning about a
    process group never destroyed, hid the real error (a CUDA out-of-memory) when the row took the
    last stderr line."""
    # Once the process group exists, torch prints an uncaught exception with every line prefixed
    # "[rank0]: ": the traceback went unrecognised and the row took the exit warning after it.
    lines = [_RANK_PREFIX.sub("", line) for line in (proc.stderr or proc.stdout or "").strip().splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        # Frames and their source lines are indented; the exception line is the first that is not.
        after = lines[starts[-1] + 1 :]
        found = next((line for line in after if line.strip() and not line[0].isspace()), None)
        if found is not None:
            return found
    return lines[-1] if lines else f"exit {proc.returncode}"


def dispatch(argv: list[str]) -> int | None:
    """Run a sibling benchmark when argv names one (`data ...`, `--compare ...`); None otherwise."""
    if argv and argv[0] == "data":
        import importlib

        try:
            bench_data = importlib.import_module("vutrain.bench_data")
        except ModuleNotFoundError as exc:
            if exc.name != "vutrain.bench_data":
                raise
            print("python -m vutrain.bench data: this install has no vutrain/bench_data.py", file=sys.stderr)
            return 2
        return bench_data.main(argv[1:])
    if any(a == "--compare" or a.startswith("--compare=") for a in argv):
        from vutrain import bench_compare

        return bench_compare.main(argv)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vutrain.bench``; returns the process exit code."""
    delegated = dispatch(list(sys.argv[1:] if argv is None else argv))
    if delegated is not None:
        return delegated
    from vutrain.config import BACKENDS, COMPILE_MODES, HIDDEN_ACTS, PRECISIONS

    parser = argparse.ArgumentParser(
        prog="python -m vutrain.bench",
        description=__doc__.split("\n\n")[0],
        # The two sibling benchmarks are dispatched before this parser: name them, or --help hides them.
        epilog=(
            "Also: python -m vutrain.bench --compare open_clip [...] (against open_clip's step) and "
            "python -m vutrain.bench data [...] (the data stream alone); each takes --help."
        ),
    )
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--batch-sizes", default="16,32", help="comma-separated (default 16,32)")
    parser.add_argument("--grad-ckpt", choices=("off", "on", "both"), default="off")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default 2)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers (default 1)")
    parser.add_argument("--loss-backend", choices=BACKENDS, default="torch")
    parser.add_argument("--compile", action="store_true", help="train.compile=true (warm-up compiles)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--compile-mode", choices=COMPILE_MODES, default="default", help="train.compile_mode (inductor)"
    )
    parser.add_argument(
        "--hidden-act",
        choices=("", *HIDDEN_ACTS),
        default="",
        help="model.hidden_act ('': HF's quick_gelu; gelu: open_clip's)",
    )
    parser.add_argument(
        "--out",
        default="bench_results/train_bench.json",
        help="results JSON; earlier rows are kept (default bench_results/train_bench.json)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one JSON spec in this process
    args = parser.parse_args(argv)
    if args.one:
        print("BENCH_RESULT " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0

    from vutrain.model import PRESETS

    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset}: choose one of {', '.join(PRESETS)}")
    try:
        batch_sizes = parse_batch_sizes(args.batch_sizes)
        check_counts(args)
        check_configs(args, batch_sizes)
        previous = read_previous_rows(args.out)
        make_out_folder(args.out)
    except ValueError as exc:
        parser.error(str(exc))
    # The shards and run folders of this run only: left behind, every run added its 2048 images
    # to the temporary directory.
    work = tempfile.mkdtemp(prefix="vutrain-bench-")
    # A time limit (`timeout`, SLURM) ends the sweep with SIGTERM. Its default action killed this
    # process alone: the configuration's process trained on, orphaned, and the shards stayed in
    # the temporary directory. Raised instead, it kills the child (subprocess.run does on any
    # exception) and leaves through the cleanup below; the rows done so far are already in --out.
    previous_handler = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        return run_sweep(args, argv, batch_sizes, previous, work)
    except SweepStopped:
        print(f"stopped by SIGTERM (a time limit): the finished configurations' rows are in {args.out}")
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(work, ignore_errors=True)


class SweepStopped(BaseException):
    """SIGTERM arrived; not an Exception, so nothing on the way out records it as a failure."""


def _raise_stopped(signum, frame):
    raise SweepStopped


def sweep_specs(args: argparse.Namespace, batch_sizes: list[int], train_shards: str, work: str) -> list:
    """The spec of each configuration of the sweep, in the order they run."""
    # Bools, as compile is: the JSON rows held grad_ckpt as the text "false" beside compile's false.
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    return [
        dict(
            preset=args.preset,
            precision=args.precision,
            zero_stage=args.zero_stage,
            batch_size=batch,
            grad_ckpt=ckpt,
            steps=args.steps,
            warmup=args.warmup,
            workers=args.workers,
            loss_backend=args.loss_backend,
            compile=args.compile,
            compile_backend=args.compile_backend,
            compile_mode=args.compile_mode,
            hidden_act=args.hidden_act,
            train_shards=train_shards,
            run_dir=os.path.join(work, f"run-{batch}-{flag_text(ckpt)}"),
        )
        for batch in batch_sizes
        for ckpt in ckpts
    ]


def check_configs(args: argparse.Namespace, batch_sizes: list[int]) -> None:
    """ValueError naming the setting, before the shards are written, for a configuration the
    Trainer's config refuses (``--precision fp17``, an unknown ``--loss-backend``, fp16 without a
    GPU): each configuration's process failed on it, and the sweep exited 1 with a row of the same
    error per configuration. The config's own checks, so the two cannot disagree."""
    from vutrain.config import ConfigError, load_config

    # Placeholders: the config checks neither the shards nor the run folder exist.
    placeholder = os.path.join(tempfile.gettempdir(), "vutrain-bench-check")
    # Its warnings (an LR warm-up longer than the few benchmark steps) do not apply to a benchmark.
    config_log = logging.getLogger("vutrain.config")
    level = config_log.level
    config_log.setLevel(logging.ERROR)
    try:
        for spec in sweep_specs(args, batch_sizes, os.path.join(placeholder, "0.tar"), placeholder):
            load_config(None, spec_overrides(spec))
    except ConfigError as exc:
        raise ValueError(f"the Trainer refuses this sweep: {exc}") from None
    finally:
        config_log.setLevel(level)


def run_sweep(args: argparse.Namespace, argv, batch_sizes: list[int], previous: list, work: str) -> int:
    """Each configuration of the sweep in its own process, its row printed and saved as it ends."""
    from vutrain.data.synthetic import write_synthetic
    from vutrain.model import PRESETS

    size = PRESETS[args.preset].image_size
    data = write_synthetic(
        os.path.join(work, "data"), num_samples=2048, shard_size=256, image_size=size, val_samples=0
    )
    results = []
    # Earlier runs' rows stay in --out: the start time and the commit tell this run's rows apart
    # (the date alone did not, for two runs of a day, nor for two versions of the code).
    run = {
        "run_started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "command": "python -m vutrain.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    specs = sweep_specs(args, batch_sizes, data["train_shards"], work)
    try:
        for spec in specs:
            proc = subprocess.run(
                [sys.executable, "-m", "vutrain.bench", "--one", json.dumps(spec)],
                capture_output=True,
                text=True,
            )
            row = result_row(proc, spec)
            row["date"] = datetime.date.today().isoformat()
            row.update(run)
            results.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            # After every configuration: a run stopped by a time limit keeps what it measured,
            # marked partial until the last configuration has run (a SIGKILL leaves the mark).
            write_rows(args.out, previous + marked(results, partial=True))
    except SweepStopped:
        # Without a mark, the rows of a stopped sweep read as a finished sweep's; only the
        # configurations missing from the file told them apart.
        stopped = f"SIGTERM after {len(results)} of {len(specs)} configurations"
        write_rows(args.out, previous + marked(results, partial=True, stopped_by=stopped))
        print("\n" + table(results) + f"\n\npartial: stopped by {stopped}", flush=True)
        raise
    write_rows(args.out, previous + marked(results, partial=False))
    print("\n" + table(results))
    print(
        f"\nwrote {args.out} ({len(results)} rows of this run, run_started {run['run_started']}; "
        f"{len(previous)} earlier rows kept) on {results[0].get('device', device_name())}"
    )
    return 0 if all("error" not in r and "exit_code" not in r for r in results) else 1


def marked(rows: list[dict], **marks) -> list[dict]:
    """``rows`` with ``marks`` (``partial``, ``stopped_by``) set on each: whether the sweep they
    belong to ran every configuration, as the comparison's JSON says with ``partial``."""
    return [dict(row, **marks) for row in rows]


def result_row(proc: subprocess.CompletedProcess, spec: dict) -> dict:
    """The row of one configuration's process: its measured figure, or its error.

    ``BENCH_RESULT`` is printed only once every timed step has run and the process group is
    destroyed, so a process that printed it and then exited non-zero (a crash at interpreter exit:
    a DeepSpeed atexit hook, NCCL's teardown) measured in full. Its figure is kept, marked with the
    exit code and what failed (``exit_code``, ``exit_error``), and the sweep exits 1: dropping it
    lost a measured configuration and showed a teardown message as if training had failed.
    """
    found = [line for line in proc.stdout.splitlines() if line.startswith("BENCH_RESULT ")]
    if not found:
        return dict(spec, error=failure_line(proc), device=device_name())
    row = json.loads(found[-1][len("BENCH_RESULT ") :])
    if proc.returncode != 0:
        row.update(exit_code=proc.returncode, exit_error=failure_line(proc))
    return row


if __name__ == "__main__":
    sys.exit(main())
