"""The build plan: every accepted input row with its shard, key, caption and first URL.

Saved once as ``DIR/_build/plan.parquet``; a later ``build`` on the same output reuses it (so
keys and shard contents never move) and appends rows for video ids it has not seen as new shards.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import string
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from dataset_tools import metadata, youtube

BUILD_DIR = "_build"
PLAN_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("title", pa.string()),
        ("tags", pa.list_(pa.string())),
        ("category_id", pa.int32()),
        ("category_name", pa.string()),
        ("channel_id", pa.string()),
        ("channel_title", pa.string()),
        ("publish_time", pa.string()),
        ("trending_date", pa.string()),
        ("caption", pa.string()),
        ("url", pa.string()),
        ("sample_key", pa.string()),
        ("shard_id", pa.int32()),
    ]
)


def plan_path(output: str) -> str:
    """Where the build plan of ``output`` is stored."""
    return os.path.join(output, BUILD_DIR, "plan.parquet")


def render_caption(template: str, row: dict) -> str:
    """``--caption-template`` with the row's fields; ``{tags}`` is comma-joined."""
    fields = dict(row)
    fields["tags"] = ", ".join(row.get("tags") or [])
    names = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    unknown = names - set(fields)
    if unknown:
        raise ValueError(
            f"--caption-template uses unknown field(s) {sorted(unknown)}; available: {sorted(fields)}"
        )
    return template.format(**{k: ("" if v is None else v) for k, v in fields.items()})


def check_caption_template(template: str) -> str | None:
    """None when ``template`` renders every row, else a one-line error saying what to write.

    Tried on a full row and on an empty one (a format spec such as ``{category_id:03d}`` fails
    on a row without a category), before any download, so a typo never stops a build midway.
    """
    hint = (
        f"Use field names in braces from: {', '.join(metadata.FIELDS)}, e.g. '{{title}}. Tags: {{tags}}' "
        "(write {{ and }} for a literal brace)."
    )
    full = {name: "x" for name in metadata.FIELDS} | {"tags": ["a", "b"], "category_id": 24}
    empty = {name: "" for name in metadata.FIELDS} | {"tags": [], "category_id": None}
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        unknown = sorted(names - set(metadata.FIELDS))
        if unknown:
            return f"--caption-template {template!r}: unknown field(s) {unknown}. {hint}"
        for row in (full, empty):
            render_caption(template, row)
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as err:
        return f"--caption-template {template!r}: {err}. {hint}"
    return None


def sample_key(shard_id: int, index: int, shard_size: int, oom_shard_count: int) -> str:
    """img2dataset's key formula: shard_id * 10**ceil(log10(shard_size)) + index, zero-padded."""
    oom_sample = _index_digits(shard_size)
    return f"{shard_id * 10**oom_sample + index:0{oom_sample + oom_shard_count}d}"


def load_plan(output: str) -> list[dict]:
    """The saved plan rows of ``output`` (empty when there is no plan yet). A plan that does not
    read (cut short by a copy or a disk error, or another file saved under its name) is a one-line
    SystemExit: it was a pyarrow traceback, and without the plan the shards cannot be matched to
    the input, so the build must not start a new one beside them."""
    path = plan_path(output)
    if not os.path.exists(path):
        return []
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise SystemExit(_unreadable_plan(path, str(err).splitlines()[0])) from None
    missing = [name for name in _PLAN_KEY_COLUMNS if name not in table.column_names]
    if missing:
        raise SystemExit(_unreadable_plan(path, f"no column(s) {missing}"))
    return table.to_pylist()


# The columns a resume cannot do without: which videos were planned, into which shard and key.
_PLAN_KEY_COLUMNS = ("video_id", "caption", "sample_key", "shard_id")


def _unreadable_plan(path: str, why: str) -> str:
    return (
        f"{path}: the build plan does not read ({why}); it maps this output's shards and keys to the "
        "input, so the build stopped before changing anything. Put back an intact copy of the plan "
        "(from a backup of this output), or build into a new --output"
    )


def extend_plan(
    plan: list[dict],
    rows: Sequence[dict],
    *,
    shard_size: int,
    oom_shard_count: int,
    caption_template: str,
    url_template: str,
    first_variant: str,
) -> list[dict]:
    """Append rows whose video id is not planned yet, in new shards after the last one."""
    known = {r["video_id"] for r in plan}
    fresh = [r for r in rows if r["video_id"] not in known]
    next_shard = max((r["shard_id"] for r in plan), default=-1) + 1
    extended = list(plan)
    for offset, row in enumerate(fresh):
        shard_id = next_shard + offset // shard_size
        planned = {k: row.get(k) for k in PLAN_SCHEMA.names}
        planned.update(
            caption=render_caption(caption_template, row),
            url=youtube.thumbnail_url(row["video_id"], first_variant, url_template),
            sample_key=sample_key(shard_id, offset % shard_size, shard_size, oom_shard_count),
            shard_id=shard_id,
        )
        extended.append(planned)
    return extended


def input_drift(plan: Sequence[dict], rows: Sequence[dict], caption_template: str) -> dict[str, int]:
    """How the current input differs from a saved ``plan``, per video id (row order never
    matters): planned videos no longer in the input, planned videos whose caption the input (or
    the ``--caption-template``) now renders differently, and videos new to the plan."""
    current = {r["video_id"]: r for r in rows}
    planned = {r["video_id"]: r for r in plan}
    changed = sum(
        1
        for vid, row in current.items()
        if vid in planned and render_caption(caption_template, row) != planned[vid]["caption"]
    )
    return {
        "planned_not_in_input": sum(1 for vid in planned if vid not in current),
        "captions_changed_since_plan": changed,
        "new_in_plan": sum(1 for vid in current if vid not in planned),
    }


def describe_drift(drift: dict[str, int], had_plan: bool) -> str | None:
    """One line saying what a resume does with an input that changed since the plan, or None."""
    if not had_plan:
        return None
    if drift["planned_not_in_input"] or drift["captions_changed_since_plan"]:
        return (
            "[dataset_tools] the input changed since the plan was made; the plan is kept, so keys "
            f"never move: {drift['planned_not_in_input']} planned videos are not in the input any more "
            f"(still built), {drift['captions_changed_since_plan']} have another title or caption now "
            f"(the plan's caption is kept), {drift['new_in_plan']} are new (new shards). To build the "
            "current input alone, use a new --output"
        )
    if drift["new_in_plan"]:
        return f"[dataset_tools] {drift['new_in_plan']} videos are new since the plan was made: new shards"
    return None


def save_plan(
    output: str,
    plan: list[dict],
    shard_size: int | None = None,
    image_options: dict | None = None,
    url_template: str | None = None,
) -> None:
    """Write the plan atomically (a temporary file, fsync, then a rename), with the ``--shard-size``
    and the image options (``IMAGE_OPTIONS``) it was made with in the file's metadata, so that a
    resume can keep them, and the ``--url-template`` its ``url`` column was rendered with, so that
    a resume can say when it changed. A write the disk refuses (full, read-only ``_build/``) is a
    one-line SystemExit; the previous plan stays whole."""
    path = plan_path(output)
    schema = PLAN_SCHEMA
    recorded = {}
    if shard_size is not None:
        recorded[SHARD_SIZE_KEY] = str(shard_size)
    if image_options is not None:
        recorded[IMAGE_OPTIONS_KEY] = json.dumps(image_options, sort_keys=True)
    if url_template is not None:
        recorded[URL_TEMPLATE_KEY] = url_template
    if recorded:
        schema = schema.with_metadata(recorded)
    table = pa.Table.from_pylist(plan, schema=schema)
    # The fixed temporary name is the one ``build`` removes when a killed build left it behind.
    tmp = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "wb") as sink:
            pq.write_table(table, sink)
            sink.flush()
            os.fsync(sink.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # gone already, or the folder refuses even that
            os.remove(tmp)
        raise SystemExit(
            f"{path}: could not write the build plan ({err.strerror or err}); free space or make "
            f"{os.path.dirname(path)} writable, then run the same build again (any earlier plan there "
            "is left as it was)"
        ) from None


SHARD_SIZE_KEY = b"dataset_tools.shard_size"
IMAGE_OPTIONS_KEY = b"dataset_tools.image_options"
URL_TEMPLATE_KEY = b"dataset_tools.url_template"
# The build options that decide the bytes of every image: a resume or ``--retry-failed`` with
# other values wrote images of another size or encoding into the shards beside the old ones.
# ``variants`` (the thumbnail ladder) too: a resume with ``--variants hqdefault`` after
# ``mqdefault`` fetched 4:3 thumbnails for the new shards beside the old 16:9 ones, from other
# URLs than the plan's ``url`` column names.
IMAGE_OPTIONS = (
    "image_size",
    "resize_mode",
    "resize_only_if_bigger",
    "encode_quality",
    "crop_letterbox",
    "variants",
)


def planned_image_options(output: str) -> dict | None:
    """The image options (``IMAGE_OPTIONS``) the saved plan of ``output`` was made with; None
    when there is no plan or it was saved before they were recorded (nothing to keep then)."""
    path = plan_path(output)
    if not os.path.exists(path):
        return None
    recorded = (pq.read_schema(path).metadata or {}).get(IMAGE_OPTIONS_KEY)
    if recorded is None:
        return None
    values = json.loads(recorded)
    # JSON has no tuples: the ladder comes back as a list, the config holds a tuple.
    return {
        name: tuple(values[name]) if isinstance(values[name], list) else values[name]
        for name in IMAGE_OPTIONS
        if name in values
    }


def planned_url_template(
    output: str, plan: Sequence[dict], url_template: str, first_variant: str
) -> str | None:
    """What the saved plan of ``output`` fetches from, when that is not ``url_template`` (else None):
    the template recorded with the plan, or for a plan saved before it was recorded, one of its
    URLs that ``url_template`` would not render (``first_variant`` is the plan's first rung)."""
    path = plan_path(output)
    if not plan or not os.path.exists(path):
        return None
    recorded = (pq.read_schema(path).metadata or {}).get(URL_TEMPLATE_KEY)
    if recorded is not None:
        recorded = recorded.decode()
        return None if recorded == url_template else recorded
    for row in plan:
        if row.get("url") != youtube.thumbnail_url(row["video_id"], first_variant, url_template):
            return row.get("url") or "(no URL)"
    return None


def with_url_template(plan: Sequence[dict], url_template: str, first_variant: str) -> list[dict]:
    """The plan rows with their ``url`` rendered from ``url_template``: the URL each row is fetched
    from now (the download asks the current template; a failed row's record names this URL)."""
    return [
        dict(row, url=youtube.thumbnail_url(row["video_id"], first_variant, url_template)) for row in plan
    ]


def planned_shard_size(output: str, plan: Sequence[dict], requested: int, oom_shard_count: int) -> int:
    """The ``--shard-size`` the saved plan of ``output`` was made with (``requested`` when there
    is no plan). A plan saved before the size was recorded is read from its shards: a size that
    fits every planned shard and gives its key width is taken as it is, else the largest shard's
    row count (exact whenever a shard of the first run filled up)."""
    path = plan_path(output)
    if not plan or not os.path.exists(path):
        return requested
    recorded = (pq.read_schema(path).metadata or {}).get(SHARD_SIZE_KEY)
    if recorded is not None:
        return int(recorded)
    largest = max(len(rows) for rows in by_shard(plan).values())
    width = len(plan[0]["sample_key"]) - oom_shard_count
    if requested >= largest and _index_digits(requested) == width:
        return requested
    return largest


def _index_digits(shard_size: int) -> int:
    """Digits of the in-shard index in a sample key (img2dataset's ``oom_sample_per_shard``)."""
    return max(1, math.ceil(math.log10(shard_size)))


def by_shard(plan: Sequence[dict]) -> dict[int, list[dict]]:
    """The plan rows grouped by shard id, in plan order."""
    groups: dict[int, list[dict]] = {}
    for row in plan:
        groups.setdefault(row["shard_id"], []).append(row)
    return groups


def write_feather(path: str, rows: Sequence[dict]) -> None:
    """One img2dataset input slice (Arrow IPC file), columns of the plan minus shard_id."""
    schema = pa.schema([f for f in PLAN_SCHEMA if f.name != "shard_id"])
    table = pa.Table.from_pylist([{k: r[k] for k in schema.names} for r in rows], schema=schema)
    with pa.OSFile(path, "wb") as sink:
        with pa.ipc.new_file(sink, schema) as writer:
            writer.write_table(table)
