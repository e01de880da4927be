"""Benchmark of the fused losses against torch baselines, with the issue's targets.

    python -m kernels.bench [--out DIR] [--quick] [--modes fwd,fwd+bwd] [--losses clip,sigmoid]
                            [--providers eager,compile,inf_cl,ours] [--shapes 32768x32768x768,...]
                            [--backward-schedule auto|one_pass|two_pass] [--autotune [--candidates ...]]

Losses and providers, each provider computing the same loss:
- ``clip``: the symmetric CLIP loss. ``eager``: open_clip's ClipLoss in torch (materialises
  the logits); ``compile``: ``torch.compile`` of it; ``inf_cl``: the ``inf-cl`` package
  (the mean of what ``cal_flash_loss`` returns, per direction), if installed; ``ours``:
  ``kernels.clip_loss`` (square) / ``kernels.contrastive_ce`` x 2 (gathered).
- ``sigmoid``: the SigLIP loss (image rows against all texts). ``eager``: open_clip's
  SigLipLoss formula in torch; ``compile``: compiled; ``ours``: ``kernels.sigmoid_loss``.

Shapes are ``NxMxD``: ``N == M`` is the square problem; ``N < M`` is the gathered
``local_loss`` case (N local rows against M gathered columns, label offset ``M - N``,
i.e. the last rank). Reported per row: median and 20/80 % quantile time (ms), achieved
TFLOP/s and the peak extra memory (MiB over what existed before the call, minus the
input gradients every provider returns). FLOPs counted per N x M score matrix: 2NMD
forward, 8NMD forward+backward (forward, one recompute, two gradient GEMMs); the square
CLIP loss and the sigmoid loss have one matrix, the gathered CLIP loss two. A dense
matmul rate is measured in the same run as the yardstick, and every target of the issue
gets a PASS/FAIL verdict (``kernels.bench_targets``; FAIL when a needed row is missing, NOT
MEASURED when a ratio's baseline could not run: out of memory or not installed).
Every run writes ``bench_kernels.json`` and ``bench_kernels.png`` to ``--out`` and
prints a markdown table. Numbers are measured, never estimated.

``--autotune`` first sweeps tile configs per kernel and shape class on this GPU and
writes ``tuned_configs.json`` (``kernels.bench_autotune``); point ``KERNELS_TILE_CONFIGS``
at it (or copy it to ``kernels/tuned_configs.json``) to use it.

``--quick`` runs tiny shapes in a few seconds, also on CPU (Triton interpreter if
TRITON_INTERPRET=1, otherwise the torch fallback), to smoke-test the harness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

import kernels
from kernels.bench_targets import format_verdicts, targets
from kernels.provenance import provenance
from kernels.runtime import interpreting
from vutrain.bench_report import md_cell

SQUARE = [(n, n, d) for n in (4096, 16384, 32768, 65536) for d in (512, 768, 1024)]
GATHERED = [(4096, 32768, 768), (1024, 65536, 768)]
QUICK = [(96, 96, 64), (32, 128, 64)]
PROVIDERS = ("eager", "compile", "inf_cl", "ours")
MODES = ("fwd", "fwd+bwd")
LOSSES = ("clip", "sigmoid")
SIGLIP_BIAS = -10.0  # SigLIP's initial bias; the scale is make_inputs' 100 (a trained CLIP value)


def eager_loss(img, txt, img_all, txt_all, scale, offset):
    """open_clip's ClipLoss: logits in the input dtype, CE in both directions."""
    labels = torch.arange(img.shape[0], device=img.device) + offset
    per_image = scale * img @ txt_all.T
    per_text = scale * txt @ img_all.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def ours_loss(img, txt, img_all, txt_all, scale, offset):
    """Our fused CLIP loss: one symmetric kernel when local, two row-block CE calls otherwise."""
    if img is img_all:
        return kernels.clip_loss(img, txt, scale)
    i2t = kernels.contrastive_ce(img, txt_all, scale, label_offset=offset)
    t2i = kernels.contrastive_ce(txt, img_all, scale, label_offset=offset)
    return (i2t + t2i) / 2


def inf_cl_loss_fn() -> Callable | None:
    """Inf-CL's ``cal_flash_loss`` in the benchmark's loss signature, or None if not installed."""
    try:
        from inf_cl import cal_flash_loss
    except Exception:
        return None

    def loss(img, txt, img_all, txt_all, scale, offset):
        labels = torch.arange(img.shape[0], device=img.device) + offset
        # cal_flash_loss returns per-row losses in some versions: reduce like ours (the mean).
        i2t = cal_flash_loss(img, txt_all, labels, scale).mean()
        t2i = cal_flash_loss(txt, img_all, labels, scale).mean()
        return (i2t + t2i) / 2

    return loss


def sigmoid_eager_loss(img, txt, img_all, txt_all, scale, offset):
    """open_clip's SigLipLoss (image rows against all texts), logits in the input dtype."""
    logits = scale * img @ txt_all.T + SIGLIP_BIAS
    labels = -torch.ones_like(logits)
    rows = torch.arange(img.shape[0], device=img.device)
    labels[rows, rows + offset] = 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def sigmoid_ours_loss(img, txt, img_all, txt_all, scale, offset):
    """Our fused sigmoid (SigLIP) loss with the benchmark's fixed bias."""
    return kernels.sigmoid_loss(img, txt_all, scale, SIGLIP_BIAS, label_offset=offset)


def loss_fns(losses: list[str], compile_too: bool) -> dict[tuple[str, str], Callable | None]:
    """``{(loss, provider): fn}``; None marks a provider that is not installed."""
    fns: dict[tuple[str, str], Callable | None] = {}
    if "clip" in losses:
        fns.update(
            {("clip", "eager"): eager_loss, ("clip", "ours"): ours_loss, ("clip", "inf_cl"): inf_cl_loss_fn()}
        )
        if compile_too:
            fns[("clip", "compile")] = torch.compile(eager_loss)
    if "sigmoid" in losses:
        fns.update({("sigmoid", "eager"): sigmoid_eager_loss, ("sigmoid", "ours"): sigmoid_ours_loss})
        if compile_too:
            fns[("sigmoid", "compile")] = torch.compile(sigmoid_eager_loss)
    return fns


def make_inputs(n, m, d, dtype, device, seed=0):
    """Normalised features; the local rows are the last N of the M gathered ones."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    img_all = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt_all = F.normalize(torch.randn(m, d, generator=g), dim=-1).to(device, dtype).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    if n == m:
        return img_all, txt_all, img_all, txt_all, scale, 0
    # Local shards are separate leaves (as after an all_gather with grad).
    img = img_all.detach()[m - n :].clone().requires_grad_()
    txt = txt_all.detach()[m - n :].clone().requires_grad_()
    return img, txt, img_all, txt_all, scale, m - n


def measure(fn: Callable[[], object], grads: list[torch.Tensor], cuda: bool, reps: int) -> dict:
    """Median/20%/80% time in ms and memory in MiB of ``fn``: ``peak_mib`` is the peak
    allocated over what existed before the call, ``grad_mib`` the input gradients
    left behind, ``extra_mib = peak_mib - grad_mib`` (the loss's own footprint)."""
    if cuda:
        import triton.testing

        fn()  # compile / autotune outside the timed and the memory run
        # Its gradients dropped: left in `base`, the memory run would add into them in place and
        # its peak would miss the gradients it allocates (extra = peak - grad went negative).
        for t in grads:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        # The input gradients are outputs every provider must allocate: report them apart.
        grad_bytes = sum(t.grad.numel() * t.grad.element_size() for t in grads if t.grad is not None)
        for t in grads:
            t.grad = None
        q50, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
        return {
            "ms": q50,
            "ms_p20": q20,
            "ms_p80": q80,
            "extra_mib": (peak - grad_bytes) / 2**20,
            "peak_mib": peak / 2**20,
            "grad_mib": grad_bytes / 2**20,
        }
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        for t in grads:
            t.grad = None
    times = sorted(times[1:])  # first run warms up
    qs = statistics.quantiles(times, n=5) if len(times) > 1 else times * 4
    return {"ms": statistics.median(times), "ms_p20": qs[0], "ms_p80": qs[-1], "extra_mib": None}


def flops(n: int, m: int, d: int, mode: str, loss: str = "clip") -> float:
    """FLOPs of one call: 2NMD per score matrix forward, 8NMD with backward (two for non-local CLIP)."""
    matrices = 1 if n == m or loss == "sigmoid" else 2
    return matrices * (2 if mode == "fwd" else 8) * n * m * d


def dense_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int) -> float | None:
    """Measured dense matmul rate (size^3, input dtype): the yardstick for the targets."""
    if device.type != "cuda":
        return None
    import triton.testing

    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    ms = triton.testing.do_bench(lambda: a @ b, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return 2 * size**3 / (ms * 1e-3) / 1e12


def run_case(loss_name, provider, loss, shape, mode, dtype, device, reps) -> dict:
    """Time one (loss, provider, shape, mode) case; returns its row, with ``error`` on failure."""
    n, m, d = shape
    row = {
        "loss": loss_name,
        "provider": provider,
        "N": n,
        "M": m,
        "D": d,
        "mode": mode,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if provider == "compile":
        # A fresh compile per case. Reused across shapes, dynamo turns the function dynamic at the
        # second shape and runs it eagerly past its recompile limit: a weaker baseline than a user
        # who compiles for one shape gets.
        torch._dynamo.reset()
    try:
        img, txt, img_all, txt_all, scale, offset = make_inputs(n, m, d, dtype, device)
        leaves = [t for t in {id(t): t for t in (img, txt, img_all, txt_all, scale)}.values()]

        def fn():
            out = loss(img, txt, img_all, txt_all, scale, offset)
            if mode == "fwd+bwd":
                out.backward()
            return out

        if mode == "fwd":
            with torch.no_grad():
                row.update(measure(fn, [], device.type == "cuda", reps))
        else:
            row.update(measure(fn, leaves, device.type == "cuda", reps))
        row["tflops"] = flops(n, m, d, mode, loss_name) / (row["ms"] * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # one failing provider must not lose the other rows
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown_table(rows: list[dict]) -> str:
    """The benchmark rows as a markdown table."""
    head = (
        "| loss | N | M | D | mode | provider | median ms (p20-p80) | TFLOP/s | extra MiB |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            # A "|" (a shell pipeline, a regex) or a newline (a compiler's log) in the message ended
            # the cell or the row, and shifted every column after it
            cells = [md_cell(r["error"]), "-", "-"]
        else:
            mem = "-" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
            cells = [f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})", f"{r['tflops']:.3g}", mem]
        lines.append(
            f"| {r.get('loss', 'clip')} | {r['N']} | {r['M']} | {r['D']} | {r['mode']} | {r['provider']} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """TFLOP/s per shape, one panel per (loss, mode); written even when no row succeeded."""
    try:
        import matplotlib
    except ImportError:  # a GPU host may lack it: the JSON (written first) holds every figure
        print(f"no figure {path}: matplotlib is not installed (pip install matplotlib)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.get("loss", "clip"), r["mode"]) for r in rows}) or [("clip", "fwd")]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (loss, mode) in zip(axes[0], panels):
        drawn = False
        for provider in PROVIDERS:
            pts = [
                r
                for r in rows
                if r["mode"] == mode
                and r["provider"] == provider
                and r.get("loss", "clip") == loss
                and "error" not in r
            ]
            if pts:
                drawn = True
                ax.plot(
                    [f"{r['N']}x{r['M']}x{r['D']}" for r in pts],
                    [r["tflops"] for r in pts],
                    "o-",
                    label=provider,
                )
        ax.set_title(f"{loss} {mode}")
        ax.set_ylabel("TFLOP/s")
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        if drawn:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no successful rows", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """Parse ``--shapes`` (comma-separated NxMxD) into (N, M, D) tuples."""
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--shapes wants NxMxD items such as 32768x32768x768; got {item!r}")
        n, m, d = (int(p) for p in parts)
        # N local rows against M >= N gathered columns: N > M (M and N swapped) or a zero ran as
        # an error row per provider whose message (a label offset, a CE target) named neither.
        if min(n, m, d) < 1 or n > m:
            raise SystemExit(
                f"--shapes {item}: N, M and D must be >= 1 and N <= M (N local rows against M "
                "gathered columns, e.g. 4096x32768x768)"
            )
        shapes.append((n, m, d))
    return shapes


def choice_list(ap: argparse.ArgumentParser, flag: str, text: str, known: tuple[str, ...]) -> list[str]:
    """A comma list of ``known`` names; anything else is one usage line. A mode other than
    ``fwd`` was timed as the forward alone and its TFLOP/s counted as forward+backward (4x too
    high), and an unknown loss or provider was silently left out of the sweep."""
    chosen = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        ap.error(f"{flag} {text!r}: choose from {','.join(known)}")
    return chosen


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m kernels.bench``; returns the result written to ``--out``."""
    # prog: argparse named the file ("usage: bench.py"), which cannot be typed to run it.
    ap = argparse.ArgumentParser(prog="python -m kernels.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out", help="directory for bench_kernels.json/.png")
    ap.add_argument(
        "--quick", action="store_true", help="tiny shapes, runs on CPU in seconds (harness smoke test)"
    )
    ap.add_argument("--shapes", default=None, help="comma-separated NxMxD (default: the full sweep)")
    ap.add_argument("--losses", default=",".join(LOSSES))
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (GPU uses do_bench)")
    ap.add_argument(
        "--backward-schedule",
        default=None,
        choices=["auto", "one_pass", "two_pass"],
        help="force the backward schedule (sets KERNELS_BACKWARD_SCHEDULE; default: auto)",
    )
    ap.add_argument(
        "--autotune",
        action="store_true",
        help="sweep tile configs first and write tuned_configs.json to --out (then used by this run)",
    )
    ap.add_argument(
        "--candidates",
        default=None,
        help="autotune candidates 'BM,BN,BD,warps,stages;...' (default: a GPU list, or the one "
        "interpreter config on CPU)",
    )
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and not args.quick:
        raise SystemExit("No CUDA device: the full sweep needs a GPU; use --quick to smoke-test on CPU.")
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU smoke test: bf16 matmuls are slow and the interpreter upcasts anyway
    if args.backward_schedule:
        os.environ["KERNELS_BACKWARD_SCHEDULE"] = args.backward_schedule
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK if args.quick else SQUARE + GATHERED)
    modes = choice_list(ap, "--modes", args.modes, MODES)
    losses = choice_list(ap, "--losses", args.losses, LOSSES)
    providers = choice_list(ap, "--providers", args.providers, PROVIDERS)
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": "cuda"
        if device.type == "cuda"
        else ("triton-interpreter" if interpreting() else "torch-fallback"),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "backward_schedule": os.environ.get("KERNELS_BACKWARD_SCHEDULE", "auto"),
        "flop_convention": "per N x M matrix: 2NMD fwd, 8NMD fwd+bwd; square clip and sigmoid = 1 matrix, "
        "gathered clip = 2",
        "dense_matmul_tflops_8192": None,
        "rows": [],
        "partial": True,  # until every case has run: a run cut short (SIGTERM, a crash) says so
        **provenance(
            "python -m kernels.bench " + " ".join(sys.argv[1:] if argv is None else argv),
            ("torch", "triton", "inf_cl", "inf-cl"),
        ),
    }
    # A time limit (`timeout`, as launch/gpu_bench.sh sets) stops the run with SIGTERM: leave
    # through the `finally` below, which writes what was measured, instead of dying without it.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        # First: the yardstick of the 55% target takes a second, and a run cut short needs it.
        result["dense_matmul_tflops_8192"] = dense_matmul_tflops(device, dtype, 8192)
        if args.autotune:
            from kernels.bench_autotune import autotune

            result["autotune"] = autotune(shapes, losses, dtype, device, out, args.candidates, args.reps)
            os.environ["KERNELS_TILE_CONFIGS"] = str(out / "tuned_configs.json")
        _run_rows(result["rows"], shapes, modes, losses, providers, dtype, device, args.reps)
        result["partial"] = False
    finally:  # a crash part-way still leaves what was measured, and its verdicts
        signal.signal(signal.SIGTERM, previous_handler)
        result["targets"] = targets(result["rows"], result["dense_matmul_tflops_8192"])
        (out / "bench_kernels.json").write_text(json.dumps(result, indent=1))
        plot(result["rows"], out / "bench_kernels.png")
    dense = result["dense_matmul_tflops_8192"]
    print(
        f"\n{result['device']} ({result['backend']}), {result['dtype']}, {result['date']}, "
        f"dense matmul: {'-' if dense is None else f'{dense:.0f} TFLOP/s'}\n"
    )
    print(markdown_table(result["rows"]))
    print("\n" + format_verdicts(result["targets"]))
    return result


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def exit_code(result: dict) -> int:
    """1 when the run was cut short or a case failed to run (an error other than out of memory
    or a provider that is not installed: both are rows the verdicts judge); 0 otherwise, whatever
    the verdicts say (a missed target is a measurement, not a failure to measure)."""
    errored = [r for r in result["rows"] if r.get("error") not in (None, "OOM", "not installed")]
    return 1 if result["partial"] or errored else 0


def _run_rows(rows, shapes, modes, losses, providers, dtype, device, reps) -> None:
    fns = loss_fns(losses, compile_too=device.type == "cuda")
    for shape in shapes:
        for loss_name in losses:
            for mode in modes:
                for provider in providers:
                    if (loss_name, provider) not in fns:
                        continue
                    fn = fns[(loss_name, provider)]
                    if fn is None:
                        rows.append(
                            {
                                "loss": loss_name,
                                "provider": provider,
                                "N": shape[0],
                                "M": shape[1],
                                "D": shape[2],
                                "mode": mode,
                                "error": "not installed",
                            }
                        )
                    else:
                        rows.append(run_case(loss_name, provider, fn, shape, mode, dtype, device, reps))
                    print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    sys.exit(exit_code(main()))
