"""The Python host time of one training step, by package: vutrain's Trainer against open_clip's step.

    python tools/host_python_time.py --preset vit-b-32 --narrow --batch-size 2 --steps 5

At batch 256 a ViT-B/32 step on an H200 waits on the host (issue 9), so every millisecond of
Python around the kernels is a millisecond of step time. `tools/count_step_ops.py` counts the
ops (the kernels); this measures the Python around them: vutrain's real Trainer step (ZeRO-1 and
ZeRO-2 by default) and open_clip's training step, built by the open_clip comparison
(`vutrain.bench_compare`: same preset, same pre-decoded batches, open_clip's MLP activation on
both sides), each profiled with cProfile for `--steps` steps after a warm-up. It prints, per
configuration, the self time of every Python function summed by package (deepspeed,
transformers, torch, open_clip, vutrain) per step, and the functions with the most self time;
the last line is one JSON object.

`--narrow` keeps the preset's structure (layers, heads, patch size, context length: the same
modules, parameters and ops) at tiny widths and a 2 x 2 patch grid: on a CPU the ops of a full-width
model take long enough to count as Python time wherever Python operators (``a * b``) call them,
which cProfile cannot tell apart.

Self time of C functions (the ops themselves, which a GPU runs asynchronously) is left out, and
cProfile adds its own cost to every Python call: compare the rows of one run with each other, not
with a wall clock. On a CPU, torch's AdamW (open_clip's optimizer) takes its per-parameter loop
(the multi-tensor one is its default on CUDA only), so open_clip's optimizer costs more Python
here than on a GPU. Measures, does not judge: no timing is asserted anywhere.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PACKAGES = ("deepspeed", "transformers", "torch", "open_clip", "vutrain", "kernels")


def package_of(filename: str) -> str | None:
    """The package a Python function's file belongs to, or None for C functions and others."""
    if filename.startswith(("~", "<")):
        return None  # C functions ("~") and generated code
    parts = filename.replace(os.sep, "/").split("/")
    installed = [i for i, part in enumerate(parts) if part in ("site-packages", "dist-packages")]
    if installed:
        # The folder right under site-packages is the package: the folders above it are where the
        # venv lives (a clone named `vutrain` put numpy's time on vutrain's row, open_clip's side
        # included), those below are its own subpackages (transformers/kernels is transformers').
        top = parts[installed[-1] + 1 : -1][:1]
        return top[0] if top and top[0] in PACKAGES else "other"
    for part in reversed(parts[:-1]):
        if part in PACKAGES:
            return part
    return "other"


def python_self_time(stats: pstats.Stats, steps: int) -> tuple[dict[str, float], list[dict]]:
    """(ms of Python self time per step by package, the 8 functions with the most self time)."""
    by_package: dict[str, float] = {}
    functions = []
    for (filename, line, name), (_, calls, self_s, _, _) in stats.stats.items():
        package = package_of(filename)
        if package is None:
            continue
        by_package[package] = by_package.get(package, 0.0) + self_s * 1e3 / steps
        where = filename.replace(os.sep, "/").split("site-packages/")[-1]
        functions.append(
            {"function": f"{where}:{line}({name})", "ms": self_s * 1e3 / steps, "calls": calls // steps}
        )
    functions.sort(key=lambda f: -f["ms"])
    return dict(sorted(by_package.items(), key=lambda kv: -kv[1])), functions[:8]


def narrow_preset(name: str) -> None:
    """Preset `name`, in this process, at tiny widths with its structure unchanged (both sides)."""
    import dataclasses

    from vutrain import bench_openclip, model

    p = model.PRESETS[name]
    model.PRESETS[name] = dataclasses.replace(
        p,
        image_size=2 * p.patch_size,
        vision_width=4 * p.vision_heads,
        text_width=4 * p.text_heads,
        embed_dim=32,
    )
    # open_clip's built-in config (and its shape check) no longer applies; both sides then take
    # CLIP's default activation, gelu, which is also ViT-B-32's (bench_openclip.openclip_activation).
    bench_openclip.OPENCLIP_MODEL_NAMES.pop(name, None)


def profile(runner, batch, warmup: int, steps: int) -> pstats.Stats:
    """cProfile of `steps` steps of `runner` on `batch`, after `warmup` unprofiled ones."""
    for _ in range(warmup):
        runner.step(batch)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        runner.step(batch)
    profiler.disable()
    return pstats.Stats(profiler)


def _check_counts(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse what the run cannot use before building anything: `--steps 0` divided by zero and
    `--zero-stages 1,x` failed on int() in a traceback, each after the trainers were built."""
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--warmup", args.warmup, 0)):  # fmt: skip
        if value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    stages = args.zero_stages.split(",")
    if not all(stage.strip() in ("0", "1", "2", "3") for stage in stages):
        parser.error(
            f"--zero-stages takes ZeRO stages 0-3 separated by commas, e.g. 1,2; got {args.zero_stages!r}"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the tool; its synthetic shards and run folder are removed when it ends (scratch_dirs)."""
    from scratch_dirs import run_with_scratch

    return run_with_scratch(_main, argv)


def _main(argv: list[str] | None, make_scratch) -> int:
    from vutrain.config import BACKENDS, PRECISIONS, PRESETS

    # Choices here: a wrong value is refused at once, not after seconds of imports in a traceback.
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--zero-stages", default="1,2")
    parser.add_argument("--loss-backend", default="torch", choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--narrow", action="store_true", help="the preset's structure at tiny widths")
    args = parser.parse_args(argv)
    _check_counts(parser, args)

    from vutrain.bench_compare import Bench, Variant, parse_args
    from vutrain.data.synthetic import write_synthetic
    from vutrain.distributed import cleanup, init_distributed, resolve_dist_env
    from vutrain.model import PRESETS

    if args.narrow:
        narrow_preset(args.preset)
    compare_args = parse_args(
        ["--compare", "open_clip", "--preset", args.preset, "--precision", args.precision]
        + ["--batch-sizes", str(args.batch_size), "--pool", str(max(args.batch_size, 8))]
    )
    work = make_scratch("vutrain-host-time-")
    data = write_synthetic(
        os.path.join(work, "data"),
        num_samples=64,
        shard_size=64,
        image_size=PRESETS[args.preset].image_size,
        val_samples=0,
    )
    info = resolve_dist_env()
    init_distributed(info)
    bench = Bench(compare_args, info, os.path.join(work, "run"), data["train_shards"])
    variants = [
        Variant(side="vutrain", grad_ckpt=False, zero_stage=int(z), loss_backend=args.loss_backend)
        for z in args.zero_stages.split(",")
    ] + [Variant(side="open_clip", grad_ckpt=False)]
    rows = []
    try:
        for variant in variants:  # vutrain first: its stream reads the pool both sides train on
            runner = bench.build(variant)
            stats = profile(runner, bench.batches.get(variant.side, args.batch_size), args.warmup, args.steps)
            runner.close()
            by_package, top = python_self_time(stats, args.steps)
            rows.append(
                {
                    "variant": variant.label,
                    "python_ms_per_step": sum(by_package.values()),
                    "by_package": by_package,
                    "top": top,
                }
            )
            print(f"\n{variant.label}: Python self time {rows[-1]['python_ms_per_step']:.2f} ms/step")
            print("  " + ", ".join(f"{k} {v:.2f}" for k, v in by_package.items()))
            for f in top:
                print(f"  {f['ms']:7.3f} ms {f['calls']:5d} calls/step  {f['function']}")
    finally:
        cleanup()
    print(
        json.dumps(
            {
                "preset": args.preset,
                "precision": args.precision,
                "batch_size": args.batch_size,
                "steps": args.steps,
                "narrow": args.narrow,
                "hidden_act": compare_args.hidden_act,
                "device": info.device,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
