"""Is a training step bound by the GPU or by the host? One profile of the real Trainer's steps.

    python tools/profile_step.py --preset vit-b-32 --precision bf16 --batch-size 256 --zero-stage 2

Runs the benchmark's Trainer (vutrain.bench.build_trainer: one rank, synthetic shards, no phase
syncs, so the host runs ahead as in training) for warm-up steps, then profiles `--steps` steps with
torch.profiler and prints, per step: the wall time (device synchronised at the end), the time the
GPU was busy (the union of its kernels' and copies' intervals), and the host's time in each phase
(data, forward with the loss, backward, optimizer step; the non-finite agreement between them is
in none). A GPU busy for much less than the wall time while the host phases add up to it means
the step waits on the host (Python, launches, DeepSpeed hooks), not on the GPU. Then the 15 aten
ops with the most host time and, on a GPU, the most GPU time. Prints a JSON line last.
Measures, does not judge: no timing is asserted anywhere.

`--grad-accum-steps N` profiles steps of N micro-batches each, combined by GradCache (the
default `--accumulation gradcache`: its forward phase is every micro-batch without autograd and
the loss, its backward phase each micro-batch's replay and backward) or by `--accumulation plain`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PHASES = ("data", "forward", "backward", "optimizer")  # the labels wrapped around the Trainer's calls


def _labelled(fn, label: str):
    from torch.profiler import record_function

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def labelled_phases(trainer):
    """Label the Trainer's calls with PHASES for the profile, and take the labels off again.

    Plain steps: next_batch, forward_loss, engine.backward and engine.step. A GradCache step
    (train.accumulation=gradcache, grad_accum_steps > 1) never calls forward_loss: its forward is
    GradCache.forward (every micro-batch without autograd, the loss and its feature gradients), and
    its backward each micro-batch's replay with autograd beside engine.backward.
    """
    from vutrain.gradcache import GradCache

    patched = [
        (trainer, "next_batch", "data"), (trainer, "forward_loss", "forward"),
        (trainer.engine, "backward", "backward"), (trainer.engine, "step", "optimizer"),
        (GradCache, "forward", "forward"), (GradCache, "_replay", "backward"),
    ]  # fmt: skip
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patched]
    for owner, name, phase in patched:
        setattr(owner, name, _labelled(getattr(owner, name), f"phase:{phase}"))
    try:
        yield
    finally:
        for owner, name, before in saved:
            if before is None:  # an instance's bound method: the class's shows through again
                delattr(owner, name)
            else:
                setattr(owner, name, before)


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (microseconds)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def rerun_command(args: argparse.Namespace) -> str:
    """The command that profiles this configuration again, every option spelled out: sys.argv was
    the caller's (a wrapper's or pytest's argv when main(argv) was called), and defaults change."""
    options = [
        ("--preset", args.preset), ("--precision", args.precision), ("--zero-stage", args.zero_stage),
        ("--batch-size", args.batch_size), ("--loss-backend", args.loss_backend),
        ("--workers", args.workers), ("--warmup", args.warmup), ("--steps", args.steps),
        ("--grad-accum-steps", args.grad_accum_steps), ("--accumulation", args.accumulation),
        ("--hidden-act", args.hidden_act), ("--compile-mode", args.compile_mode),
    ]  # fmt: skip
    if args.compile:
        options.append(("--compile-backend", args.compile_backend))
    words = [f"{flag} {shlex.quote(str(value))}" for flag, value in options]
    return " ".join(["python tools/profile_step.py", *words, *(["--compile"] if args.compile else [])])


def accumulation_text(args: argparse.Namespace) -> str:
    """The header's words for a step of several micro-batches ('' for one)."""
    if args.grad_accum_steps == 1:
        return ""
    return f", {args.grad_accum_steps} micro-batches a step ({args.accumulation})"


def main(argv: list[str] | None = None) -> int:
    """Run the tool; its synthetic shards and run folder are removed when it ends (scratch_dirs)."""
    from scratch_dirs import run_with_scratch

    return run_with_scratch(_main, argv)


def _main(argv: list[str] | None, make_scratch) -> int:
    from vutrain.config import ACCUMULATIONS, BACKENDS, COMPILE_MODES, HIDDEN_ACTS, PRECISIONS, PRESETS

    # Choices here: a wrong value is refused at once, not after seconds of imports in a traceback.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--loss-backend", default="torch", choices=BACKENDS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--grad-accum-steps", type=int, default=1, help="train.grad_accum_steps: micro-batches per step"
    )
    parser.add_argument(
        "--accumulation",
        default="gradcache",
        choices=ACCUMULATIONS,
        help="train.accumulation: how the micro-batches of a step combine (with --grad-accum-steps > 1)",
    )
    parser.add_argument("--compile", action="store_true", help="train.compile=true (warm-up compiles)")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument(
        "--compile-mode", default="default", choices=COMPILE_MODES, help="train.compile_mode (inductor)"
    )
    parser.add_argument(
        "--hidden-act", default="", choices=("", *HIDDEN_ACTS), help="model.hidden_act ('': HF's quick_gelu)"
    )
    args = parser.parse_args(argv)
    # Checked here, not after a minute of building: --steps 0 divided by zero at the end.
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--warmup", args.warmup, 0), ("--workers", args.workers, 0),
                               ("--grad-accum-steps", args.grad_accum_steps, 1)):  # fmt: skip
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")

    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from vutrain.bench import build_trainer, close_trainer, device_name
    from vutrain.data.synthetic import write_synthetic
    from vutrain.distributed import cleanup
    from vutrain.model import PRESETS

    work = make_scratch("vutrain-profile-")
    data = write_synthetic(
        os.path.join(work, "data"),
        num_samples=1024,
        shard_size=128,
        image_size=PRESETS[args.preset].image_size,
        val_samples=0,
    )
    spec = dict(
        preset=args.preset, precision=args.precision, zero_stage=args.zero_stage,
        batch_size=args.batch_size, grad_ckpt="false", steps=args.steps, warmup=args.warmup,
        workers=args.workers, loss_backend=args.loss_backend, train_shards=data["train_shards"],
        run_dir=os.path.join(work, "run"), compile=args.compile, compile_backend=args.compile_backend,
        hidden_act=args.hidden_act, compile_mode=args.compile_mode,
        grad_accum_steps=args.grad_accum_steps, accumulation=args.accumulation,
    )  # fmt: skip
    trainer = build_trainer(spec, sync_timing=False)
    where = trainer.device
    cuda = where.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        with labelled_phases(trainer):
            for _ in range(args.warmup):
                trainer.train_step()
            sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainer.train_step()
                sync()
                wall = (time.perf_counter() - t0) / args.steps
    finally:
        try:
            # train() never runs, which would end them: the data-wait watcher thread (it holds the
            # Trainer) and the loader workers lived on until the process exited.
            close_trainer(trainer)
        finally:
            cleanup()
    events = prof.events()
    host = {
        phase: sum(e.cpu_time_total for e in events if e.name == f"phase:{phase}") / args.steps / 1e3
        for phase in PHASES
    }
    # Kernels, copies and sets only: record_function ranges (ours, torch's Optimizer.step, compiled
    # regions) also get a device-side span, from their first kernel to their last, gaps included.
    kernels = [
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    ]
    gpu_busy = busy_us(kernels) / args.steps / 1e3 if cuda else None
    if cuda and not kernels:  # no device-side events listed: the ops' own device time (no union)
        gpu_busy = sum(getattr(e, "self_device_time_total", 0.0) for e in events) / args.steps / 1e3
        print("GPU busy from the ops' self device time (the profiler listed no kernel events)")
    # The device the Trainer ran on (not GPU 0's name) and, on a CPU, the cores this process could use
    device = device_name(where)
    print(f"\n{device}, {args.preset} {args.precision}, ZeRO-{args.zero_stage}, batch {args.batch_size}, "
          f"loss {args.loss_backend}{', compiled' if args.compile else ''}{accumulation_text(args)}, "
          f"{args.steps} profiled steps after {args.warmup}")  # fmt: skip
    print(f"wall per step: {wall * 1e3:.1f} ms (profiler on)")
    if cuda:
        print(f"GPU busy per step: {gpu_busy:.1f} ms ({100 * gpu_busy / (wall * 1e3):.0f}% of the wall time)")
    print("host time per step: " + ", ".join(f"{p} {ms:.1f} ms" for p, ms in host.items()))
    averages = prof.key_averages()
    print("\n" + averages.table(sort_by="self_cpu_time_total", row_limit=15))
    if cuda:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=15))
    record = dict(
        device=device, preset=args.preset, precision=args.precision, zero_stage=args.zero_stage,
        batch_size=args.batch_size, loss_backend=args.loss_backend, steps=args.steps,
        warmup=args.warmup, workers=args.workers, hidden_act=args.hidden_act, compiled=args.compile,
        grad_accum_steps=args.grad_accum_steps, accumulation=args.accumulation,
        compile_backend=args.compile_backend, compile_mode=args.compile_mode,
        wall_ms=wall * 1e3, gpu_busy_ms=gpu_busy, host_ms=host,
        date=time.strftime("%Y-%m-%d"), command=rerun_command(args),
    )  # fmt: skip
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
