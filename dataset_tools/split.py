"""``split DIR --output OUT --by channel|hash``: train/validation shards without leakage.

By channel, every video of a channel lands on the same side (near-identical thumbnails of one
channel cannot straddle the split); by hash, each video id decides alone. The side is a salted
SHA-1 of the channel (or id), so the split is deterministic. Stable as data grows, except for a
row with only a channel title: it follows its channel's id once another row pairs the two, so a
later split with newer exports can move it (the README says: split each data version once).
"""

from __future__ import annotations

import hashlib
import os

from dataset_tools import finalize as finalize_mod
from dataset_tools import shards
from dataset_tools.reshard import (
    ShardSink,
    check_empty_output,
    claim_outputs,
    finish_interrupted_publish,
    input_schema,
    iter_samples,
    publish_and_finalize,
    refuse_output_under_a_file,
    require_whole_shards,
    skipped_incomplete_shards,
    video_of,
)


def skipped_shards(folder: str, command: str) -> dict[str, list[str]]:
    """The shards ``command`` leaves out (each kind also said on stderr), as two result keys:
    ``skipped_incomplete_shards`` (bare names, ``00001``: no stats yet, a build stopped mid-shard)
    and ``skipped_not_shards`` (file names of tars not named ``NNNNN.tar``: ``00002.TAR``). Both
    were in the first key, so a reader of the result could not tell a rebuild from a rename apart."""
    # reshard lists the incomplete shards (bare digit names) first, then the misnamed tar files.
    skipped = skipped_incomplete_shards(folder, command)
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


def channel_ids_by_title(folder: str) -> dict[str, str]:
    """Channel title -> channel id, for each title that the folder's rows pair with exactly one id.

    Old Kaggle exports have only ``channel_title``; newer ones add ``channel_id``. A folder built
    from both keys one channel by its id in some rows and by its title in others: two units, so
    the channel could land on both sides. A title shared by two channels stays a unit of its own.
    """
    ids: dict[str, set[str]] = {}
    for name in shards.iter_shard_names(folder):
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
    video = video_of(row)  # plain img2dataset shards have no video_id (it was a KeyError)
    if by == "channel":
        title = row.get("channel_title")
        unit = row.get("channel_id") or (title_ids or {}).get(title) or title or f"video:{video}"
    elif by == "hash":
        unit = video
    else:
        raise ValueError(f"--by {by!r}: use channel or hash")
    digest = hashlib.sha1(f"{seed}:{unit}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"


def split(
    folder: str,
    output: str,
    by: str = "channel",
    val_fraction: float = 0.1,
    seed: str = "0",
    shard_size: int = 1000,
) -> dict:
    """Write ``folder``'s samples into ``output/train`` and ``output/val``; returns settings and counts."""
    if not 0.0 < val_fraction < 1.0:
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
    outputs = list(sides.values())
    for path in outputs:
        refuse_output_under_a_file(path, "--output", output)
    # A split killed after staging all its shards (while moving them in, or before sizes.json) is
    # finished here; until 2026-12-07 the rerun refused the folder as not empty.
    finished = finish_interrupted_publish(outputs, "split", settings, _rerun_hint, finalize_mod.finalize)
    if finished is not None:
        return finished
    require_whole_shards(folder, "split")  # before any output is written
    schema = input_schema(folder, "split")  # a column of two types: refused before any output
    skipped = skipped_shards(folder, "split")
    for path in outputs:  # both checked before either is created
        check_empty_output(path)
    with claim_outputs(outputs, "split"):  # both claimed before either is written
        title_ids = channel_ids_by_title(folder) if by == "channel" else None
        sinks = {side: ShardSink(path, shard_size, schema=schema) for side, path in sides.items()}
        for sample in iter_samples(folder):
            sinks[assign(sample[2], by, val_fraction, seed, title_ids)].add(sample)
        counts = {side: sink.close() for side, sink in sinks.items()}
        result = {"by": by, "val_fraction": val_fraction, **counts, **skipped}
        # Both sides published only now (a killed split published neither), after a marker
        # (``_build/split_publishing.json``) that lets the rerun finish a split killed on the way.
        publish_and_finalize(list(sinks.values()), "split", settings, result, finalize_mod.finalize)
    return result


def _rerun_hint(earlier: dict) -> str:
    """The arguments of the split whose settings are ``earlier``, for finishing it."""
    return (
        f"{earlier['input']} --by {earlier['by']} --val-fraction {earlier['val_fraction']} "
        f"--seed {earlier['seed']} --shard-size {earlier['shard_size']}"
    )
