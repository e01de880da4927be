"""Benchmark of the fused contrastive losses against torch baselines.

    python -m kernels.bench [--out DIR] [--quick] [--modes fwd,fwd+bwd]
                            [--providers eager,compile,inf_cl,ours] [--shapes 32768x32768x768,...]

Providers, all computing the same loss:
- ``eager``: the open_clip-style loss in torch (materialises the logits),
- ``compile``: ``torch.compile`` of the same function,
- ``inf_cl``: the ``inf-cl`` package (``cal_flash_loss`` per direction), if installed,
- ``ours``: ``kernels.clip_loss`` (square) / ``kernels.contrastive_ce`` x 2 (gathered).

Shapes are ``NxMxD``: ``N == M`` is the square symmetric loss; ``N < M`` is the
gathered ``local_loss`` case (N local rows per direction against M gathered
columns, label offset ``M - N``, i.e. the last rank). Reported per row: median and
20/80 % quantile time (ms), achieved TFLOP/s and the peak extra memory (MiB over
what existed before the call, minus the input gradients every provider returns). FLOPs counted per N x M score matrix: 2NMD forward,
8NMD forward+backward (forward, one recompute, two gradient GEMMs); the square loss
has one matrix, the gathered loss two. A dense bf16 matmul rate is measured in the
same run as the yardstick. Writes ``bench_kernels.json`` and ``bench_kernels.png``
to ``--out`` and prints a markdown table. Numbers are measured, never estimated.

``--quick`` runs tiny shapes in a few seconds, also on CPU (Triton interpreter if
TRITON_INTERPRET=1, otherwise the torch fallback), to smoke-test the harness.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import kernels
from kernels.runtime import interpreting

SQUARE = [(n, n, d) for n in (4096, 16384, 32768, 65536) for d in (512, 768, 1024)]
GATHERED = [(4096, 32768, 768), (1024, 65536, 768)]
QUICK = [(96, 96, 64), (32, 128, 64)]
PROVIDERS = ("eager", "compile", "inf_cl", "ours")
MODES = ("fwd", "fwd+bwd")


def eager_loss(img, txt, img_all, txt_all, scale, offset):
    """open_clip's ClipLoss: logits in the input dtype, CE in both directions."""
    labels = torch.arange(img.shape[0], device=img.device) + offset
    per_image = scale * img @ txt_all.T
    per_text = scale * txt @ img_all.T
    return (F.cross_entropy(per_image, labels) + F.cross_entropy(per_text, labels)) / 2


def ours_loss(img, txt, img_all, txt_all, scale, offset):
    if img is img_all:
        return kernels.clip_loss(img, txt, scale)
    i2t = kernels.contrastive_ce(img, txt_all, scale, label_offset=offset)
    t2i = kernels.contrastive_ce(txt, img_all, scale, label_offset=offset)
    return (i2t + t2i) / 2


def inf_cl_loss_fn() -> Callable | None:
    try:
        from inf_cl import cal_flash_loss
    except Exception:
        return None

    def loss(img, txt, img_all, txt_all, scale, offset):
        labels = torch.arange(img.shape[0], device=img.device) + offset
        return (cal_flash_loss(img, txt_all, labels, scale) + cal_flash_loss(txt, img_all, labels, scale)) / 2

    return loss


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
        return {"ms": q50, "ms_p20": q20, "ms_p80": q80, "extra_mib": (peak - grad_bytes) / 2**20,
                "peak_mib": peak / 2**20, "grad_mib": grad_bytes / 2**20}
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


def flops(n: int, m: int, d: int, mode: str) -> float:
    matrices = 1 if n == m else 2
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


def run_case(provider, loss, shape, mode, dtype, device, reps) -> dict:
    n, m, d = shape
    row = {"provider": provider, "N": n, "M": m, "D": d, "mode": mode, "dtype": str(dtype).replace("torch.", "")}
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
        row["tflops"] = flops(n, m, d, mode) / (row["ms"] * 1e-3) / 1e12
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
    except Exception as e:  # one failing provider must not lose the other rows
        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def markdown_table(rows: list[dict]) -> str:
    head = "| N | M | D | mode | provider | median ms (p20-p80) | TFLOP/s | extra MiB |\n|---|---|---|---|---|---|---|---|"
    lines = [head]
    for r in rows:
        if "error" in r:
            cells = [r["error"], "-", "-"]
        else:
            mem = "-" if r["extra_mib"] is None else f"{r['extra_mib']:.0f}"
            cells = [f"{r['ms']:.3f} ({r['ms_p20']:.3f}-{r['ms_p80']:.3f})", f"{r['tflops']:.3g}", mem]
        lines.append(f"| {r['N']} | {r['M']} | {r['D']} | {r['mode']} | {r['provider']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(rows: list[dict], dense: float | None) -> list[str]:
    """The issue's targets, checked only against what this run measured."""
    def get(p, n, m, d, mode):
        for r in rows:
            if (r["provider"], r["N"], r["M"], r["D"], r["mode"]) == (p, n, m, d, mode) and "error" not in r:
                return r
        return None

    out = []
    ours = get("ours", 32768, 32768, 768, "fwd+bwd")
    if ours and dense:
        out.append(f"32k/768 fwd+bwd: {ours['tflops']:.0f} TFLOP/s = {100 * ours['tflops'] / dense:.0f}% of dense "
                   f"{dense:.0f} (target >= 55%)")
        out.append(f"32k/768 fwd+bwd extra memory: {ours['extra_mib']:.0f} MiB (target <= 64 MB)")
        inf = get("inf_cl", 32768, 32768, 768, "fwd+bwd")
        if inf:
            out.append(f"32k/768 fwd+bwd vs inf_cl: {inf['ms'] / ours['ms']:.2f}x (target >= 2x)")
    slower = [f"{r['provider']} {r['N']}x{r['M']}x{r['D']} {r['mode']}" for r in rows
              if r["provider"] in ("eager", "compile") and "error" not in r and r["D"] >= 512
              and (o := get("ours", r["N"], r["M"], r["D"], r["mode"])) and o["ms"] >= r["ms"]]
    out.append("ours faster than eager and compile everywhere measured" if not slower
               else "ours NOT faster than: " + "; ".join(slower))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(12, 4.5), squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        for provider in PROVIDERS:
            pts = [r for r in rows if r["mode"] == mode and r["provider"] == provider and "error" not in r]
            if pts:
                ax.plot([f"{r['N']}x{r['M']}x{r['D']}" for r in pts], [r["tflops"] for r in pts], "o-", label=provider)
        ax.set_title(mode)
        ax.set_ylabel("TFLOP/s")
        ax.tick_params(axis="x", rotation=70, labelsize=7)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    shapes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise SystemExit(f"--shapes wants NxMxD items such as 32768x32768x768; got {item!r}")
        shapes.append(tuple(int(p) for p in parts))
    return shapes


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench_out", help="directory for bench_kernels.json/.png")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, runs on CPU in seconds (harness smoke test)")
    ap.add_argument("--shapes", default=None, help="comma-separated NxMxD (default: the full sweep)")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions on CPU (GPU uses do_bench)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu" and not args.quick:
        raise SystemExit("No CUDA device: the full sweep needs a GPU; use --quick to smoke-test on CPU.")
    if device.type == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # CPU smoke test: bf16 matmuls are slow and the interpreter upcasts anyway
    shapes = parse_shapes(args.shapes) if args.shapes else (QUICK if args.quick else SQUARE + GATHERED)
    modes = [m for m in args.modes.split(",") if m]
    losses = {"eager": eager_loss, "ours": ours_loss, "inf_cl": inf_cl_loss_fn()}
    if device.type == "cuda" or not args.quick:
        losses["compile"] = torch.compile(eager_loss)
    rows = []
    for shape in shapes:
        for mode in modes:
            for provider in args.providers.split(","):
                if provider not in losses:
                    continue
                if losses[provider] is None:
                    rows.append({"provider": provider, "N": shape[0], "M": shape[1], "D": shape[2],
                                 "mode": mode, "error": "not installed"})
                    continue
                rows.append(run_case(provider, losses[provider], shape, mode, dtype, device, args.reps))
                print(json.dumps(rows[-1]), flush=True)
    dense = dense_matmul_tflops(device, dtype, 8192)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backend": "cuda" if device.type == "cuda" else ("triton-interpreter" if interpreting() else "torch-fallback"),
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "dense_matmul_tflops_8192": dense,
        "flop_convention": "per N x M matrix: 2NMD fwd, 8NMD fwd+bwd; square=1 matrix, gathered=2",
        "rows": rows,
    }
    result["targets"] = targets(rows, dense) if device.type == "cuda" else ["unmeasured: no GPU in this run"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_kernels.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "bench_kernels.png")
    print(f"\n{result['device']} ({result['backend']}), {result['dtype']}, {result['date']}, "
          f"dense matmul: {'-' if dense is None else f'{dense:.0f} TFLOP/s'}\n")
    print(markdown_table(rows))
    print("\n" + "\n".join(result["targets"]))
    return result


if __name__ == "__main__":
    main()
