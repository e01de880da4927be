"""The issue's speed and memory targets, judged on the rows one benchmark run measured.

Each target gets a verdict: ``PASS`` only when every row it needs was measured without
error and meets it; ``FAIL`` when a row is missing or errored (nothing is assumed or
extrapolated) or when the figure misses the target; ``NOT MEASURED`` when a ratio target's
baseline could not run here (out of memory, not installed) or its yardstick was not measured
(the dense rate on CPU): there is no ratio to judge, so neither a pass nor a fail, and the
detail says which. Until 2026-12-07 an inf_cl row out of memory failed the ">= 2x inf_cl"
target while a torch.compile row out of memory passed "no slower than" for ours. Pure Python
over the row dicts of ``kernels.bench`` (keys: loss, provider, N, M, D, mode, ms, extra_mib,
tflops, error).
"""

from __future__ import annotations

TARGET_SHAPE = (32768, 32768, 768)
DENSE_FRACTION = 0.55  # of the dense bf16 matmul rate measured in the same run
MAX_EXTRA_MIB = 64
MIN_SPEEDUP_INF_CL = 2.0
MIN_D = 512  # "no slower than torch.compile at every benchmarked shape with D >= 512"
NOT_MEASURED = "NOT MEASURED"
COULD_NOT_RUN = ("OOM", "not installed")
"""A baseline row's errors that are this machine's limits, not a broken run: no ratio, no verdict."""


def _find(rows: list[dict], loss: str, provider: str, shape: tuple[int, int, int], mode: str) -> dict | None:
    for r in rows:
        if (r.get("loss", "clip"), r["provider"], r["N"], r["M"], r["D"], r["mode"]) == (
            loss,
            provider,
            *shape,
            mode,
        ):
            return r
    return None


def _usable(row: dict | None, what: str) -> tuple[dict | None, str | None]:
    """The row if it was measured, else the reason it cannot be judged."""
    if row is None:
        return None, f"{what}: row missing"
    if "error" in row:
        return None, f"{what}: {row['error']}"
    return row, None


def _verdict(name: str, ok: bool, detail: str) -> dict:
    return {"target": name, "verdict": "PASS" if ok else "FAIL", "detail": detail}


def _not_measured(name: str, detail: str) -> dict:
    return {"target": name, "verdict": NOT_MEASURED, "detail": detail}


def _could_not_run(row: dict | None) -> bool:
    """A baseline row that ran and could not fit or was not there to run (not a crash, not missing)."""
    return row is not None and row.get("error") in COULD_NOT_RUN


def _shape_str(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


def _dense_target(rows: list[dict], dense: float | None) -> dict:
    name = f"clip fwd+bwd at {_shape_str(TARGET_SHAPE)} >= {DENSE_FRACTION:.0%} of dense matmul"
    ours, why = _usable(_find(rows, "clip", "ours", TARGET_SHAPE, "fwd+bwd"), "ours")
    if ours is None:
        return _verdict(name, False, why)
    if not dense:
        return _not_measured(name, "dense matmul rate not measured (CPU run)")
    frac = ours["tflops"] / dense
    return _verdict(name, frac >= DENSE_FRACTION, f"{ours['tflops']:.0f} of {dense:.0f} TFLOP/s = {frac:.0%}")


def _memory_target(rows: list[dict]) -> dict:
    name = f"clip fwd+bwd at {_shape_str(TARGET_SHAPE)} extra memory <= {MAX_EXTRA_MIB} MiB"
    ours, why = _usable(_find(rows, "clip", "ours", TARGET_SHAPE, "fwd+bwd"), "ours")
    if ours is None or ours.get("extra_mib") is None:
        return _verdict(name, False, why or "memory not measured (CPU run)")
    return _verdict(name, ours["extra_mib"] <= MAX_EXTRA_MIB, f"{ours['extra_mib']:.1f} MiB")


def _inf_cl_target(rows: list[dict]) -> dict:
    name = f"clip fwd+bwd at {_shape_str(TARGET_SHAPE)} >= {MIN_SPEEDUP_INF_CL:g}x faster than inf_cl"
    ours, why = _usable(_find(rows, "clip", "ours", TARGET_SHAPE, "fwd+bwd"), "ours")
    inf_row = _find(rows, "clip", "inf_cl", TARGET_SHAPE, "fwd+bwd")
    inf, why_inf = _usable(inf_row, "inf_cl")
    if ours is None:
        return _verdict(name, False, why)
    if _could_not_run(inf_row):
        return _not_measured(name, f"{why_inf}, so no ratio to judge (the baseline could not run)")
    if inf is None:
        return _verdict(name, False, why_inf)
    speedup = inf["ms"] / ours["ms"]
    return _verdict(
        name, speedup >= MIN_SPEEDUP_INF_CL, f"{speedup:.2f}x ({inf['ms']:.2f} vs {ours['ms']:.2f} ms)"
    )


def _no_slower_target(rows: list[dict], loss: str, baseline: str) -> dict:
    """ours <= baseline time at every (shape, mode) with D >= MIN_D that either side measured.

    Every such pair needs both rows: a missing or errored row of either side fails the target
    (a sweep cut short, or a baseline that crashed, proves nothing). A baseline that could not run
    where ours ran (out of memory, not installed) leaves its pair not measured: the target is
    NOT MEASURED unless another pair fails it, and the detail names the pairs.
    """
    name = f"{loss}: no slower than {baseline} at every shape with D >= {MIN_D}"
    pairs = sorted(
        {
            (r["N"], r["M"], r["D"], r["mode"])
            for r in rows
            if r.get("loss", "clip") == loss and r["provider"] in ("ours", baseline) and r["D"] >= MIN_D
        }
    )
    if not any(r.get("loss", "clip") == loss and r["provider"] == baseline and r["D"] >= MIN_D for r in rows):
        return _verdict(name, False, f"no {baseline} rows with D >= {MIN_D}")
    bad, unmeasured, checked = [], [], 0
    for n, m, d, mode in pairs:
        shape = (n, m, d)
        label = f"{_shape_str(shape)} {mode}"
        ours, why = _usable(_find(rows, loss, "ours", shape, mode), "ours")
        base = _find(rows, loss, baseline, shape, mode)
        if ours is None:
            bad.append(f"{label} ({why})")
            continue
        if base is None:
            bad.append(f"{label} ({baseline}: row missing)")
            continue
        if _could_not_run(base):
            unmeasured.append(f"{label} ({baseline}: {base['error']})")
            continue
        if "error" in base:
            bad.append(f"{label} ({baseline}: {base['error']})")
            continue
        checked += 1
        if ours["ms"] > base["ms"]:
            bad.append(f"{label} ({ours['ms']:.3f} vs {base['ms']:.3f} ms)")
    skipped = f"; not measured (the baseline could not run): {'; '.join(unmeasured)}" if unmeasured else ""
    if bad:
        return _verdict(name, False, "; ".join(bad) + skipped)
    if unmeasured:
        return _not_measured(name, f"{checked} shape/mode pairs no slower{skipped}")
    return _verdict(name, True, f"{checked} shape/mode pairs")


def _sigmoid_memory_target(rows: list[dict]) -> dict:
    name = f"sigmoid fwd+bwd extra memory <= {MAX_EXTRA_MIB} MiB at every shape"
    ours = [
        r for r in rows if r.get("loss") == "sigmoid" and r["provider"] == "ours" and r["mode"] == "fwd+bwd"
    ]
    if not ours:
        return _verdict(name, False, "no sigmoid rows")
    bad = []
    for r in ours:
        label = _shape_str((r["N"], r["M"], r["D"]))
        if "error" in r or r.get("extra_mib") is None:
            bad.append(f"{label} ({r.get('error', 'memory not measured')})")
        elif r["extra_mib"] > MAX_EXTRA_MIB:
            bad.append(f"{label} ({r['extra_mib']:.1f} MiB)")
    return _verdict(name, not bad, "; ".join(bad) or f"{len(ours)} shapes")


def targets(rows: list[dict], dense: float | None) -> list[dict]:
    """One verdict per target of issue 14 (see the module docstring)."""
    return [
        _dense_target(rows, dense),
        _memory_target(rows),
        _inf_cl_target(rows),
        _no_slower_target(rows, "clip", "compile"),
        _no_slower_target(rows, "sigmoid", "eager"),
        _sigmoid_memory_target(rows),
    ]


def format_verdicts(verdicts: list[dict]) -> str:
    """``PASS|FAIL|NOT MEASURED  target: detail`` lines."""
    return "\n".join(f"{v['verdict']}  {v['target']}: {v['detail']}" for v in verdicts)
