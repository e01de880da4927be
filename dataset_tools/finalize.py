"""``finalize DIR``: the sample counts open_clip reads and a manifest of complete shards.

``sizes.json`` (``{"00000.tar": n}``) and ``__len__`` (total) are what open_clip's
``get_dataset_size`` looks for. img2dataset's own resume globs ``*.json`` and chokes on
``sizes.json``; our ``build`` only treats ``NNNNN_stats.json`` as shard markers, so a later
resume still works, and ``finalize`` can simply be run again after it.
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from dataset_tools import plan as plan_mod
from dataset_tools import shards
from dataset_tools.reshard import note_tars_not_named_as_shards, refuse_broken_shards


def finalize(folder: str) -> dict:
    """Write sizes.json, __len__ and manifest.json; returns the manifest.

    Refuses (SystemExit naming the shard) when a complete shard's tar is truncated or holds
    another number of samples than its stats say: sizes.json would otherwise promise samples
    that are not there.
    """
    shards.require_shards(folder)
    sizes, entries, total, problems = {}, [], 0, []
    for _shard_id, name in sorted(shards.complete_shards(folder).items()):
        with open(os.path.join(folder, f"{name}_stats.json")) as f:
            stats = json.load(f)
        problem = shards.stats_problem(name, stats) or shards.tar_problem(
            os.path.join(folder, f"{name}.tar"), stats["successes"]
        )
        if problem:
            problems.append((name, problem))
            continue
        sizes[f"{name}.tar"] = stats["successes"]
        total += stats["successes"]
        entries.append({"shard": f"{name}.tar", "samples": stats["successes"], "rows": stats["count"]})
    refuse_broken_shards(folder, "finalize", problems)
    misnamed = note_tars_not_named_as_shards(folder, "finalize")  # "incomplete" says not why
    all_tars = sorted({f for f in os.listdir(folder) if f.endswith(".tar")} | set(misnamed))
    all_tars = sorted(set(all_tars) | set(_note_planned_shards_not_built(folder, sizes)))
    manifest = {
        "shards": entries,
        "num_samples": total,
        "incomplete": [t for t in all_tars if t not in sizes],
        "brace": _brace(list(sizes)),
    }
    shards.atomic_write_bytes(os.path.join(folder, "sizes.json"), json.dumps(sizes, indent=2).encode())
    shards.atomic_write_bytes(os.path.join(folder, "__len__"), f"{total}\n".encode())
    shards.atomic_write_bytes(os.path.join(folder, "manifest.json"), json.dumps(manifest, indent=2).encode())
    return manifest


def _note_planned_shards_not_built(folder: str, sizes: dict) -> list[str]:
    """The tars the build plan in ``folder`` names that are not complete (``NNNNN.tar``), said in
    one stderr line. A build stopped (or exited 2) before its last shards wrote no tar for them:
    the manifest called nothing incomplete and the brace named fewer videos than the input, without
    a word. A folder without a plan (split's, dedup's, img2dataset's) has nothing to compare."""
    path = plan_mod.plan_path(folder)
    if not os.path.exists(path):
        return []
    try:
        planned = set(pq.read_table(path, columns=["shard_id"]).column("shard_id").to_pylist())
    except (pa.ArrowException, OSError, KeyError) as err:
        print(
            f"[dataset_tools] finalize: {path} does not read ({str(err).splitlines()[0]}), so planned "
            "shards not built yet cannot be named; the manifest lists the complete shards only",
            file=sys.stderr,
        )
        return []
    missing = [f"{shards.shard_name(sid)}.tar" for sid in sorted(planned)]
    missing = [name for name in missing if name not in sizes]
    if missing:
        print(
            f"[dataset_tools] finalize: {len(missing)} of the {len(planned)} shards the build planned "
            f"are not built: {' '.join(missing[:10])}{' ...' if len(missing) > 10 else ''}; they are "
            "left out of sizes.json and the brace (listed in the manifest's incomplete). Run the same "
            "build again to build them, then finalize again.",
            file=sys.stderr,
        )
    return missing


def _brace(names: list[str]) -> str:
    """A shard spec naming exactly ``names`` (sorted by number): ``{00000..00003}.tar`` when the
    shards are contiguous and of one width, else such runs joined by ``::``. A brace range pads
    every number to the width of its ends, so past shard 99999 (``100000.tar``, five-digit
    padding overflowing) ``{00000..100000}.tar`` named ``000000.tar``...: not one existing shard."""
    runs: list[list[str]] = []
    for stem in (n[:-4] for n in names):
        last = runs[-1][-1] if runs else None
        if last is not None and len(stem) == len(last) and int(stem) == int(last) + 1:
            runs[-1].append(stem)
        else:
            runs.append([stem])
    return "::".join(f"{{{run[0]}..{run[-1]}}}.tar" if len(run) > 1 else f"{run[0]}.tar" for run in runs)
