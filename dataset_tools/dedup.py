"""``dedup DIR``: exact (sha256 of the downloaded bytes) and perceptual (pHash) duplicates across
different video ids (re-uploads share thumbnails), and repeats of one video id or url (plain
img2dataset does not collapse them). Reported; optionally filtered into new shards.

Perceptual matching uses the pigeonhole trick (multi-index hashing, ``_NearIndex``): two 64-bit
hashes within distance d differ in at most d // m bits of one of m bands, so only hashes that
come that close on a band are compared.
"""

from __future__ import annotations

import io
import json
import os
from itertools import combinations
from math import comb

import imagehash
import pyarrow as pa
from PIL import Image

from dataset_tools import finalize as finalize_mod
from dataset_tools import shards
from dataset_tools.inspect_shards import IMAGE_EXTS, image_member
from dataset_tools.plan import BUILD_DIR
from dataset_tools.reshard import (
    ShardSink,
    check_empty_output,
    claim_outputs,
    finish_interrupted_publish,
    input_schema,
    iter_samples,
    publish_and_finalize,
    refuse_output_holding_input,
    refuse_output_under_a_file,
    require_whole_shards,
    video_of,
)
from dataset_tools.split import refuse_bad_shard_size, skipped_shards

SAME_VIDEO = "same video"
EXACT = "exact"
PERCEPTUAL = "perceptual"
KEPT = "kept"


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the smallest key represents the group


def _link(uf: _UnionFind, reasons: dict[str, str], key: str, other: str, reason: str) -> None:
    """Join ``key`` to the earlier sample ``other`` because of ``reason``. Both ends get a reason:
    a sample that matched nothing before it yet joins a group through a later one (B between A and
    C, each within --max-distance of C only) is dropped too, and was reported as "kept"."""
    uf.union(key, other)
    if reason == EXACT:  # the strongest evidence names the match
        reasons[key] = EXACT
    reasons.setdefault(key, reason)
    reasons.setdefault(other, reason)


class _NearIndex:
    """The distinct pHash values added so far, each found again by the later ones within
    ``max_distance`` bits (Hamming) of it: exactly the pairs a comparison of every pair finds.

    The 64 bits are cut into m bands; a pair within d bits differs in at most d // m bits of one
    band, so each band's table is probed at every value within that radius of the new hash's band,
    and only the hashes found there are compared. With d + 1 bands of 12 bits (radius 0) each
    hash met n / 820 others: quadratic, ~half an hour of CPU for the million thumbnails of a crawl;
    three bands of 21 bits probed at radius 1 (67 probes) meet ~n / 31,000 (``_band_plan``)."""

    def __init__(self, max_distance: int):
        self.max_distance = max_distance
        widths, radius = _band_plan(max_distance)
        self.bands = []  # (shift, mask, the flips within radius, band value -> hashes)
        shift = 0
        for width in widths:
            flips = [
                sum(1 << bit for bit in bits)
                for r in range(radius + 1)
                for bits in combinations(range(width), r)
            ]
            self.bands.append((shift, (1 << width) - 1, flips, {}))
            shift += width

    def add(self, value: int) -> list[int]:
        """The values added before ``value`` within ``max_distance`` of it, in a fixed order; then
        ``value`` is added (once: the caller adds each distinct value once)."""
        near, seen = [], set()
        for shift, mask, flips, table in self.bands:
            band = (value >> shift) & mask
            for flip in flips:
                for other in table.get(band ^ flip, ()):
                    if other not in seen:
                        seen.add(other)
                        if _distance(value, other) <= self.max_distance:
                            near.append(other)
        for shift, mask, _, table in self.bands:
            table.setdefault((value >> shift) & mask, []).append(value)
        return near


def _distance(a: int, b: int) -> int:
    """The Hamming distance of two 64-bit pHash values (``ImageHash`` subtraction, without numpy)."""
    return (a ^ b).bit_count()


def _band_plan(max_distance: int, expected: int = 1 << 20) -> tuple[list[int], int]:
    """The band widths (64 bits in all) and the per-band radius that cost the fewest table probes
    plus expected comparisons per hash among ``expected`` uniform ones (a million thumbnails).
    Any plan finds the same pairs; this only picks the fastest (3 bands, radius 1 for d = 4)."""

    def cost(widths: list[int], radius: int) -> float:
        probes = [sum(comb(w, r) for r in range(min(radius, w) + 1)) for w in widths]
        return sum(p * (1 + expected / 2**w) for p, w in zip(probes, widths))

    plans = []
    for bands in range(1, 65):
        widths = [64 // bands + (i < 64 % bands) for i in range(bands)]
        plans.append((cost(widths, max_distance // bands), widths, max_distance // bands))
    _, widths, radius = min(plans, key=lambda plan: plan[0])
    return widths, radius


def _phash(folder: str, key: str, members: dict[str, bytes]) -> imagehash.ImageHash:
    """The sample's pHash, or a one-line SystemExit naming the sample when its image is missing or
    does not decode (it was a KeyError or OSError traceback naming neither, after minutes of hashing).
    The image is the member the trainer reads: a .png or .webp one (img2dataset --encode_format)
    was refused as "no .jpg", with a rebuild as the remedy, which wrote the same shards again."""
    image = image_member(members)
    try:
        with Image.open(io.BytesIO(members[image])) as img:
            return imagehash.phash(img)
    except Exception as err:
        why = f"has no image ({'/'.join(IMAGE_EXTS)})" if image is None else f"image does not decode ({err})"
        raise SystemExit(
            f"{folder}: sample {key} {why}. `python -m dataset_tools inspect {folder} --verify` names "
            "its shard: delete that shard's NNNNN_stats.json and run the same build again to redo it."
        ) from None


def dedup(
    folder: str,
    report_path: str | None = None,
    max_distance: int = 4,
    filter_output: str | None = None,
    shard_size: int = 1000,
) -> dict:
    """Find duplicate groups; returns the report (also written as JSON)."""
    if max_distance < 0:  # would split the hash into zero chunks (ZeroDivisionError)
        raise SystemExit(f"--max-distance {max_distance}: must be 0 (exact pHash match) or more, e.g. 4")
    if filter_output:
        refuse_bad_shard_size(shard_size)
        # `dedup data --filter-output data` was refused as "not empty ... delete this one first"
        refuse_output_holding_input(folder, filter_output, "--filter-output")
    shards.require_shards(folder)
    report_path = report_path or os.path.join(folder, BUILD_DIR, "dedup.json")
    _refuse_unwritable_outputs(report_path, filter_output)
    settings = {"input": os.path.realpath(folder), "max_distance": max_distance, "shard_size": shard_size}
    if filter_output:
        finished = _finish_interrupted_filter(filter_output, settings, report_path)
        if finished is not None:
            return finished
    # The shards hashed are the shards filtered, checked and reported: one a running build completes
    # meanwhile went into the output unchecked for duplicates, and uncounted by the report, which said
    # it was skipped; listed anew for the skipped list, it was said neither skipped nor hashed.
    names = list(shards.iter_shard_names(folder))
    require_whole_shards(folder, "dedup", names)  # a truncated tar: refused, not a short report
    skipped = skipped_shards(folder, "dedup", names)
    schema = None
    if filter_output:  # refused before the (slow) hashing, not after
        check_empty_output(filter_output)
        schema = input_schema(folder, "dedup", names)
    report = {**_find_duplicates(folder, max_distance, names), **skipped}
    # Atomic: written in place, a kill or a full disk mid-write left a truncated report. Written
    # before the filter too, so that the hashing survives a kill during it.
    shards.save_json(report_path, report, "dedup report")
    if filter_output:
        drop = {g["key"] for group in report["groups"] for g in group if g["match"] != KEPT}
        with claim_outputs([filter_output], "dedup"):  # checked again: another run may have begun
            sink = _filtered_sink(folder, names, filter_output, drop, shard_size, schema)
            report["kept"] = sink.count
            finished = {"report": os.path.realpath(report_path), "kept": sink.count}
            publish_and_finalize([sink], "dedup", settings, finished, finalize_mod.finalize)
        _save_filtered_report(report_path, report, filter_output)
    return report


def _save_filtered_report(report_path: str, report: dict, filter_output: str) -> None:
    """Write the report of a finished ``--filter-output`` whole: the one on disk was written
    before the filter, without ``kept``, so it read the same as a run killed mid-filter and
    differed from the report the command returned and printed."""
    report["filter_output"] = os.path.realpath(filter_output)
    shards.save_json(report_path, report, "dedup report")


def _refuse_unwritable_outputs(report_path: str, filter_output: str | None) -> None:
    """One line, before the (slow) hashing, for a report or filter output that cannot be written
    where it was asked: a ``--report`` that is a folder or under a file failed only once every
    sample was hashed, and one inside ``--filter-output`` made that folder "not empty" then, so
    the run and its rerun were refused with a reason that did not name the report."""
    if os.path.isdir(report_path):
        raise SystemExit(
            f"--report {report_path}: is a folder; give a file path, e.g. "
            f"--report {os.path.join(report_path, 'dedup.json')}"
        )
    refuse_output_under_a_file(os.path.dirname(os.path.abspath(report_path)), "--report", report_path)
    if not filter_output:
        return
    refuse_output_under_a_file(filter_output, "--filter-output")
    output = os.path.realpath(filter_output)
    report_dir = os.path.realpath(os.path.dirname(os.path.abspath(report_path)))
    if os.path.commonpath([output, report_dir]) == output:
        raise SystemExit(
            f"--report {report_path}: lies inside --filter-output {filter_output}, which must hold only "
            "the filtered shards; put the report elsewhere (by default it goes to DIR/_build/dedup.json)"
        )


def _finish_interrupted_filter(output: str, settings: dict, report_path: str) -> dict | None:
    """The report of an earlier ``dedup --filter-output`` into ``output`` with the same settings,
    once its killed publish is finished (None when there is none): the rerun refused ``output`` as
    not empty, and the shards it held had no ``sizes.json`` (or only some of them were there)."""

    def rerun_hint(earlier: dict) -> str:
        return (
            f"{earlier['input']} --max-distance {earlier['max_distance']} "
            f"--shard-size {earlier['shard_size']} --filter-output {output}"
        )

    finished = finish_interrupted_publish([output], "dedup", settings, rerun_hint, finalize_mod.finalize)
    if finished is None:
        return None
    try:  # the report of the run that hashed the samples: this rerun does not hash them again
        with open(finished["report"]) as f:
            report = {**json.load(f), "kept": finished["kept"]}
    except (OSError, ValueError) as err:
        raise SystemExit(
            f"{finished['report']}: the report of the finished dedup does not read ({err}); its "
            f"--filter-output {output} is complete: run dedup without --filter-output to report again"
        ) from None
    _save_filtered_report(report_path, report, output)
    return report


def _find_duplicates(folder: str, max_distance: int, names: list[str]) -> dict:
    """The report of the duplicate groups of ``folder``'s shards ``names`` (without the skipped
    shards)."""
    info: dict[str, dict] = {}
    uf = _UnionFind()
    by_sha: dict[str, str] = {}
    by_video: dict[str, str] = {}
    near = _NearIndex(max_distance)
    by_phash: dict[int, str] = {}  # each pHash value's first sample, the one ``near`` holds
    reasons: dict[str, str] = {}
    for key, members, row in iter_samples(folder, names):
        phash = _phash(folder, key, members)
        value = int(str(phash), 16)
        info[key] = {"video_id": row.get("video_id"), "phash": str(phash)}
        sha = row.get("sha256")
        if sha and sha in by_sha:
            _link(uf, reasons, key, by_sha[sha], EXACT)
        by_sha.setdefault(sha, key)
        # By identity as well as by image: a plain img2dataset folder of a trending CSV holds each
        # video once per day, and a creator who changed the thumbnail between two days gave two
        # images far apart: both copies (one title twice) were kept.
        video = video_of(row)
        if video in by_video:
            _link(uf, reasons, key, by_video[video], SAME_VIDEO)
        by_video.setdefault(video, key)
        if value in by_phash:
            # The same pHash as an earlier sample: it matches exactly what that one matched, so it
            # joins its group uncompared. Added to the buckets, a blank or letterboxed frame shared
            # by thousands made every copy compare with every earlier one (O(n^2): hours at 20,000).
            _link(uf, reasons, key, by_phash[value], PERCEPTUAL)
        else:
            by_phash[value] = key
            for other in near.add(value):
                _link(uf, reasons, key, by_phash[other], PERCEPTUAL)
        uf.find(key)
    groups: dict[str, list[str]] = {}
    for key in info:
        groups.setdefault(uf.find(key), []).append(key)
    dup_groups = [sorted(g) for g in groups.values() if len(g) > 1]
    drop = {k for g in dup_groups for k in g[1:]}  # keep the first key of each group
    return {
        "samples": len(info),
        "groups": [
            [
                {"key": k, "video_id": info[k]["video_id"], "match": reasons[k] if k in drop else KEPT}
                for k in g
            ]
            for g in sorted(dup_groups)
        ],
        "duplicate_groups": len(dup_groups),
        "duplicates": len(drop),
        "exact": sum(1 for k in drop if reasons[k] == EXACT),
        "same_video": sum(1 for k in drop if reasons[k] == SAME_VIDEO),
        "perceptual": sum(1 for k in drop if reasons[k] == PERCEPTUAL),
    }


def _filtered_sink(
    folder: str, names: list[str], output: str, drop: set[str], shard_size: int, schema: pa.Schema | None
) -> ShardSink:
    """The closed sink holding, staged, the samples not in ``drop``. Published and finalized as
    split's are (open_clip reads the sample count from sizes.json or __len__, which were missing,
    so `finalize` had to be run by hand)."""
    sink = ShardSink(output, shard_size, schema=schema)
    for sample in iter_samples(folder, names):
        if sample[0] not in drop:
            sink.add(sample)
    sink.close()
    return sink
