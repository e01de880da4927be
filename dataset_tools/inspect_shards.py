"""``inspect DIR [--verify]``: what a shard folder holds, and (with verify) whether it is sound.

Verification checks every tar in the folder, with stats or without: that it is whole (not
truncated), decodes every image fully, checks every sample has its image (.jpg, or the
.jpeg/.png/.webp the trainer reads too), .txt and .json, that both are UTF-8 text as the trainer
decodes them (it skips a sample whose caption or metadata is not), that the json key matches,
that the members of each sample are together and none is repeated (as the trainer groups them:
each repeat is one more sample), and (shards with a parquet) that the tar holds exactly the rows
the parquet calls successes. Tars not named ``NNNNN.tar``, which no folder tool reads, are counted
apart from incomplete shards, and each is a finding of --verify. Any finding lands in
``report["corrupt"]`` (non-empty -> exit 1).
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

from PIL import Image

from dataset_tools import shards, youtube
from dataset_tools.reshard import shard_sample_rows
from dataset_tools.vocab import normalize_tag, tag_values

REQUIRED_MEMBERS = ("txt", "json")  # and one image member of IMAGE_EXTS
TEXT_MEMBERS = ("txt", "json")  # the members the trainer decodes as UTF-8 (a caption, the metadata)
# The trainer's image members, in its order of preference (vutrain/data/samples.py IMAGE_EXTS; not
# imported: that module pulls in torch). img2dataset --encode_format png/webp writes no .jpg: such a
# folder was all "lacks ['jpg']" findings out of --verify and a "rebuild it" refusal out of dedup.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def image_member(members: dict[str, bytes]) -> str | None:
    """The member name (``ext`` as written, any case) of a sample's image, as the trainer picks it;
    None when the sample has none."""
    by_lower = {ext.lower(): ext for ext in members}
    return next((by_lower[ext] for ext in IMAGE_EXTS if ext in by_lower), None)


def _as_training_text(payload: bytes) -> str | None:
    """``payload`` decoded as the trainer decodes ``.txt`` and ``.json`` (strict UTF-8, a leading
    byte-order mark dropped), None when it is not UTF-8. ``json.loads`` of the bytes also takes
    UTF-16/32 and lone surrogates: such a sample passed --verify and training skipped it."""
    try:
        return payload.decode("utf-8-sig")
    except UnicodeDecodeError:
        return None


def _meta_problems(tar_file: str, key: str, text: str) -> list[str]:
    """Findings of one sample's ``.json`` text: not an object, a key of another sample, a placeholder."""
    try:
        meta = json.loads(text)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):  # a list or a number parses too (it was an AttributeError)
        return [f"{tar_file}: sample {key} json does not parse as an object"]
    problems = []
    if meta.get("key") != key:
        problems.append(f"{tar_file}: sample {key} json key is {meta.get('key')!r}")
    size = (meta.get("original_width"), meta.get("original_height"))
    if size == youtube.PLACEHOLDER_SIZE and meta.get("variant") not in youtube.NATIVE_120X90_VARIANTS:
        problems.append(f"{tar_file}: sample {key} is a 120x90 placeholder")
    return problems


def _scattered_keys(member_names: list[str]) -> list[str]:
    """Keys whose members are split by another sample's: the trainer groups consecutive members by
    key, so such a sample is read as several incomplete ones. Comparing whole names instead flagged
    keys sorted by key whose lengths differ (``a.txt`` then ``a-b.jpg``: ``-`` sorts before ``.``)."""
    finished, scattered, current = set(), set(), None
    for key in (member[0] for member in map(shards.sample_member, member_names) if member):
        if key != current:
            if key in finished:
                scattered.add(key)
            finished.add(current)
            current = key
    return sorted(scattered)


SAMPLE_FIELDS = ("__key__", "__url__")  # members the trainer ignores (samples.py _SAMPLE_FIELDS)


def _samples_as_trainer_reads(path: str) -> tuple[list[str], list[tuple[str, dict[str, bytes]]]]:
    """The file member names of the tar at ``path``, and its ``(key, {ext: bytes})`` samples in
    tar order, grouped as the trainer groups them (vutrain/data/samples.py ``_starts_new_sample``):
    another key, or an extension the sample already holds, starts a new sample. Read as one dict
    per key, a tar appended to (``k.jpg k.txt k.json k.jpg ...``) passed as one sample: the trainer
    reads two, and only the last copy's image was decoded."""
    names: list[str] = []
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            names.append(member.name)
            parts = shards.sample_member(member.name)
            if parts is None:
                continue
            key, ext = parts
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            if ext in SAMPLE_FIELDS:
                continue
            if ext in samples[-1][1]:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return names, samples


def _repeated_keys(samples: list[tuple[str, dict[str, bytes]]], scattered: list[str]) -> list[str]:
    """Keys the trainer reads as more than one sample for a reason other than being scattered: a
    member repeated within one run of the key's members."""
    counts = Counter(key for key, _members in samples)
    return sorted(key for key, n in counts.items() if n > 1 and key not in scattered)


def _sample_problems(tar_file: str, key: str, members: dict[str, bytes]) -> list[str]:
    """Findings of one sample: a member missing, text that is not UTF-8, its json, its image."""
    image = image_member(members)
    missing = [ext for ext in REQUIRED_MEMBERS if ext not in members]
    missing = missing if image else ["jpg (or jpeg/png/webp)", *missing]
    if missing:
        return [f"{tar_file}: sample {key} lacks {missing}"]
    problems = []
    not_utf8 = [ext for ext in TEXT_MEMBERS if _as_training_text(members[ext]) is None]
    if not_utf8:
        problems.append(
            f"{tar_file}: sample {key} {', '.join(not_utf8)} is not UTF-8 text (training skips the "
            "sample as non_utf8_text): re-encode it as UTF-8"
        )
    if "json" not in not_utf8:
        problems += _meta_problems(tar_file, key, _as_training_text(members["json"]))
    try:
        with Image.open(io.BytesIO(members[image])) as img:
            img.load()  # full decode: truncated JPEGs raise here
    except Exception as err:
        problems.append(f"{tar_file}: sample {key} image does not decode ({err})")
    return problems


def _verify_shard(folder: str, tar_file: str, success_keys: set | None) -> list[str]:
    """Findings for the tar ``tar_file`` of ``folder``; ``success_keys`` None for a tar without
    stats/parquet (no cross-check)."""
    path = os.path.join(folder, tar_file)
    whole = shards.tar_problem(path)  # trailing data after a whole archive named as such
    if whole:
        return [whole]
    try:
        names, samples = _samples_as_trainer_reads(path)
    except (tarfile.TarError, OSError, EOFError) as err:
        return [f"{tar_file}: unreadable ({err})"]
    problems: list[str] = []
    scattered = _scattered_keys(names)
    if scattered:
        problems.append(
            f"{tar_file}: members of sample(s) {scattered[:5]} are not next to each other (the "
            "trainer reads each run of them as a sample of its own): rewrite the tar with each "
            "sample's members together"
        )
    repeated = _repeated_keys(samples, scattered)
    if repeated:
        problems.append(
            f"{tar_file}: sample(s) {repeated[:5]} repeat a member (a tar appended to, or two "
            "concatenated?): the trainer reads each repeat as one more sample with the same key; "
            "rewrite the tar with each sample once"
        )
    for key, members in samples:
        problems += _sample_problems(tar_file, key, members)
    in_tar = {key for key, _members in samples}
    if success_keys is not None and in_tar != success_keys:
        extra, lost = sorted(in_tar - success_keys), sorted(success_keys - in_tar)
        problems.append(
            f"{tar_file[: -len('.tar')]}: tar/parquet disagree (in tar only: {extra[:5]}, successes "
            f"missing from tar: {lost[:5]})"
        )
    return problems


def _training_tags(value) -> set[str]:
    """A row's tags as training and ``vocab`` id them, each once: counted as written, "Music",
    "music " and "MUSIC" were three histogram rows for one class, and a tag repeated in one video
    counted twice, so inspect's counts disagreed with the vocabulary's."""
    return {normalize_tag(t) for t in tag_values(value)}  # a string: its tags, not letters


COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")  # what vutrain's loader also reads
MISNAMED_REMEDY = (
    "split, dedup, vocab and finalize leave it out: if it is a shard, rename it NNNNN.tar and its "
    ".parquet and _stats.json NNNNN.parquet and NNNNN_stats.json (NNNNN a number no other shard has)"
)


def _misnamed_finding(tar_file: str) -> str:
    """The finding for a tar not named ``NNNNN.tar``: why no tool reads it, and what to do."""
    if tar_file.lower().endswith(COMPRESSED_SUFFIXES):
        # The trainer reads compressed shards too; --verify does not, so they are not passed as
        # checked ("verify: OK" over a folder of .tar.gz checked nothing).
        return f"{tar_file}: compressed shard, not verified (--verify reads .tar: decompress it to check it)"
    return f"{tar_file}: not named as a shard (NNNNN.tar: digits, lower-case .tar); {MISNAMED_REMEDY}"


def _verify_tars_without_stats(folder: str, incomplete: list[str], misnamed: list[str]) -> list[str]:
    """Findings for the tars outside the complete shards: those without stats (a build that
    stopped mid-shard, a copy) and those not named as shards, whose contents are checked too
    when they are plain tars; a folder with no tar at all is a finding of its own."""
    problems = [p for name in incomplete for p in _verify_shard(folder, f"{name}.tar", None)]
    for tar_file in misnamed:
        problems.append(_misnamed_finding(tar_file))
        if not tar_file.lower().endswith(COMPRESSED_SUFFIXES):
            problems += _verify_shard(folder, tar_file, None)
    has_tars = incomplete or misnamed or any(shards.SHARD_TAR_RE.match(f) for f in os.listdir(folder))
    if not has_tars:  # "verify: OK" with nothing checked (a typo, split's OUT)
        problems.append(
            f"{folder}: no shards here, nothing verified (pass the folder holding the NNNNN.tar "
            "files; split writes OUT/train and OUT/val)"
        )
    return problems


def _count_rows(report: dict, rows: list[dict], keys_seen: Counter) -> set[str]:
    """Count a shard's parquet ``rows`` into ``report`` (rows, successes, failures by reason) and
    their video ids into ``keys_seen``; returns the keys of the successful rows."""
    success_keys = set()
    for row in rows:
        report["rows"] += 1
        keys_seen[row.get("video_id")] += 1
        if row["status"] == shards.SUCCESS:
            report["successes"] += 1
            success_keys.add(row["key"])
        else:
            report["failures_by_reason"][row.get("error_message") or row["status"]] += 1
    return success_keys


def _count_samples(
    report: dict, folder: str, name: str, rows: list[dict], success_keys: set[str], verify: bool
) -> None:
    """Count shard ``name``'s samples (its tar's, as training, split, dedup and vocab read them)
    into ``report``: ``samples``, the two kinds of mismatch with the parquet's successes, and the
    variant, category and tag histograms. Counted over the parquet's successful rows, ``successes``
    and the tags disagreed with ``samples`` and the tags of vocab for a sample in the tar alone, or a
    success whose sample the tar lacks, and nothing said which number training sees. A damaged tar
    is a finding (``--verify`` names it anyway); its histograms count the successful rows."""
    problem, keys = shards.tar_check(os.path.join(folder, f"{name}.tar"))
    if problem:
        if not verify:
            report["corrupt"].append(f"{problem}; run inspect --verify for details")
        sample_rows = [(row["key"], row) for row in rows if row["status"] == shards.SUCCESS]
    else:
        report["samples"] += len(keys)
        report["samples_without_success_row"] += len(keys - success_keys)
        report["successes_missing_from_tar"] += len(success_keys - keys)
        sample_rows = shard_sample_rows(folder, name, rows, keys)
    for _key, row in sample_rows:
        report["variants"][row.get("variant") or "unknown"] += 1
        report["categories"][row.get("category_name") or "(none)"] += 1
        report["tags"].update(_training_tags(row.get("tags")))


def inspect_dir(folder: str, verify: bool = False) -> dict:
    """Counts, failure reasons, tag/category histograms, variant mix (+ corruption findings)."""
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: not a directory")
    complete = shards.complete_shards(folder)
    # Only NNNNN.tar can be a shard waiting for its stats: shard-00001.tar was listed as "no stats
    # yet" (a remedy that never completes it) and 00002.TAR not at all, though every tool leaves
    # them out; they are counted under their own reason.
    tars = {f[: -len(".tar")] for f in os.listdir(folder) if shards.SHARD_TAR_RE.match(f)}
    misnamed = shards.tars_not_named_as_shards(folder)
    report = {
        "shards": len(complete),
        "rows": 0,
        "successes": 0,
        # The tars' samples, which training, split, dedup and vocab read (their ``samples``; a damaged
        # tar's are not counted: it is a finding), and how they differ from the parquets' successes.
        "samples": 0,
        "samples_without_success_row": 0,
        "successes_missing_from_tar": 0,
        "failures_by_reason": Counter(),
        "variants": Counter(),
        "categories": Counter(),
        "tags": Counter(),
        "corrupt": [],
        "incomplete_shards": sorted(tars - set(complete.values())),
        "tars_not_named_as_shards": misnamed,
    }
    keys_seen = Counter()
    for _shard_id, name in sorted(complete.items()):
        parquet_path = os.path.join(folder, f"{name}.parquet")
        problem = shards.parquet_problem(parquet_path)
        if problem:  # a finding, the other shards still counted (it was a pyarrow traceback)
            report["corrupt"].append(problem)
            if verify:
                report["corrupt"] += _verify_shard(folder, f"{name}.tar", None)
            continue
        rows, _ = shards.read_parquet_rows(parquet_path)
        success_keys = _count_rows(report, rows, keys_seen)
        _count_samples(report, folder, name, rows, success_keys, verify)
        if verify:
            report["corrupt"] += _verify_shard(folder, f"{name}.tar", success_keys)
    if verify:
        report["corrupt"] += _verify_tars_without_stats(folder, report["incomplete_shards"], misnamed)
    # Shards without video ids (plain img2dataset: url, caption) all count under None: no duplicate.
    dupes = [vid for vid, n in keys_seen.items() if n > 1 and vid is not None]
    if verify and dupes:
        report["corrupt"].append(f"video ids in more than one row: {dupes[:5]}")
    report["failures"] = report["rows"] - report["successes"]
    for name in ("failures_by_reason", "variants", "categories", "tags"):
        report[name] = dict(report[name].most_common())
    report["verified"] = verify
    return report


def _samples_line(report: dict) -> str:
    """The line that says which count training sees when the tars and the parquets disagree."""
    return (
        f"samples: {report['samples']} in the tars (what training, split, dedup and vocab read; the "
        f"histograms count these), not the {report['successes']} successes of the parquets: "
        f"{report['samples_without_success_row']} sample(s) without a successful parquet row, "
        f"{report['successes_missing_from_tar']} success(es) missing from their tar (see inspect --verify)"
    )


def format_report(report: dict, top: int = 10) -> str:
    """The human-readable text of an ``inspect`` report (``top`` rows per count table)."""
    lines = [
        f"shards: {report['shards']}  rows: {report['rows']}  successes: {report['successes']}"
        f"  failures: {report['failures']}"
    ]
    if report["samples_without_success_row"] or report["successes_missing_from_tar"]:
        lines.append(_samples_line(report))
    if report["incomplete_shards"]:
        lines.append(f"incomplete shards (no stats yet): {report['incomplete_shards']}")
    misnamed = report.get("tars_not_named_as_shards")
    if misnamed:
        lines.append(
            f"tars not named as shards, not counted: {len(misnamed)} {misnamed[:10]}"
            f"{' ...' if len(misnamed) > 10 else ''} ({MISNAMED_REMEDY}; decompress a compressed one first)"
        )
    for title, key in (
        ("failures by reason", "failures_by_reason"),
        ("variant mix", "variants"),
        ("categories", "categories"),
        (f"top {top} tags", "tags"),
    ):
        lines.append(f"{title}:")
        for name, n in list(report[key].items())[:top]:
            lines.append(f"  {n:8d}  {name}")
    if report["verified"]:
        lines.append(
            "verify: OK" if not report["corrupt"] else f"verify: {len(report['corrupt'])} problem(s)"
        )
        lines += [f"  {p}" for p in report["corrupt"]]
    elif report["corrupt"]:  # an unreadable parquet is found without --verify too
        lines.append(f"problems: {len(report['corrupt'])}")
        lines += [f"  {p}" for p in report["corrupt"]]
    return "\n".join(lines)
