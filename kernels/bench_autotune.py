"""``python -m kernels.bench --autotune``: time candidate tile configs per kernel and
shape class on this device and write the winners as a tuned table
(``kernels.tile_configs.write_tuned``), which later runs read through
``KERNELS_TILE_CONFIGS``.

Per loss, the forward kernel is swept first (forward-only timings), then the gradient
kernel with the forward fixed at its winner (forward + backward timings). A class's
winner has the least total time over the benchmarked shapes of that class. Candidates
that fail to compile or run count as not eligible (their error is recorded). Under
the Triton interpreter the default candidate list is the one interpreter config: its
timings say nothing about a GPU, and Triton's own autotuner cannot run there with more
than one config.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
from pathlib import Path

import torch

from kernels import tile_configs
from kernels.runtime import interpreting
from kernels.tile_configs import Entry, TileConfig

GPU_CANDIDATES = [
    TileConfig(128, 128, 32, 8, 3),
    TileConfig(128, 128, 64, 8, 3),
    TileConfig(128, 128, 64, 8, 4),
    TileConfig(128, 256, 64, 8, 3),
    TileConfig(128, 256, 32, 8, 3),
    TileConfig(256, 128, 64, 8, 3),
    TileConfig(64, 128, 64, 4, 3),
    TileConfig(128, 64, 64, 4, 3),
]
# (forward kind, gradient kind, the bench loss function's name) per loss.
_KINDS = {"clip": ("ce_fwd", "ce_grad", "ours_loss"), "sigmoid": ("sig_fwd", "sig_grad", "sigmoid_ours_loss")}


def parse_candidates(text: str | None) -> list[TileConfig]:
    """``"BM,BN,BD,warps,stages;..."`` to configs; None: the default list for this mode."""
    if not text:
        return (
            [tile_configs.INTERPRET_CONFIG]
            if interpreting() or not torch.cuda.is_available()
            else GPU_CANDIDATES
        )
    configs = []
    for item in text.split(";"):
        # The interpreter runs configs the GPU compiler refuses (3 warps, 24-wide blocks): such a
        # winner made a table that every later launch and sweep refused as malformed.
        try:
            configs.append(tile_configs.parse_config(item))
        except ValueError as e:
            raise SystemExit(f"--candidates {e} (configs separated by ';')") from None
    return configs


def _time(loss_fn, shape, mode, dtype, device, reps) -> float:
    from kernels.bench import run_case

    row = run_case("tune", "ours", loss_fn, shape, mode, dtype, device, reps)
    if "error" in row:
        raise RuntimeError(row["error"])
    return row["ms"]


def _sweep(kind, candidates, shapes, loss_fn, mode, dtype, device, reps, fixed) -> tuple[dict, list[dict]]:
    """Best config per shape class for ``kind`` (other kinds held at ``fixed``), and the log."""
    totals: dict[str, dict[TileConfig, float]] = {}
    log = []
    for cfg in candidates:
        for shape in shapes:
            cls = tile_configs.shape_class(shape[0], shape[1])
            try:
                with contextlib.ExitStack() as stack:
                    for k, c in {**fixed, kind: cfg}.items():
                        stack.enter_context(tile_configs.forced(k, c))
                    ms = _time(loss_fn, shape, mode, dtype, device, reps)
            except Exception as e:  # one failing candidate must not end the sweep
                ms = math.inf
                log.append(
                    {"kind": kind, "config": cfg.as_list(), "shape": list(shape), "error": str(e)[:200]}
                )
            else:
                log.append({"kind": kind, "config": cfg.as_list(), "shape": list(shape), "ms": ms})
            per_cls = totals.setdefault(cls, {})
            per_cls[cfg] = per_cls.get(cfg, 0.0) + ms
    best = {cls: min(times, key=times.get) for cls, times in totals.items() if min(times.values()) < math.inf}
    return best, log


def _existing_table(path: Path) -> dict[tile_configs.TunedKey, Entry]:
    """The rows a previous sweep wrote to ``path``: kept unless this sweep finds the same
    (arch, kernel, shape class, dtype) again, so sweeps split over several device calls (one
    shape class each, as the 10-minute limit needs, or one dtype each) add up instead of each
    erasing the last. A file that is no table stops the run before the sweep, not after it."""
    if not path.exists():
        return {}
    # Read from disk, not ``load_tuned``'s per-process cache: a process that launched kernels before
    # holds the copy it read then, and merging into that wrote back a table without the rows another
    # process added since.
    tile_configs.load_tuned.cache_clear()
    try:
        return dict(tile_configs.load_tuned(str(path)).rows)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def autotune(shapes, losses, dtype, device, out: Path, candidates_text: str | None, reps: int) -> dict:
    """Sweep, write ``out/tuned_configs.json`` (merged into the rows already there) and return a
    JSON-ready report; its ``winners`` are this sweep's."""
    from kernels import bench

    candidates = parse_candidates(candidates_text)
    on_gpu = device.type == "cuda" and not interpreting()
    arch = tile_configs.arch_of(device) if on_gpu else tile_configs.INTERPRETER_ARCH
    stamp = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    source = f"tuned: kernels.bench --autotune on {where}, {str(dtype).replace('torch.', '')}, {stamp}"
    # The card too: an RTX 4090's sm_80 winners would otherwise apply on an A100 (same rows).
    card = tile_configs.capability_of(device) if on_gpu else None
    timed_with = (tile_configs.dtype_name(dtype), tile_configs.triton_version(), card)
    path = out / "tuned_configs.json"
    table = _existing_table(path)
    entries: dict[tuple[str, str, str], Entry] = {}
    log: list[dict] = []

    def keep(key: tuple[str, str, str], cfg: TileConfig) -> None:
        # Written at once: a sweep stopped by a time limit keeps the winners it found.
        # With the dtype, Triton version and card it was timed on: launches under others skip it.
        entries[key] = table[key + (timed_with[0],)] = Entry(cfg, source, *timed_with)
        tile_configs.write_tuned(path, table)

    for loss in losses:
        fwd_kind, grad_kind, fn_name = _KINDS[loss]
        loss_fn = getattr(bench, fn_name)
        best_fwd, log_fwd = _sweep(fwd_kind, candidates, shapes, loss_fn, "fwd", dtype, device, reps, {})
        log += log_fwd
        for cls, cfg in best_fwd.items():
            keep((arch, fwd_kind, cls), cfg)
            cls_shapes = [s for s in shapes if tile_configs.shape_class(s[0], s[1]) == cls]
            best_grad, log_grad = _sweep(
                grad_kind, candidates, cls_shapes, loss_fn, "fwd+bwd", dtype, device, reps, {fwd_kind: cfg}
            )
            log += log_grad
            if cls in best_grad:
                keep((arch, grad_kind, cls), best_grad[cls])
    tile_configs.write_tuned(path, table)
    return {
        "path": str(path),
        "candidates": [c.as_list() for c in candidates],
        "winners": [
            {"arch": a, "kind": k, "shape_class": c, "config": e.config.as_list()}
            for (a, k, c), e in sorted(entries.items())
        ],
        "log": log,
    }
