"""Peak memory of GradCache vs one big micro-batch as the global batch grows (CPU or CUDA).

    python -m vutrain.gradcache_bench [--batches 64,128,256] [--micro 32] [--preset tiny] [--device cpu]

Each (global batch, mode) runs in a fresh process - peak RSS (`ru_maxrss`) never goes down -
that builds the preset model, does one training step of the CLIP loss (`plain`: one micro-batch
of the whole batch; `gradcache`: micro-batches of `--micro`, the last one shorter when `--micro`
does not divide the batch, see gradcache.py) on random inputs,
and reports its peak (RSS on CPU, `torch.cuda.max_memory_allocated` on CUDA); a configuration
that fails (out of memory) is a row with its ``error`` and the others still run. The engine is a
stand-in with backward/step (no DeepSpeed), so the figures are the model, activations and
feature buffers alone. The last line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch


class _Tokenizer:
    """Just what preset_clip_config reads from a tokenizer (its size and special ids)."""

    bos_token_id, eos_token_id, pad_token_id = 0, 1, 3

    def __len__(self) -> int:
        return 1024


class _Engine:
    """backward + optimizer step, the part of a DeepSpeed engine GradCache uses."""

    def __init__(self, module: torch.nn.Module, accumulation: int):
        self.module, self.accumulation = module, accumulation
        self.optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
        self.micro = 0

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)

    def gradient_accumulation_steps(self) -> int:
        return self.accumulation

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = True) -> None:
        (loss / self.accumulation if scale_wrt_gas else loss).backward()

    def step(self) -> None:
        self.micro += 1
        if self.micro % self.accumulation == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_one(batch: int, micro: int, mode: str, preset: str, device: str) -> dict:
    """One step in this process; returns the row (peak memory in MiB, step time in s)."""
    from vutrain.config import ModelConfig
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss
    from vutrain.model import build_model

    dev = torch.device(device)
    torch.manual_seed(0)
    module = build_model(ModelConfig(preset=preset), _Tokenizer()).to(dev).train()
    size = module.base.config.vision_config.image_size
    length = 32 if preset == "tiny" else 77
    pixels = torch.randn(batch, 3, size, size, device=dev)
    ids = torch.randint(4, 1024, (batch, length), device=dev)
    ids[:, -1] = 1  # eos
    mask = torch.ones_like(ids)
    loss_fn = ClipLoss()
    micro = min(micro, batch)
    # A batch that --micro does not divide ends in a shorter micro-batch, which still counts.
    k = math.ceil(batch / micro) if mode == "gradcache" else 1
    engine = _Engine(module, k)
    base = _peak_bytes(dev)
    t0 = time.perf_counter()
    if mode == "gradcache":
        batches = [
            (pixels[i : i + micro], ids[i : i + micro], mask[i : i + micro]) for i in range(0, batch, micro)
        ]
        loss = gradcache_step(engine, batches, lambda b: engine(*b), loss_fn)
    else:
        img, txt, scale, bias = engine(pixels, ids, mask)
        loss = loss_fn(img, txt, scale, bias)
        engine.backward(loss)
        engine.step()
    seconds = time.perf_counter() - t0
    return {
        "global_batch": batch,
        "mode": mode,
        "micro": micro if mode == "gradcache" else batch,
        "peak_mib": round(_peak_bytes(dev) / 2**20, 1),
        "before_step_mib": round(base / 2**20, 1),
        "step_s": round(seconds, 3),
        "loss": round(loss.item(), 5),
        "device": device,
        "preset": preset,
    }


def _check_sizes(parser: argparse.ArgumentParser, batches: str, micro: int) -> list[int]:
    """The --batches list as positive ints, or a one-line usage error (exit 2) that says what to fix."""
    if micro < 1:
        parser.error(f"--micro must be a positive integer, got {micro}")
    try:
        sizes = [int(b) for b in batches.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        parser.error(
            f"--batches must be positive integers separated by commas (e.g. 64,128), got {batches!r}"
        )
    return sizes


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m vutrain.gradcache_bench``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m vutrain.gradcache_bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--batches", default="64,128,256")
    parser.add_argument("--micro", type=int, default=32)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    batches = _check_sizes(parser, args.batches, args.micro)
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.micro, args.one[1], args.preset, args.device)))
        return 0
    rows = []
    for batch in batches:
        for mode in ("plain", "gradcache"):
            cmd = [
                sys.executable,
                "-m",
                "vutrain.gradcache_bench",
                "--one",
                str(batch),
                mode,
                "--micro",
                str(args.micro),
                "--preset",
                args.preset,
                "--device",
                args.device,
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            rows.append(_row_of(done, batch, mode, args))
            print(_line(rows[-1]), flush=True)
    print(json.dumps({"rows": rows}))
    # Running out of memory is a result here (the plain step's, at the batches GradCache is for).
    return 1 if any("error" in r and not r["oom"] for r in rows) else 0


def _row_of(done: subprocess.CompletedProcess, batch: int, mode: str, args: argparse.Namespace) -> dict:
    """The row one ``--one`` process printed, or its error row. A failed configuration ended the
    whole run with no JSON line: on a GPU the plain step out of memory at a large batch, the very
    case GradCache is measured for, lost every row before it and the GradCache rows after it."""
    if done.returncode == 0:
        return json.loads(done.stdout.strip().splitlines()[-1])
    last = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    oom = "out of memory" in last.lower() or "can't allocate memory" in last.lower()
    return {
        "global_batch": batch,
        "mode": mode,
        "micro": min(args.micro, batch) if mode == "gradcache" else batch,
        "error": last[:300],
        "oom": oom,
        "device": args.device,
        "preset": args.preset,
    }


def _line(row: dict) -> str:
    """One progress line: the peak and step time, or why the configuration failed."""
    head = f"{row['global_batch']:>6} {row['mode']:>9}  "
    if "error" in row:
        return head + f"failed: {row['error']}"
    return head + f"peak {row['peak_mib']:>8} MiB  step {row['step_s']} s"


if __name__ == "__main__":
    sys.exit(main())
