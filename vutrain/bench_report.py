"""Report of `python -m vutrain.bench --compare open_clip`: table, ratios, targets, JSON and PNG.

Rows and searches are plain dicts (see vutrain/bench_compare.py); ratios are always over open_clip's
default step (no gradient checkpointing), the reference the issue's targets are set against.
"""

from __future__ import annotations

import json
import os

TARGET_SPEEDUP = 1.1
"""vutrain's samples/s over open_clip's at batch 256 and 1024 (issue 9)."""
TARGET_BATCH_RATIO = 2.0
"""vutrain's largest batch per GPU over open_clip's (issue 9)."""
TARGET_BATCHES = (256, 1024)
TABLE_HEAD = (
    "| configuration | batch | samples/s | peak GiB | x open_clip | host reads/step |\n"
    "|---|---|---|---|---|---|"
)
BASELINE_LABEL = "open_clip"
"""The configuration every ratio is taken against: open_clip's step as it ships."""


def md_cell(text: object) -> str:
    """``text`` as one markdown table cell: an error message's ``|`` (a shell pipeline, a regex) or
    newline (a compiler's log) ended the cell, or the row, and shifted every figure after it."""
    return " ".join(str(text).replace("|", "\\|").split())


def format_row(row: dict) -> str:
    """One markdown table row of a speed measurement (or its error)."""
    if "error" in row:
        return f"| {md_cell(row['variant'])} | {row['batch_size']} | {md_cell(row['error'])} | | | |"
    mem = "n/a (CPU)" if row.get("peak_memory_gib") is None else f"{row['peak_memory_gib']:.2f}"
    ratio = row.get("ratio_to_open_clip")
    return (
        f"| {row['variant']} | {row['batch_size']} | {row['samples_per_s']:.1f} | {mem} | "
        f"{'' if ratio is None else f'{ratio:.2f}x'} | {row.get('host_reads_per_step', '')} |"
    )


def add_ratios(rows: list[dict], largest: list[dict]) -> None:
    """Each row's samples/s (and each largest batch) over open_clip's default step's."""
    base = {
        r["batch_size"]: r["samples_per_s"]
        for r in rows
        if r["variant"] == BASELINE_LABEL and "error" not in r
    }
    for row in rows:
        if "error" not in row and row["batch_size"] in base:
            row["ratio_to_open_clip"] = row["samples_per_s"] / base[row["batch_size"]]
    base_largest = next(
        (r["largest_batch"] for r in largest if r["variant"] == BASELINE_LABEL and r.get("largest_batch")),
        None,
    )
    for entry in largest:
        if base_largest and entry.get("largest_batch") is not None:
            entry["ratio_to_open_clip"] = entry["largest_batch"] / base_largest


def _missing(target: str, why: str) -> dict:
    """A target that could not be judged: said so, never left out (a report of passes only would
    read as all green)."""
    return {"target": target, "value": None, "by": None, "result": f"MISSING ({why})"}


def _baseline(rows: list[dict], size: int, compiled: bool) -> dict | None:
    """open_clip's step without checkpointing at ``size``, compiled or as it ships."""
    return next(
        (
            r
            for r in rows
            if r["side"] == "open_clip"
            and bool(r.get("compiled")) == compiled
            and not r.get("grad_ckpt")
            and r["batch_size"] == size
        ),
        None,
    )


def _speed_target(rows: list[dict], size: int, compiled: bool, base_compiled: bool, target: str) -> dict:
    """Best vutrain row (``compiled`` or not) at ``size`` over open_clip's baseline row."""
    base = _baseline(rows, size, base_compiled)
    ours = [
        r
        for r in rows
        if r["side"] == "vutrain" and r["batch_size"] == size and bool(r.get("compiled")) == compiled
    ]
    if base is None or "error" in base:
        return _missing(target, f"open_clip: {base['error'] if base else 'row missing'}")
    measured = [r for r in ours if "error" not in r]
    if not measured:
        return _missing(target, f"vutrain: {ours[0]['error'] if ours else 'row missing'}")
    best = max(measured, key=lambda r: r["samples_per_s"])
    ratio = best["samples_per_s"] / base["samples_per_s"]
    return {
        "target": target,
        "value": round(ratio, 3),
        "by": best["variant"],
        "result": "PASS" if ratio >= TARGET_SPEEDUP else "FAIL",
        "precision": f"vutrain {best.get('precision')} vs open_clip {base.get('precision')}",
    }


def judge_targets(rows: list[dict], largest: list[dict], on_gpu: bool) -> list[dict]:
    """The issue's targets, each PASS/FAIL (or MISSING: not judged, with the reason) with the
    figures it was judged on (GPU runs only).

    Speed is judged like for like: vutrain as it ships against open_clip as it ships, and, when
    the run compiled, compiled vutrain against open_clip's --torchcompile step. Compiled vutrain
    over open_clip as it ships is shown for information only.
    """
    if not on_gpu:
        return []
    targets = []
    any_compiled = any(r.get("compiled") for r in rows)
    for size in TARGET_BATCHES:
        name = f"samples/s at batch {size} >= {TARGET_SPEEDUP}x open_clip"
        if not any(r["batch_size"] == size for r in rows):
            targets.append(_missing(name, f"batch {size} not run"))
            continue
        targets.append(_speed_target(rows, size, False, False, name))
        if any_compiled:
            targets.append(_speed_target(rows, size, True, True, f"{name}, both compiled"))
            info = _speed_target(
                rows,
                size,
                True,
                False,
                f"samples/s at batch {size}, vutrain compiled vs open_clip as it ships",
            )
            info["target"] += " (information)"
            info["result"] = "INFO " + info["result"]
            targets.append(info)
    base = next((r for r in largest if r["variant"] == BASELINE_LABEL), None)
    vutrain = [r for r in largest if r["side"] == "vutrain"]
    name = f"largest batch >= {TARGET_BATCH_RATIO}x open_clip's"
    target = judge_largest(base, vutrain, name)
    if target is None:
        why = (
            "not searched"
            if not largest
            else ("open_clip" if not (base and base.get("largest_batch")) else "vutrain")
        )
        target = _missing(name, why if why == "not searched" else f"no largest batch found for {why}")
    targets.append(target)
    # Like for like: gradient checkpointing trades speed for memory on either side, so the
    # checkpointed configurations are also set against open_clip's checkpointed step. Shown for
    # information: the target is against open_clip as it ships (above).
    base_ckpt = next((r for r in largest if r["side"] == "open_clip" and r.get("grad_ckpt")), None)
    ours_ckpt = [r for r in vutrain if r.get("grad_ckpt")]
    like = judge_largest(
        base_ckpt, ours_ckpt, "largest batch, both with gradient checkpointing (information)"
    )
    if like:
        like["result"] = "INFO " + like["result"]
        targets.append(like)
    return targets


def _cut_short(entry: dict) -> bool:
    """The search did not reach its configuration's limit (or never ran: skipped at the deadline
    or after a phase-1 failure): its largest batch is a lower bound, or unknown."""
    return bool(entry.get("capped") or entry.get("stopped") or entry.get("error") or entry.get("skipped"))


def judge_largest(base: dict | None, ours: list[dict], target: str) -> dict | None:
    """vutrain's best largest batch over ``base``'s (PASS/FAIL/UNDECIDED), or None when a side
    has no figure."""
    found = [r for r in ours if r.get("largest_batch")]
    if not (base and found and base.get("largest_batch")):
        return None
    best = max(found, key=lambda r: r["largest_batch"])
    ratio = best["largest_batch"] / base["largest_batch"]
    if _cut_short(base):  # open_clip's own limit was not reached
        result = "UNDECIDED (open_clip's largest batch not reached: --max-batch, --deadline-min or an error)"
    elif ratio >= TARGET_BATCH_RATIO:
        result = "PASS"
    else:
        # Not only the best: any vutrain search that did not finish may hide a larger batch
        # (with a deadline, the checkpointed searches come last and are the ones cut).
        unfinished = [r["variant"] for r in ours if _cut_short(r)]
        result = (
            f"UNDECIDED (vutrain's search was cut short: {', '.join(unfinished)})" if unfinished else "FAIL"
        )
    return {"target": target, "value": round(ratio, 3), "by": best["variant"], "result": result}


def write_png(path: str, rows: list[dict], largest: list[dict], title: str) -> None:
    """Samples/s per configuration and batch size, and the largest batch of each, as one figure."""
    try:
        import matplotlib
    except ImportError:  # a GPU host may lack it: the JSON (written first) holds every figure
        print(f"no figure {path}: matplotlib is not installed (pip install matplotlib)", flush=True)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["variant"] for r in rows))
    sizes = sorted({r["batch_size"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / max(1, len(sizes))
    for k, size in enumerate(sizes):
        values = [
            next(
                (
                    r.get("samples_per_s", 0.0)
                    for r in rows
                    if r["variant"] == lab and r["batch_size"] == size
                ),
                0.0,
            )
            for lab in labels
        ]
        ax1.bar([i + k * width for i in range(len(labels))], values, width, label=f"batch {size}")
    ax1.set_xticks([i + width * (len(sizes) - 1) / 2 for i in range(len(labels))])
    ax1.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax1.set_ylabel("samples/s")
    ax1.legend(fontsize=8)
    ax1.set_title("training step throughput")
    found = [r for r in largest if r.get("largest_batch") is not None]
    ax2.bar(
        range(len(found)),
        [r["largest_batch"] for r in found],
        color=["tab:gray" if r["side"] == "open_clip" else "tab:blue" for r in found],
    )
    ax2.set_xticks(range(len(found)))
    ax2.set_xticklabels(
        [r["variant"] + (" (cap)" if r.get("capped") else "") for r in found],
        rotation=35,
        ha="right",
        fontsize=8,
    )
    ax2.set_ylabel("largest batch that trains")
    ax2.set_title("largest batch" if found else "largest batch: not searched")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict | list, out: str) -> None:
    """Write the result as JSON to ``out`` (creating its folder), through a temporary file: it is
    rewritten after every configuration, and a run killed mid-write (``timeout -k``, the GPU
    host's time limit) or an error half-way left a cut file that lost every earlier row."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def report(result: dict, out: str, png: str) -> None:
    """Print the tables, then write the JSON and the PNG."""
    precisions = {}
    for row in result["rows"]:
        precisions.setdefault(row["side"], row.get("precision"))
    print("\nprecision: " + ", ".join(f"{side} {p}" for side, p in precisions.items()))
    print(TABLE_HEAD)
    for row in result["rows"]:
        print(format_row(row))
    if result["largest"]:
        print("\n| configuration | largest batch | x open_clip | probes |\n|---|---|---|---|")
        for entry in result["largest"]:
            if entry.get("skipped"):
                print(f"| {md_cell(entry['variant'])} | skipped: {md_cell(entry['skipped'])} | | |")
                continue
            ratio = entry.get("ratio_to_open_clip")
            shown = (
                f"{entry['largest_batch']}"
                + (" (reached --max-batch)" if entry.get("capped") else "")
                + (
                    f" (search stopped at {entry.get('stopped_by', '--deadline-min')})"
                    if entry.get("stopped")
                    else ""
                )
                + (f" (at least; search failed: {md_cell(entry['error'])})" if entry.get("error") else "")
            )
            print(
                f"| {entry['variant']} | {shown} | {'' if ratio is None else f'{ratio:.2f}x'} | "
                f"{len(entry['probes'])} |"
            )
    else:
        print(f"\nlargest batch: {result['largest_note']}")
    if result["targets"]:
        print(f"\ntargets on {result['device']} (set for an H100/H200):")
        for t in result["targets"]:
            measured = "" if t["value"] is None else f" (measured {t['value']}x, {t['by']})"
            precision = f" [{t['precision']}]" if t.get("precision") else ""
            print(f"  {t['result']}: {t['target']}{measured}{precision}")
    else:
        print("\ntargets: judged on a GPU only (this run is on the CPU)")
    if result.get("teardown_error"):
        print(f"\nfigures measured in full, then the teardown failed (exit 1): {result['teardown_error']}")
    write_json(result, out)
    write_png(
        png,
        result["rows"],
        result["largest"],
        f"vutrain vs open_clip, {result['preset']}, {result['precision']}, {result['device']}, "
        f"{result['date']}",
    )
    print(f"\nwrote {out} and {png}")
