"""vutrain's Trainer step against open_clip's training step, side by side in one process.

    python -m vutrain.bench --compare open_clip                      # GPU: ViT-B/32, bf16, 256 and 1024
    python -m vutrain.bench --compare open_clip --preset tiny --batch-sizes 8,16 \
        --precision fp32 --max-batch 32                              # CPU: the tiny preset

One process, one device, one process group (initialised once), the same pre-decoded batches:
a pool of samples is read once through vutrain's real training stream (decode, preprocess,
tokenize) from synthetic shards, and every configuration trains on batches built from that pool
(repeated to the batch size), each side taking the images in the form its own loader gives them
(vutrain: what its stream yields; open_clip: normalised fp32, as its dataloader hands them).
The configurations run one after another, each alone on the device (its memory freed before the
next is built), so a peak-memory figure is that configuration's own:

* open_clip (`vutrain.bench_openclip`): its `CLIP`, AdamW, `ClipLoss`, amp bf16; also with its
  gradient checkpointing when vutrain's is compared;
* vutrain's `Trainer.train_step` for each ZeRO stage x loss backend x gradient checkpointing.

Phase 1 times every configuration at every batch size (warm-up steps, then `--steps` steps between
two device synchronisations). Phase 2 finds the largest batch each configuration trains (doubling
from the largest batch phase 1 ran, then bisecting, catching out-of-memory errors and rebuilding
the configuration after one). On a CPU there is no device memory to run out of: the search runs
only up to `--max-batch` when that is given. Everything is printed and written to a JSON file and
a PNG; on a GPU the issue's targets are printed as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from vutrain.bench_openclip import load_open_clip, openclip_activation
from vutrain.bench_report import (
    BASELINE_LABEL,
    TABLE_HEAD,
    add_ratios,
    format_row,
    judge_targets,
    report,
    write_json,
)
from vutrain.bench_search import error_line, largest_batch


@dataclass(frozen=True)
class Variant:
    """One configuration: open_clip's step, or vutrain's Trainer at a ZeRO stage and loss backend."""

    side: str
    grad_ckpt: bool
    zero_stage: int | None = None
    loss_backend: str | None = None
    compiled: bool = False  # torch.compile: vutrain's train.compile, open_clip's --torchcompile

    @property
    def label(self) -> str:
        """Short name of the configuration, as in the report and ``--search``."""
        name = "open_clip" if self.side == "open_clip" else f"vutrain z{self.zero_stage} {self.loss_backend}"
        return name + (" ckpt" if self.grad_ckpt else "") + (" compile" if self.compiled else "")


BASELINE = Variant("open_clip", grad_ckpt=False)
assert BASELINE.label == BASELINE_LABEL


def is_oom(exc: BaseException) -> bool:
    """An allocation failure on the device (torch's own, or cuBLAS failing to get its workspace)."""
    oom_type = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch < 2.5: cuda's only
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower() or "ALLOC_FAILED" in str(exc)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect garbage and, on CUDA, release cached blocks between configurations."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class FixedBatch:
    """Stands in for `Trainer.stream`: each `next()` returns the batch the benchmark set last.

    The Trainer's own stream produced the pool these batches come from; replacing it keeps data
    loading out of the timed step on both sides (open_clip's step below is timed the same way).
    """

    epoch = 0

    def __init__(self) -> None:
        self.batch: dict[str, torch.Tensor] | None = None
        self.batches_seen = 0  # the device transform's augmentation seed reads the stream position

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        self.batches_seen += 1
        return self.batch

    def skipped(self) -> dict:
        """No skipped samples: the benchmark's batches are never filtered."""
        return {}


class TrainerStep:
    """vutrain's real `Trainer` (DeepSpeed engine, loss, step) fed with the benchmark's batches."""

    def __init__(self, variant: Variant, args: argparse.Namespace, info, run_dir: str, shards: str):
        from vutrain.config import load_config
        from vutrain.trainer import Trainer

        overrides = [
            f"output_dir={run_dir}",
            f"data.train_shards={shards}",
            "data.val_shards=",
            "eval.every=0",
            f"model.preset={args.preset}",
            f"model.hidden_act={args.hidden_act}",
            f"train.precision={args.precision}",
            f"train.zero_stage={variant.zero_stage}",
            f"train.micro_batch_size={args.pool_batch}",
            f"model.gradient_checkpointing={str(variant.grad_ckpt).lower()}",
            "train.max_steps=100000",
            "train.checkpoint_every=0",
            "train.progress_bar=false",
            # auto, not never: the run folder is this comparison's own and never gets a checkpoint
            # (checkpoint_every=0), so every configuration after the first loads the first's
            # tokenizer, the one the pool was tokenized with. With never, each trained it again and
            # moved the previous one aside ("moved the previous run's tokenizer aside").
            "train.resume=auto",
            "data.num_workers=0",
            f"loss.backend={variant.loss_backend}",
            f"train.compile={str(variant.compiled).lower()}",
            f"train.compile_backend={args.compile_backend}",
            f"train.compile_scope={args.compile_scope}",
            f"train.compile_mode={args.compile_mode}",
            "data.resampled=true",
            "data.num_samples=100000",
        ]
        self.trainer = Trainer(load_config(None, overrides), info)
        self.trainer.engine.train()
        self.stream = self.trainer.stream
        self.feed = FixedBatch()
        self.trainer.stream = self.feed

    def step(self, batch: dict[str, torch.Tensor]) -> None:
        """One real Trainer step on ``batch``."""
        self.feed.batch = batch
        self.trainer.train_step()

    def close(self) -> None:
        """Free the DeepSpeed engine and the Trainer so the next configuration gets the memory, and
        its run directory's lock (a Trainer that never trains held it until this process exited)."""
        from vutrain.bench import close_trainer

        # train() never runs, which ends the data-wait watcher thread: left running, it held the
        # Trainer, so every configuration's engine (its memory) stayed until this process exited.
        # The real stream back first: the batch feed has nothing to close.
        self.trainer.stream = self.stream
        close_trainer(self.trainer)
        engine = self.trainer.engine
        try:
            engine.zero_grad()
            if hasattr(engine, "destroy"):  # removes DeepSpeed's hooks, which keep buffers alive
                engine.destroy()
        except Exception as exc:
            print(f"warning: freeing the DeepSpeed engine: {type(exc).__name__}: {exc}", flush=True)
        del self.trainer, self.feed, self.stream


# ---------------------------------------------------------------------------------- inputs


def read_pool(stream, size: int) -> dict[str, torch.Tensor]:
    """`size` samples read through vutrain's real training stream (decoded, preprocessed, tokenized)."""
    parts: list[dict[str, torch.Tensor]] = []
    while sum(len(p["input_ids"]) for p in parts) < size:
        parts.append(next(stream))
    keys = ("pixel_values", "input_ids", "attention_mask")
    return {k: torch.cat([p[k] for p in parts])[:size] for k in keys}


def openclip_pixels(pixels: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Images as open_clip's dataloader hands them: normalised fp32 (from uint8 if the stream gives that)."""
    if pixels.dtype == torch.uint8:
        m = torch.tensor(mean).view(1, 3, 1, 1)
        s = torch.tensor(std).view(1, 3, 1, 1)
        return (pixels.float() / 255 - m) / s
    return pixels.float()


class Batches:
    """Batches of any size built from one pool of pre-decoded samples, in each side's form."""

    def __init__(self, pool: dict[str, torch.Tensor], mean: list[float], std: list[float]):
        self.pool = pool
        self.openclip_pool = dict(pool, pixel_values=openclip_pixels(pool["pixel_values"], mean, std))

    def get(self, side: str, size: int, pin: bool = False) -> dict[str, torch.Tensor]:
        """A batch of ``size`` samples from the pool, in ``side``'s form (repeated when larger).

        ``pin``: in page-locked memory, as both sides' loaders hand batches to a GPU step. From
        pageable memory each copy waits for the device queue and runs at a fraction of the bus
        rate, which costs open_clip's fp32 pixels (4x the bytes of vutrain's uint8) the most.
        """
        source = self.openclip_pool if side == "open_clip" else self.pool
        index = torch.arange(size) % len(source["input_ids"])
        return {k: v[index].pin_memory() if pin else v[index] for k, v in source.items()}


# ---------------------------------------------------------------------------------- measuring


def median_rows(measured: list[dict]) -> list[dict]:
    """One row per (configuration, batch) from several rounds: the median samples/s, the largest peak.

    A configuration failing in any round keeps that round's error row instead. The step time is
    the one the median samples/s implies: with an even number of rounds the median is the mean of
    the middle two, and a median taken of the step times apart (a mean of their reciprocals) gave
    a row whose step time and samples/s disagreed (rounds of 10 and 30 samples/s at batch 8: 20
    samples/s beside 0.53 s a step, which is 15).
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in measured:
        groups.setdefault((row["variant"], row["batch_size"]), []).append(row)
    out = []
    for runs in groups.values():
        failed = [r for r in runs if "error" in r]
        if failed:
            out.append(dict(failed[0], rounds=len(runs)))
            continue
        speeds = [r["samples_per_s"] for r in runs]
        speed = statistics.median(speeds)
        row = dict(
            runs[0],
            samples_per_s=speed,
            rounds=len(runs),
            samples_per_s_rounds=speeds,
            step_time_s=runs[0]["batch_size"] / speed,
            step_time_s_rounds=[r["step_time_s"] for r in runs],
        )
        peaks = [r["peak_memory_gib"] for r in runs if r["peak_memory_gib"] is not None]
        row["peak_memory_gib"] = max(peaks) if peaks else None
        out.append(row)
    return out


def measure(
    runner,
    batch: dict[str, torch.Tensor],
    warmup: int,
    steps: int,
    device: torch.device,
    count_reads: bool = True,
) -> dict:
    """samples/s over `steps` steps after `warmup`, the peak device memory of those steps and,
    with `count_reads`, the host reads of one more step (`count_host_reads`)."""
    size = len(batch["input_ids"])
    for _ in range(warmup):
        runner.step(batch)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        runner.step(batch)
    synchronize(device)
    elapsed = time.perf_counter() - start
    row = {"samples_per_s": size * steps / elapsed, "step_time_s": elapsed / steps, "peak_memory_gib": None}
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if count_reads:
        row.update(count_host_reads(runner, batch, device))
    return row


def count_host_reads(runner, batch: dict[str, torch.Tensor], device: torch.device) -> dict:
    """Host reads of one more step, untimed (the counting mode slows every op): on CUDA the reads
    of device values (each a GPU sync), on CPU every read (host scalars, not syncs)."""
    from vutrain.host_reads import HostReads

    with HostReads("cuda" if device.type == "cuda" else None) as reads:
        runner.step(batch)
    synchronize(device)
    return {"host_reads_per_step": reads.total, "host_read_sites": dict(reads.sites.most_common(6))}


class Bench:
    """Builds each configuration on demand and runs phase 1 (speed) and phase 2 (largest batch)."""

    def __init__(self, args: argparse.Namespace, info, run_dir: str, shards: str):
        self.args, self.info, self.run_dir, self.shards = args, info, run_dir, shards
        self.device = torch.device(info.device)
        self.batches: Batches | None = None
        self.openclip_cfg: dict | None = None
        self.stopped_search: dict | None = None  # the search a SIGTERM ended, with what it proved
        self.openclip = load_open_clip()  # first: a missing open_clip fails before any model is built
        # Both sides train the same MLP: vutrain's preset takes open_clip's activation.
        args.hidden_act = openclip_activation(args.preset, self.openclip)

    def build(self, variant: Variant):
        """The step runner of ``variant``: a vutrain TrainerStep or an open_clip OpenClipStep."""
        if variant.compiled:
            # Dynamo remembers per code object which dimensions changed (nn.Module.compile
            # compiles the same `_call_impl` for every model): without a reset, a configuration
            # compiled after another, or at a second batch size, gets dynamic-shape graphs.
            torch._dynamo.reset()
        if variant.side == "vutrain":
            runner = TrainerStep(variant, self.args, self.info, self.run_dir, self.shards)
            if self.batches is None:  # the first Trainer's own stream reads the pool
                self._prepare_inputs(runner)
            return runner
        from vutrain.bench_openclip import OpenClipStep

        if self.batches is None:
            self._read_inputs_alone()
        return OpenClipStep(
            self.openclip,
            self.openclip_cfg,
            self.device,
            self.precision(variant),
            grad_checkpointing=variant.grad_ckpt,
            compile_backend=self.args.compile_backend if variant.compiled else None,
            compile_mode=self.args.compile_mode,
        )

    def precision(self, variant: Variant) -> str:
        """The precision ``variant`` trains in. open_clip's recipe is amp_bf16 (fp32 weights,
        bf16 autocast) whenever vutrain's is bf16 or amp_bf16; vutrain's ``bf16`` keeps bf16
        weights with fp32 master copies in the optimizer. Recorded per row, so a ratio never
        hides that the two sides may differ."""
        if variant.side == "vutrain":
            return self.args.precision
        return "fp32" if self.args.precision == "fp32" else "amp_bf16"

    def _read_inputs_alone(self) -> None:
        """The pool through a Trainer of the plainest configuration (ZeRO 0, torch loss), built only
        to read it. The first vutrain configuration reads it as it builds; when that one failed
        (a backend this device lacks), open_clip, the baseline of every
        ratio, failed with "argument after ** must be a mapping, not NoneType"."""
        reader = Variant("vutrain", grad_ckpt=False, zero_stage=0, loss_backend="torch")
        try:
            runner = TrainerStep(reader, self.args, self.info, self.run_dir, self.shards)
        except Exception as exc:
            raise RuntimeError(
                f"no batches to train on: vutrain's Trainer, whose stream reads them, failed to build "
                f"({error_line(exc)})"
            ) from exc
        try:
            self._prepare_inputs(runner)
        finally:
            self.close(runner)

    def _prepare_inputs(self, runner: TrainerStep) -> None:
        from vutrain.bench_openclip import model_config
        from vutrain.model import OPENAI_MEAN, OPENAI_STD

        trainer = runner.trainer
        pool = read_pool(runner.stream, self.args.pool)
        processor = getattr(trainer, "processor", None)  # its mean/std normalise uint8 pixels for open_clip
        self.batches = Batches(
            pool,
            list(getattr(processor, "image_mean", OPENAI_MEAN)),
            list(getattr(processor, "image_std", OPENAI_STD)),
        )
        image_size = pool["pixel_values"].shape[-1]
        self.openclip_cfg = model_config(
            self.args.preset, image_size, len(trainer.tokenizer), trainer.context_length, self.openclip
        )

    def close(self, runner) -> float | None:
        """Free a configuration; returns the device memory still allocated afterwards (GiB) on CUDA."""
        runner.close()
        free_memory(self.device)
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device) / 2**30
        return None

    def speed(self, variant: Variant, measured: list[dict]) -> list[dict]:
        """Phase 1: one row per batch size; an out-of-memory batch is recorded, not fatal.

        Any other failure (e.g. a backend that does not build on this device) is recorded in the
        configuration's rows with its message, and the comparison goes on with the others. Each
        row is also appended to ``measured`` as soon as it is measured: a SIGTERM at the next
        batch size keeps it.
        """
        rows, runner = [], None
        for size in self.args.batch_sizes:
            row = {
                "variant": variant.label,
                "side": variant.side,
                "zero_stage": variant.zero_stage,
                "loss_backend": variant.loss_backend,
                "grad_ckpt": variant.grad_ckpt,
                "compiled": variant.compiled,
                "precision": self.precision(variant),
                "batch_size": size,
            }
            try:
                if runner is None:
                    runner = self.build(variant)
                row.update(
                    measure(
                        runner,
                        self.batches.get(variant.side, size, pin=self.device.type == "cuda"),
                        self.args.warmup,
                        self.args.steps,
                        self.device,
                        # the same at every batch size: counted once (a counted step is slow)
                        count_reads=not any("host_reads_per_step" in r for r in rows),
                    )
                )
            except Exception as exc:
                row["error"] = error_line(exc, "out of memory" if is_oom(exc) else None)
                row["oom"] = is_oom(exc)
            # Rebuilt: a failed step leaves half-written buffers; a compiled configuration compiles
            # each batch size afresh, static, as a run at that one batch size would.
            if ("error" in row or variant.compiled) and runner is not None:
                self.close(runner)
                runner = None
            rows.append(row)
            measured.append(row)
            print(format_row(row), flush=True)
        leftover = self.close(runner) if runner is not None else None
        if leftover is not None and leftover > 0.1:
            print(f"warning: {leftover:.2f} GiB still allocated after freeing {variant.label}", flush=True)
        return rows

    def search(self, variant: Variant, known_fit: int, stop) -> dict:
        """Phase 2: the largest batch this configuration trains `--probe-steps` steps at."""
        state = {"runner": None, "probes": []}

        def fits(size: int) -> bool:
            batch = self.batches.get(variant.side, size)
            ok = True
            try:
                if state["runner"] is None:
                    state["runner"] = self.build(variant)
                for _ in range(self.args.probe_steps):
                    state["runner"].step(batch)
                synchronize(self.device)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                ok = False
            del batch
            if not ok and state["runner"] is not None:
                self.close(state["runner"])
                state["runner"] = None
            free_memory(self.device)
            state["probes"].append([size, ok])
            print(f"  {variant.label}: batch {size} {'fits' if ok else 'out of memory'}", flush=True)
            return ok

        entry = {"variant": variant.label, "side": variant.side, "grad_ckpt": variant.grad_ckpt}
        # A failure other than out-of-memory ends this search with what it found so far (in
        # entry["error"]); the other searches go on.
        try:
            entry.update(
                largest_batch(
                    fits,
                    known_fit=known_fit,
                    start=self.args.batch_sizes[0],
                    limit=self.args.max_batch,
                    granularity=self.args.search_granularity,
                    precision=self.args.search_precision,
                    stop=stop,
                )
            )
        except Stopped:
            # SIGTERM mid-probe: the probes done so far still prove a lower bound, as a search
            # stopped at --deadline-min keeps; the report must show this search as cut short.
            probes = state["probes"]
            entry.update(
                largest_batch=max([min(known_fit, self.args.max_batch)] + [b for b, ok in probes if ok]),
                capped=False,
                failed_at=min((b for b, ok in probes if not ok), default=None),
                probes=probes,
                stopped=True,
                stopped_by="SIGTERM",
            )
            self.stopped_search = entry
            raise
        if state["runner"] is not None:
            self.close(state["runner"])
        return entry


# ---------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options of ``python -m vutrain.bench --compare open_clip``."""
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        prog="python -m vutrain.bench --compare open_clip", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--compare", choices=("open_clip",), required=True)
    parser.add_argument(
        "--preset",
        default="vit-b-32" if cuda else "tiny",
        help="vutrain preset; open_clip gets the same shapes (default: vit-b-32 on CUDA, tiny on CPU)",
    )
    parser.add_argument(
        "--precision",
        choices=("bf16", "amp_bf16", "fp32"),
        default="bf16" if cuda else "fp32",
        help="vutrain train.precision; open_clip runs amp_bf16 for bf16 and amp_bf16, fp32 otherwise",
    )
    parser.add_argument("--batch-sizes", default="256,1024" if cuda else "8,16")
    parser.add_argument("--zero-stages", default="1,2")
    parser.add_argument("--loss-backends", default="torch,triton")
    parser.add_argument(
        "--grad-ckpt",
        choices=("off", "on", "both"),
        default="both",
        help="vutrain (and open_clip) gradient checkpointing; 'both' adds open_clip's too",
    )
    parser.add_argument(
        "--compile",
        choices=("off", "on", "both"),
        default="off",
        help="torch.compile (vutrain's train.compile, open_clip's --torchcompile): 'on' compiles "
        "every configuration, 'both' adds compiled twins of vutrain's and open_clip's default "
        "(off by default: each compiled configuration first spends minutes compiling)",
    )
    parser.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of compiled configurations"
    )
    parser.add_argument(
        "--compile-scope",
        choices=("layers", "model"),
        default="layers",
        help="vutrain's train.compile_scope (open_clip compiles its whole model, as --torchcompile does)",
    )
    parser.add_argument(
        "--compile-mode",
        default="default",
        help="inductor mode of both sides' compiled configurations (vutrain's train.compile_mode), "
        "e.g. reduce-overhead: CUDA graphs",
    )
    parser.add_argument("--steps", type=int, default=10 if cuda else 3, help="timed steps per batch size")
    parser.add_argument("--warmup", type=int, default=3 if cuda else 1)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration this many times, in turn, and keep the median "
        "samples/s (on a shared machine the load then weighs on all alike)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=512 if cuda else 32,
        help="distinct pre-decoded samples (batches repeat them)",
    )
    parser.add_argument(
        "--search",
        default="all",
        help="configurations whose largest batch is searched: all, none, or labels joined by "
        "commas (e.g. 'open_clip,vutrain z2 torch ckpt'); open_clip is searched first",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=32768 if cuda else 0,
        help="largest batch probed (0: no search; the CPU default, it has no device memory limit)",
    )
    parser.add_argument(
        "--probe-steps", type=int, default=2, help="steps a batch must train to count as fitting"
    )
    parser.add_argument(
        "--search-granularity", type=int, default=8, help="bisection stops at this batch spacing"
    )
    parser.add_argument(
        "--search-precision",
        type=float,
        default=0.0625,
        help="... or at this fraction of the batch that fits, whichever is coarser",
    )
    parser.add_argument(
        "--deadline-min",
        type=float,
        default=0.0,
        help="end the largest-batch searches this many minutes after the start, keeping what "
        "they found (0: no limit); phase 1 always runs in full",
    )
    parser.add_argument("--out", default="bench_results/compare_open_clip.json")
    parser.add_argument("--png", default="", help="figure path (default: --out with .png)")
    args = parser.parse_args(argv)
    check_counts(parser, args)
    args.batch_sizes = sorted(int_list(parser, "--batch-sizes", args.batch_sizes, minimum=1))
    # DeepSpeed has ZeRO stages 0-3: a 4 was a failed row per configuration, after open_clip's import
    int_list(parser, "--zero-stages", args.zero_stages, minimum=0, maximum=3)
    args.pool_batch = min(args.batch_sizes[0], args.pool)
    args.png = args.png or os.path.splitext(args.out)[0] + ".png"
    args.hidden_act = ""  # HF's default until Bench reads open_clip's (openclip_activation)
    return args


def int_list(
    parser: argparse.ArgumentParser, flag: str, text: str, minimum: int, maximum: int | None = None
) -> list[int]:
    """``"8,16"`` as integers in [``minimum``, ``maximum``]; a bad entry is one usage line (it was a
    ValueError traceback, for --zero-stages after the open_clip import)."""
    values = []
    for entry in text.split(","):
        try:
            value = int(entry)
        except ValueError:
            parser.error(f"{flag} {text}: {entry.strip()!r} is not an integer")
        if value < minimum:
            parser.error(f"{flag} {text}: {value} is below {minimum}")
        if maximum is not None and value > maximum:
            parser.error(f"{flag} {text}: {value} is above {maximum} (choose from {minimum}-{maximum})")
        values.append(value)
    return values


def check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Counts the run cannot use are one usage line before anything is built. ``--probe-steps 0``
    ran no step at all, so every probed batch "fitted" and the search reported --max-batch as
    the largest batch; ``--steps 0`` and ``--rounds 0`` measured nothing and wrote an empty report."""
    for flag, value, minimum in (
        ("--steps", args.steps, 1),
        ("--rounds", args.rounds, 1),
        ("--probe-steps", args.probe_steps, 1),
        ("--pool", args.pool, 1),
        ("--search-granularity", args.search_granularity, 1),
        ("--warmup", args.warmup, 0),
        ("--max-batch", args.max_batch, 0),
    ):
        if value < minimum:
            parser.error(f"{flag} {value}: must be >= {minimum}")
    if not 0 <= args.search_precision < 1:
        parser.error(f"--search-precision {args.search_precision}: must be in [0, 1)")


def unknown_choice(args: argparse.Namespace) -> str | None:
    """What to change where a name the run cannot use was given, checked before open_clip's import
    and the shards: an unknown --preset was a KeyError traceback after them, and an unknown
    --compile-mode a failed row per configuration. An unknown --loss-backends entry stays a failed
    row of its own, beside the configurations that ran (the comparison records failures)."""
    from vutrain.config import COMPILE_MODES
    from vutrain.model import PRESETS

    if args.preset not in PRESETS:
        return f"--preset {args.preset}: choose one of {', '.join(PRESETS)}"
    if args.compile_mode not in COMPILE_MODES:
        return f"--compile-mode {args.compile_mode}: choose one of {', '.join(COMPILE_MODES)}"
    return None


def variants(args: argparse.Namespace) -> list[Variant]:
    """vutrain's first configuration, open_clip's (checkpointed too when vutrain's is), then the
    rest of vutrain's in order.

    The baseline early: a run cut short by a time limit still has what the ratios divide by. Not
    first: the first vutrain Trainer's own stream reads the pool of batches both sides train on.
    """
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.grad_ckpt]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    ours = [
        Variant("vutrain", ckpt, int(z), backend, compiled)
        for compiled in compiles
        for z in args.zero_stages.split(",")
        for backend in args.loss_backends.split(",")
        for ckpt in ckpts
    ]
    theirs = [Variant("open_clip", ckpt, compiled=compiled) for compiled in compiles for ckpt in ckpts]
    # open_clip as it ships (the baseline of every ratio) first among its configurations.
    baseline = [BASELINE] + [v for v in theirs if v != BASELINE]
    return ours[:1] + baseline + ours[1:]


def unknown_search(args: argparse.Namespace, all_variants: list[Variant]) -> str | None:
    """What to change where ``--search`` names a configuration this run does not have."""
    if args.search == "none" or not args.max_batch:
        return None
    unknown = {s.strip() for s in args.search.split(",")} - {v.label for v in all_variants} - {"all"}
    if not unknown:
        return None
    labels = [v.label for v in all_variants]
    return f"--search names unknown configurations {sorted(unknown)}; choose from {labels}"


def search_order(args: argparse.Namespace, all_variants: list[Variant]) -> list[Variant]:
    """The configurations ``--search`` asks the largest batch of, in the order they are searched."""
    if args.search == "none" or not args.max_batch:
        return []
    chosen = (
        all_variants
        if args.search == "all"
        else [v for v in all_variants if v.label in {s.strip() for s in args.search.split(",")}]
    )
    refused = unknown_search(args, all_variants)
    if refused:
        raise SystemExit(refused)
    # The baseline first (every ratio needs it), open_clip's other configurations last (they are
    # for the like-for-like line only, the first a deadline should cut), stable otherwise.
    return sorted(chosen, key=lambda v: (v.label != BASELINE_LABEL, v.side == "open_clip"))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the open_clip comparison; returns the process exit code."""
    started = time.monotonic()  # --deadline-min counts from here, before open_clip's import
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    refused = unknown_choice(args)
    if refused:
        print(f"python -m vutrain.bench --compare open_clip: error: {refused}", file=sys.stderr)
        return 2
    all_variants = variants(args)
    refused = unknown_search(args, all_variants)
    if refused:  # a usage error like the names above (exit 2; it was exit 1)
        print(f"python -m vutrain.bench --compare open_clip: error: {refused}", file=sys.stderr)
        return 2
    to_search = search_order(args, all_variants)
    try:  # before anything is built: the one thing a user may have to install
        load_open_clip()
    except ImportError as exc:
        print(f"python -m vutrain.bench --compare open_clip: {exc}", file=sys.stderr)
        return 2
    # A time limit (`timeout`: launch/gpu_bench.sh) stops the run with SIGTERM. Set before the
    # shards are written: the default action killed the process mid-write and left the folder.
    previous_handler = signal.signal(signal.SIGTERM, _raise_stopped)
    # The shards and run folder of this run only: left behind, every comparison added its
    # synthetic images (256 or --pool of them) to the temporary directory.
    work = tempfile.mkdtemp(prefix="vutrain-compare-")
    try:
        return compare(args, argv, all_variants, to_search, started, work, previous_handler)
    except Stopped:  # before phase 1 began: nothing measured, --out left as it was
        print("stopped by SIGTERM (a time limit) before anything was measured; --out not written", flush=True)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        shutil.rmtree(work, ignore_errors=True)


def compare(
    args: argparse.Namespace,
    argv: list[str],
    all_variants: list[Variant],
    to_search: list[Variant],
    started: float,
    work: str,
    previous_handler=signal.SIG_DFL,
) -> int:
    """Phase 1 and 2 on synthetic shards written under ``work``, then the report; the exit code.
    ``previous_handler``: SIGTERM's handler from before main's, back in place while reporting."""
    from vutrain.data.synthetic import write_synthetic
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env
    from vutrain.model import PRESETS

    # At least 256 samples, not --pool: the preset tokenizer is trained on these captions, and from
    # about 128 of them its vocabulary (the model's embedding table) is the synthetic data's whole
    # (tiny: 365 tokens from 8 captions, 423 from 256, 426 from 2048): a small --pool keeps the model.
    data = write_synthetic(
        os.path.join(work, "data"),
        num_samples=max(args.pool, 256),
        shard_size=256,
        image_size=PRESETS[args.preset].image_size,
        val_samples=0,
    )
    _stop_if_requested()  # a SIGTERM whose exception a finalizer swallowed while the shards were written
    info = resolve_dist_env()
    init_distributed(info)  # once: every Trainer below shares this process group
    bench = Bench(args, info, os.path.join(work, "run"), data["train_shards"])
    deadline = started + 60 * args.deadline_min if args.deadline_min else None
    out_of_time = (lambda: time.monotonic() > deadline) if deadline else None
    rows, largest, stopped, measured = [], [], False, []
    # SIGTERM (its handler set by main) from here on leaves through the report below, which
    # writes the JSON and the figure of what was measured.
    try:
        print(f"MLP activation on both sides: {args.hidden_act} (open_clip's for {args.preset})", flush=True)
        print(TABLE_HEAD, flush=True)
        for _ in range(args.rounds):  # rounds cycle through the configurations: a load change hits all
            for variant in all_variants:
                bench.speed(variant, measured)
                rows = median_rows(measured)
                # Written after each configuration: what was measured survives an outer time limit.
                write_json(result_dict(args, argv, bench, rows, largest, to_search, started, True), args.out)
        for variant in to_search:
            fit = [r["batch_size"] for r in rows if r["variant"] == variant.label and "error" not in r]
            skipped = f"--deadline-min {args.deadline_min} passed" if out_of_time and out_of_time() else None
            if any(r["variant"] == variant.label and "error" in r and not r.get("oom") for r in rows):
                skipped = "failed in phase 1"
            if skipped:
                largest.append(_skipped_search(variant, skipped))
                continue
            largest.append(bench.search(variant, known_fit=max(fit, default=0), stop=out_of_time))
            write_json(result_dict(args, argv, bench, rows, largest, to_search, started, True), args.out)
    except Stopped:
        stopped = True
        rows = median_rows(measured)  # with the rows of a configuration stopped part-way
        # Every search asked for is in the report: the one the signal cut, and those it never
        # reached (a verdict over the finished ones alone could FAIL on a partial picture).
        if bench.stopped_search is not None:
            largest.append(bench.stopped_search)
        searched = {e["variant"] for e in largest}
        largest += [_skipped_search(v, "stopped by SIGTERM") for v in to_search if v.label not in searched]
        print("stopped by SIGTERM (a time limit): reporting what was measured", flush=True)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        teardown_error = destroy_group(cleanup)
    add_ratios(rows, largest)
    result = result_dict(args, argv, bench, rows, largest, to_search, started, stopped)
    if teardown_error:
        result["teardown_error"] = teardown_error
    report(result, args.out, args.png)
    if stopped:
        return 128 + signal.SIGTERM
    failed = [r for r in rows if "error" in r and not r.get("oom")] + [e for e in largest if "error" in e]
    return 1 if failed or teardown_error else 0


def destroy_group(cleanup) -> str | None:
    """Destroy the process group; what failed, if it did. A failure here raised past the report:
    every figure measured (the figure and the final JSON) was lost for a teardown error. The
    figures are whole by then, so they are reported, with ``teardown_error``, and the run exits 1."""
    try:
        cleanup()
    except Exception as exc:
        line = error_line(exc)
        print(f"warning: destroying the process group after measuring: {line}", flush=True)
        return line
    return None


def _skipped_search(variant: Variant, why: str) -> dict:
    """The `largest` entry of a search that did not run."""
    return {"variant": variant.label, "side": variant.side, "grad_ckpt": variant.grad_ckpt, "skipped": why}


class Stopped(BaseException):
    """SIGTERM arrived (``timeout`` ended the run); not an Exception, which a configuration
    catches and records as its own failure."""


_STOP_REQUESTED = False
"""Set by SIGTERM's handler: its exception can be swallowed where the signal lands in a finalizer
("Exception ignored in ..."), and a shard write then went on to its end without a word."""


def _raise_stopped(signum, frame):
    global _STOP_REQUESTED
    _STOP_REQUESTED = True
    raise Stopped


def _stop_if_requested() -> None:
    if _STOP_REQUESTED:
        raise Stopped


def result_dict(
    args: argparse.Namespace,
    argv: list[str],
    bench: Bench,
    rows: list[dict],
    largest: list[dict],
    to_search: list[Variant],
    started: float,
    partial: bool,
) -> dict:
    """Everything the JSON file records: settings, device, every row, searches and targets."""
    from kernels.provenance import commit, versions
    from vutrain.bench import device_name

    oc = bench.openclip
    return {
        "command": "python -m vutrain.bench " + " ".join(argv),
        "commit": commit(),
        "versions": versions(("torch", "deepspeed", "transformers", "open_clip_torch", "triton")),
        "date": datetime.date.today().isoformat(),
        "device": device_name(bench.device),
        "torch": torch.__version__,
        "preset": args.preset,
        "hidden_act": args.hidden_act,
        "precision": args.precision,
        "open_clip": {
            "version": oc.version if oc else None,
            "source": oc.source if oc else None,
            "model_cfg": bench.openclip_cfg,
        },
        "pool_samples": args.pool,
        "warmup": args.warmup,
        "steps": args.steps,
        "probe_steps": args.probe_steps,
        "rows": rows,
        "largest": largest,
        "targets": judge_targets(rows, largest, bench.device.type == "cuda"),
        "largest_note": ""
        if to_search
        else "not searched (pass --max-batch N to probe up to N; on a GPU the default searches to 32768)",
        "partial": partial,
        "wall_s": round(time.monotonic() - started, 1),
    }
