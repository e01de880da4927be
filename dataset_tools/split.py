"""``split DIR --output OUT --by channel|hash|date``: train/validation shards without leakage.

By channel, every video of a channel lands on the same side (near-identical thumbnails of one
channel cannot straddle the split); by hash, each video id decides alone. The side is a salted
SHA-1 of the channel (or id), so the split is deterministic. Stable as data grows, except for a
row with only a channel title: it follows its channel's id once another row pairs the two, so a
later split with newer exports can move it (the README says: split each data version once).

By date, a sample published before the cut goes to train, on or after it to val: a model is
measured on videos newer than any it trained on. ``--cut`` gives the cut (UTC); without it, the
cut is the publish time that puts closest to ``--val-fraction`` of all samples in val. A sample
without a readable publish time cannot be shown to be old or new: it goes to train, counted.
"""

from __future__ import annotations

import datetime
import hashlib
import math
import os
import sys
from collections import Counter

from dataset_tools import finalize as finalize_mod
from dataset_tools import shards
from dataset_tools.reshard import (
    ShardSink,
    check_empty_output,
    claim_outputs,
    finish_interrupted_publish,
    input_schema,
    iter_sample_rows,
    iter_samples,
    publish_and_finalize,
    refuse_output_holding_input,
    refuse_output_under_a_file,
    require_whole_shards,
    skipped_incomplete_shards,
    video_of,
)


def skipped_shards(folder: str, command: str, names: list[str] | None = None) -> dict[str, list[str]]:
    """The shards ``command`` leaves out (each kind also said on stderr), as two result keys:
    ``skipped_incomplete_shards`` (bare names, ``00001``: no stats yet, a build stopped mid-shard)
    and ``skipped_not_shards`` (file names of tars not named ``NNNNN.tar``: ``00002.TAR``). Both
    were in the first key, so a reader of the result could not tell a rebuild from a rename apart.
    ``names``: the shards ``command`` reads (default: the complete shards now)."""
    # reshard lists the incomplete shards (bare digit names) first, then the misnamed tar files.
    skipped = skipped_incomplete_shards(folder, command, names)
    return {
        "skipped_incomplete_shards": [name for name in skipped if name.isdigit()],
        "skipped_not_shards": [name for name in skipped if not name.isdigit()],
    }


def refuse_bad_shard_size(shard_size: int) -> None:
    """One line before any input is read or output created: ShardSink refused ``--shard-size 0``
    only once the outputs were claimed, after every tar was checked (and for dedup, every image
    hashed), leaving lock-only output folders and a report behind."""
    if shard_size < 1:
        raise SystemExit(f"--shard-size {shard_size}: must be at least 1 (samples per shard, e.g. 1000)")


def channel_ids_by_title(folder: str, names: list[str] | None = None) -> dict[str, str]:
    """Channel title -> channel id, for each title that the folder's rows pair with exactly one id.

    Old Kaggle exports have only ``channel_title``; newer ones add ``channel_id``. A folder built
    from both keys one channel by its id in some rows and by its title in others: two units, so
    the channel could land on both sides. A title shared by two channels stays a unit of its own.
    ``names``: the shards to read (default: every complete shard).
    """
    ids: dict[str, set[str]] = {}
    for name in shards.iter_shard_names(folder) if names is None else names:
        rows, _ = shards.read_parquet_rows(os.path.join(folder, f"{name}.parquet"))
        for row in rows:
            title, channel = row.get("channel_title"), row.get("channel_id")
            if title and channel:
                ids.setdefault(title, set()).add(channel)
    return {title: next(iter(found)) for title, found in ids.items() if len(found) == 1}


def assign(
    row: dict, by: str, val_fraction: float, seed: str = "0", title_ids: dict[str, str] | None = None
) -> str:
    """ "val" or "train" for one parquet/json row; `title_ids` (`channel_ids_by_title`) puts a row
    with only a channel title where the rows with that title and an id go."""
    return "val" if unit_position(row, by, seed, title_ids) < val_fraction else "train"


def unit_position(row: dict, by: str, seed: str = "0", title_ids: dict[str, str] | None = None) -> float:
    """Where the row's unit (channel or video) lies in [0, 1): val holds the units below
    ``--val-fraction``, so the lowest and highest positions say which fraction fills an empty side."""
    video = video_of(row)  # plain img2dataset shards have no video_id (it was a KeyError)
    if by == "channel":
        title = row.get("channel_title")
        unit = row.get("channel_id") or (title_ids or {}).get(title) or title or f"video:{video}"
    elif by == "hash":
        unit = video
    else:
        raise ValueError(f"--by {by!r}: use channel or hash")
    digest = hashlib.sha1(f"{seed}:{unit}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


BY = ("channel", "hash", "date")
# Where a shard row keeps its publish time: ``build`` writes ``publish_time`` (metadata.py's name
# for publishedAt, upload_date...); shards from other tools may carry those names as they were.
PUBLISH_FIELDS = ("publish_time", "publishedAt", "published_at", "upload_date")


def parse_time(value: object) -> datetime.datetime | None:
    """``value`` as an aware UTC datetime, None when it is not a time: ISO date or date time
    (``2024-01-01``, ``2017-11-13T17:13:01.000Z``, with an offset or without one, read as UTC),
    yt-dlp's ``20240101``, or a date/datetime object."""
    if isinstance(value, datetime.datetime):
        when = value
    elif isinstance(value, datetime.date):
        when = datetime.datetime.combine(value, datetime.time())
    elif isinstance(value, str):
        try:
            when = datetime.datetime.fromisoformat(value.strip())
        except ValueError:
            return None
    else:
        return None
    return when.replace(tzinfo=datetime.UTC) if when.tzinfo is None else when.astimezone(datetime.UTC)


def publish_value(row: dict) -> object:
    """The row's publish time as stored (first non-empty of ``PUBLISH_FIELDS``), None without one."""
    return next((row[name] for name in PUBLISH_FIELDS if row.get(name) not in (None, "")), None)


def parse_cut(cut: str) -> datetime.datetime:
    """``--cut`` as a UTC datetime, or a one-line SystemExit saying what to write."""
    when = parse_time(cut)
    if when is None:
        raise SystemExit(
            f"--cut {cut!r}: not an ISO date or date time; write e.g. 2024-01-01 or "
            "2024-01-01T12:00:00Z (UTC)"
        )
    return when


def publish_times(
    folder: str, names: list[str] | None = None
) -> tuple[list[datetime.datetime | None], list[str]]:
    """Every sample's publish time (None when it has no readable one), of the rows ``iter_samples``
    yields, read from the parquets and the tars' headers (a tar's images are read only for a
    sample without a successful parquet row), and the stored values that are not times."""
    times, unreadable = [], []
    for _key, row in iter_sample_rows(folder, names):
        value = publish_value(row)
        times.append(parse_time(value))
        if value is not None and times[-1] is None:
            unreadable.append(str(value))
    return times, unreadable


def cut_for_fraction(times: list[datetime.datetime | None], val_fraction: float) -> datetime.datetime:
    """The publish time that, as the cut (samples at it go to val), puts closest to
    ``val_fraction`` of all samples in val, the later of two equally close; at least one dated
    sample on each side. Ties at the cut stay together, so with dates of a day's resolution the
    share is only as close as the days allow."""
    at = Counter(t for t in times if t is not None)
    target, newer, best = val_fraction * len(times), 0, None
    # Not the oldest time: as the cut it would leave train no dated sample.
    for when in sorted(at, reverse=True)[:-1]:
        newer += at[when]
        if best is None or abs(newer - target) < abs(best[0] - target):
            best = (newer, when)
    if best is None:
        raise SystemExit(
            f"split --by date: every dated sample has one publish time ({min(at).isoformat()}); "
            "no cut leaves one on each side. Use --by channel or --by hash."
        )
    return best[1]


def date_side(row: dict, cut: datetime.datetime) -> str:
    """ "val" for a row published on or after ``cut``, else "train" (undated rows too)."""
    when = parse_time(publish_value(row))
    return "val" if when is not None and when >= cut else "train"


def check_cut(cut: datetime.datetime, times: list[datetime.datetime | None]) -> None:
    """One line when ``--cut`` leaves val, or train's dated samples, empty (a cut past the data)."""
    dated = [t for t in times if t is not None]
    if max(dated) < cut:
        raise SystemExit(
            f"--cut {cut.isoformat()}: after the newest publish time ({max(dated).isoformat()}), val would "
            "be empty; give an earlier cut, or --val-fraction instead of --cut"
        )
    if min(dated) >= cut:
        raise SystemExit(
            f"--cut {cut.isoformat()}: on or before the oldest publish time ({min(dated).isoformat()}), "
            "train would hold no dated sample; give a later cut, or --val-fraction instead of --cut"
        )


def choose_cut(
    folder: str, cut: str | None, val_fraction: float | None, names: list[str] | None = None
) -> tuple[datetime.datetime, dict[str, int]]:
    """The cut of a date split, and the undated samples' counts (``no_publish_time``: all of them,
    ``unreadable_publish_time``: those with a value that is not a time). Refused in one line
    before any output is written when no sample has a publish time or the cut splits nothing.
    ``names``: the shards to read (default: every complete shard)."""
    times, unreadable = publish_times(folder, names)
    undated = sum(t is None for t in times)
    if undated == len(times):
        raise SystemExit(
            f"{folder}: split --by date: none of the {len(times)} samples has a publish time "
            f"({', '.join(PUBLISH_FIELDS)} in its parquet row or .json); build from metadata that has "
            "one, or use --by channel or --by hash"
        )
    if cut is not None:
        when = parse_cut(cut)
        check_cut(when, times)
    else:
        when = cut_for_fraction(times, val_fraction)
    if undated:
        example = f", e.g. {unreadable[0]!r}" if unreadable else ""
        print(
            f"[dataset_tools] split --by date: {undated} of {len(times)} samples have no publish time "
            f"({len(unreadable)} of them one that is not an ISO date or time{example}); they go to train",
            file=sys.stderr,
        )
    return when, {"no_publish_time": undated, "unreadable_publish_time": len(unreadable)}


def split(
    folder: str,
    output: str,
    by: str = "channel",
    val_fraction: float | None = None,
    seed: str = "0",
    shard_size: int = 1000,
    cut: str | None = None,
) -> dict:
    """Write ``folder``'s samples into ``output/train`` and ``output/val``; returns settings and counts.

    ``val_fraction`` defaults to 0.1; ``cut`` (``by="date"`` only) replaces it. A date split's
    result adds ``cut`` (ISO, UTC) and ``no_publish_time`` (undated samples, all in train).
    ``samples``: every sample read (``train`` + ``val``), as in dedup's report and vocab's result.
    A channel split's result adds ``no_channel``: the samples without a channel, placed by video."""
    if by not in BY:
        raise SystemExit(f"--by {by!r}: use {', '.join(BY)}")
    if cut is not None and by != "date":
        raise SystemExit(f"--cut {cut}: only --by date has a cut; drop it, or use --by date")
    if cut is not None and val_fraction is not None:
        raise SystemExit(
            f"--cut {cut} and --val-fraction {val_fraction}: give one (the cut decides val's share)"
        )
    if cut is not None:
        parse_cut(cut)  # a typo refused before anything is read
    elif val_fraction is None:
        val_fraction = 0.1
    if cut is None and not 0.0 < val_fraction < 1.0:
        # SystemExit, not ValueError: the CLI shows it as one line instead of a traceback.
        raise SystemExit(
            f"--val-fraction {val_fraction}: must be strictly between 0 and 1 (the share of samples "
            "in val, e.g. 0.1)"
        )
    refuse_bad_shard_size(shard_size)
    shards.require_shards(folder)
    sides = {side: os.path.join(output, side) for side in ("train", "val")}
    settings = {"input": os.path.realpath(folder), "by": by, "val_fraction": val_fraction}
    settings.update(seed=seed, shard_size=shard_size)
    if by == "date":  # only here: an earlier channel or hash split's marker still matches its rerun
        settings["cut"] = cut
    outputs = list(sides.values())
    for path in outputs:
        refuse_output_under_a_file(path, "--output", output)
        refuse_output_holding_input(folder, path, "--output", output)
    # A split killed after staging all its shards (while moving them in, or before sizes.json) is
    # finished here; until 2026-12-07 the rerun refused the folder as not empty.
    finished = finish_interrupted_publish(outputs, "split", settings, _rerun_hint, finalize_mod.finalize)
    if finished is not None:
        return finished
    # The shards checked are the shards split, and those reported skipped the ones left out: each
    # step listed the complete shards anew, so one a running build completed meanwhile went into
    # the output unchecked (its columns not in the schema) while the result said it was skipped.
    names = list(shards.iter_shard_names(folder))
    require_whole_shards(folder, "split", names)  # before any output is written
    schema = input_schema(folder, "split", names)  # a column of two types: refused before any output
    skipped = skipped_shards(folder, "split", names)
    for path in outputs:  # both checked before either is created
        check_empty_output(path)
    cut_time, undated = choose_cut(folder, cut, val_fraction, names) if by == "date" else (None, {})
    with claim_outputs(outputs, "split"):  # both claimed before either is written
        title_ids = channel_ids_by_title(folder, names) if by == "channel" else None
        sinks = {side: ShardSink(path, shard_size, schema=schema) for side, path in sides.items()}
        # The lowest and highest unit positions: which fraction would fill a side left empty.
        no_channel, lowest, highest = 0, math.inf, -math.inf
        for sample in iter_samples(folder, names):
            if by == "date":
                side = date_side(sample[2], cut_time)
            else:
                position = unit_position(sample[2], by, seed, title_ids)
                lowest, highest = min(lowest, position), max(highest, position)
                side = "val" if position < val_fraction else "train"
            no_channel += by == "channel" and not _has_channel(sample[2])
            sinks[side].add(sample)
        counts = {side: sink.close() for side, sink in sinks.items()}
        if by != "date":  # a date split's cut leaves a dated sample on each side
            _warn_empty_side(counts, val_fraction, lowest, highest, by)
        # ``samples``: every sample read, as dedup's report and vocab's result name it (the total
        # was left to the reader's sum); train + val equals it.
        samples = sum(counts.values())
        result = {"by": by, "val_fraction": val_fraction, "samples": samples, **counts, **skipped}
        if by == "date":
            result.update(cut=cut_time.isoformat(), **undated)
        if by == "channel":
            result["no_channel"] = _note_no_channel(no_channel, samples)
        # Both sides published only now (a killed split published neither), after a marker
        # (``_build/split_publishing.json``) that lets the rerun finish a split killed on the way.
        publish_and_finalize(list(sinks.values()), "split", settings, result, finalize_mod.finalize)
    return result


def _warn_empty_side(
    counts: dict[str, int], val_fraction: float, lowest: float, highest: float, by: str
) -> None:
    """Say on stderr that ``--val-fraction`` left val (or train) empty, and which fraction gives it a
    sample: a small set split at 0.01 exited 0 with ``"val": 0`` and an empty OUT/val, and the
    training that named OUT/val as its val shards failed later with no word of the split. A
    warning, not a refusal: a train-only split is a legitimate choice (no validation).
    ``lowest``, ``highest``: the extreme ``unit_position`` of the samples."""
    samples = counts["train"] + counts["val"]
    if samples == 0 or (counts["train"] and counts["val"]):
        return
    side = "val" if counts["val"] == 0 else "train"
    if lowest == highest:
        unit = "channel" if by == "channel" else "video"
        advice = f"they are all one {unit}, which no --val-fraction splits" + (
            "; use --by hash" if by == "channel" else ""
        )
    elif side == "val":
        advice = f"--val-fraction {_decimal_between(lowest, 1.0)} or more puts at least one sample there"
    else:
        advice = f"--val-fraction {_decimal_between(0.0, highest)} or less leaves at least one sample there"
    print(
        f"[dataset_tools] split --by {by}: --val-fraction {val_fraction} left {side} empty "
        f"(0 of {samples} samples); {advice}",
        file=sys.stderr,
    )


def _decimal_between(low: float, high: float) -> float:
    """A fraction a user can type (two significant figures, more only where needed), not a 17-digit
    float: the smallest above ``low`` (at most ``high``) when ``low`` > 0, else the largest at most
    ``high`` (above 0). ``low`` < ``high``, both in [0, 1]."""
    near = high if low == 0 else low
    for digits in range(1 - math.floor(math.log10(near)), 17):
        step = 10.0**-digits
        ticks = math.floor(high / step) if low == 0 else math.floor(low / step) + 1
        value = round(ticks * step, digits)
        if low < value <= high and value < 1:
            return value
    return high


def _has_channel(row: dict) -> bool:
    return bool(row.get("channel_id") or row.get("channel_title"))


def _note_no_channel(no_channel: int, samples: int) -> int:
    """Say on stderr how many samples ``--by channel`` placed by their video alone, as they name no
    channel (plain img2dataset shards have none): the result read as a channel split of every
    sample, while such samples of one channel could land on both sides. Returns the count."""
    if no_channel:
        print(
            f"[dataset_tools] split --by channel: {no_channel} of {samples} samples have no channel_id "
            "or channel_title; each went to a side by its video alone (as --by hash), so one channel's "
            "videos among them may be on both sides",
            file=sys.stderr,
        )
    return no_channel


def _rerun_hint(earlier: dict) -> str:
    """The arguments of the split whose settings are ``earlier``, for finishing it."""
    share = f"--cut {earlier['cut']}" if earlier.get("cut") else f"--val-fraction {earlier['val_fraction']}"
    return (
        f"{earlier['input']} --by {earlier['by']} {share} "
        f"--seed {earlier['seed']} --shard-size {earlier['shard_size']}"
    )
