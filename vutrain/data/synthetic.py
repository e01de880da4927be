"""Synthetic, learnable image-text shards: coloured shapes on a noisy grey background.

Each sample is one of ``len(CLASSES)`` classes built from two attributes (colour x shape), so
neither attribute alone names the class. Titles mention both words in varied templates and the
tags list them, so a tiny CLIP learns the words that zero-shot prompts ("a photo of a red
circle") use. Shards follow the img2dataset layout (see design.md, "Shard layout"):

    OUT/train/00000.tar  00000.parquet  00000_stats.json  ...  sizes.json  __len__
    OUT/val/...          (held out: different per-sample seeds, hence different images)

CLI: ``python -m vutrain.data.synthetic --out DIR --num-samples N --shard-size K``.
Deterministic for a seed: per-sample RNGs are derived from (seed, split, index). A re-run into the
same OUT replaces its train/ and val/ whole (``OUT/.vutrain_synthetic`` marks them as this
writer's; an OUT written before the marker is recognised by its tars); train/ or val/ holding
anything else is refused.

The per-shard ``.parquet`` (img2dataset's row table) needs pyarrow, which only the ``data`` extra
installs; without it the shards are written without it (the trainer reads the tars, ``sizes.json``
and ``_stats.json`` only) and the CLI says so once.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import tarfile
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 225),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 200),
    "orange": (250, 140, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
CLASSES: list[str] = [f"{c} {s}" for c in COLOURS for s in SHAPES]
"""The 24 class names, e.g. "red circle"; ``category_name`` of every sample is one of them."""

_TITLE_TEMPLATES = (
    "{colour} {shape}",
    "a big {colour} {shape} on a grey background",
    "{shape} in {colour}! best video ever",
    "learn colours and shapes: the {colour} {shape}",
    "my {colour} {shape} compilation 2017",
    "watch this {colour} {shape} | top 10 shapes",
    "the {shape} is {colour} (official video)",
    "{colour} {shape} for kids",
    "thumbnail of a {colour} {shape}",
    "a photo of my {colour} {shape} :)",
)
_FILLER_TAGS = ("shapes", "colours", "kids", "learning", "geometry", "art", "daily", "vlog")
_ID_ALPHABET = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"))
_SPLIT_IDS = {"train": 0, "val": 1}
_MTIME = 1_500_000_000  # fixed tar mtime so tars are byte-reproducible for a seed
SYNTHETIC_MARKER = ".vutrain_synthetic"
"""In OUT: its train/ and val/ were written here, so a later run may replace what they hold."""
_WRITTEN_NAME = re.compile(r"(\d{5,}(\.tar|\.parquet|_stats\.json)|sizes\.json|__len__)")
"""The names this writer gives the files of a split folder."""


def parquet_available() -> bool:
    """Whether pyarrow (the ``data`` extra) is installed, so shards get their ``.parquet`` table."""
    return importlib.util.find_spec("pyarrow") is not None


def _write_parquet(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw ``shape`` centred at (cx, cy) with half-extent ``r`` pixels."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85  # a square of equal half-width looks much bigger than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_image(rng: np.random.Generator, class_index: int, image_size: int) -> Image.Image:
    """One RGB ``image_size`` x ``image_size`` image of class ``CLASSES[class_index]``.

    Mild jitter (position +-10%, size 28-40% of the side, colour +-15 per channel) and light
    Gaussian background noise keep the task non-trivial without making it ambiguous.
    """
    colour, shape = CLASSES[class_index].split(" ")
    s = image_size
    background = 140 + rng.normal(0.0, 10.0, size=(s, s, 1)) + rng.normal(0.0, 4.0, size=(s, s, 3))
    img = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLOURS[colour])
    cx, cy = s * (0.5 + rng.uniform(-0.1, 0.1)), s * (0.5 + rng.uniform(-0.1, 0.1))
    _draw_shape(ImageDraw.Draw(img), shape, cx, cy, s * rng.uniform(0.28, 0.40), fill)
    return img


def _sample_metadata(rng: np.random.Generator, class_index: int, image_size: int, jpeg: bytes) -> dict:
    """Fake but well-formed YouTube-style metadata for one sample (the ``<key>.json`` payload)."""
    colour, shape = CLASSES[class_index].split(" ")
    title = _TITLE_TEMPLATES[rng.integers(len(_TITLE_TEMPLATES))].format(colour=colour, shape=shape)
    fillers = [str(t) for t in rng.choice(_FILLER_TAGS, size=2, replace=False)]
    video_id = "".join(rng.choice(_ID_ALPHABET, size=11))
    return {
        "video_id": video_id,
        "title": title,
        "tags": [colour, shape, f"{colour} {shape}", *fillers],
        "category_id": class_index,
        "category_name": CLASSES[class_index],
        "url": f"https://i.ytimg.com/vi/{video_id}/hqdefault.jpg",
        "variant": "hqdefault",
        "caption": title,
        "width": image_size,
        "height": image_size,
        "original_width": image_size,
        "original_height": image_size,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
        "status": "success",
        "error_message": None,
    }


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), _MTIME, 0o444
    tar.addfile(info, io.BytesIO(payload))


def _write_shard(
    out_dir: str,
    shard_id: int,
    indices: range,
    split: str,
    seed: int,
    image_size: int,
    key_digits: int,
    row_digits: int,
) -> int:
    """Write ``NNNNN.tar``, ``.parquet`` (with pyarrow) and (last, as the done marker) ``_stats.json``."""
    start = time.time()
    name = f"{shard_id:05d}"
    rows = []
    with tarfile.open(os.path.join(out_dir, f"{name}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
        for row, index in enumerate(indices):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
            class_index = int(rng.integers(len(CLASSES)))
            buf = io.BytesIO()
            render_image(rng, class_index, image_size).save(buf, format="JPEG", quality=90)
            jpeg = buf.getvalue()
            # img2dataset's key formula: shard_id * 10**ceil(log10(shard_size)) + row.
            key = f"{shard_id * 10**row_digits + row:0{key_digits}d}"
            meta = {"key": key, **_sample_metadata(rng, class_index, image_size, jpeg)}
            # Sorted member names (jpg < json < txt), samples in key order.
            _add_member(tar, f"{key}.jpg", jpeg)
            _add_member(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
            _add_member(tar, f"{key}.txt", meta["title"].encode("utf-8"))
            rows.append(meta)
    if parquet_available():
        _write_parquet(rows, os.path.join(out_dir, f"{name}.parquet"))
    stats = {
        "count": len(rows),
        "successes": len(rows),
        "failed_to_download": 0,
        "failed_to_resize": 0,
        "duration": time.time() - start,
        "start_time": start,
        "end_time": time.time(),
        "status_dict": {"success": len(rows)},
    }
    with open(os.path.join(out_dir, f"{name}_stats.json"), "w") as f:
        json.dump(stats, f, indent=4)
    return len(rows)


def _write_split(
    out_dir: str, split: str, num_samples: int, shard_size: int, image_size: int, seed: int
) -> str:
    """Write one split; returns its brace-expandable shard spec."""
    os.makedirs(out_dir, exist_ok=True)
    num_shards = math.ceil(num_samples / shard_size)
    row_digits = max(1, math.ceil(math.log10(shard_size))) if shard_size > 1 else 1
    sizes = {}
    for shard_id in range(num_shards):
        indices = range(shard_id * shard_size, min(num_samples, (shard_id + 1) * shard_size))
        sizes[f"{shard_id:05d}.tar"] = _write_shard(
            out_dir, shard_id, indices, split, seed, image_size, 5 + row_digits, row_digits
        )
    with open(os.path.join(out_dir, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=2)
    with open(os.path.join(out_dir, "__len__"), "w") as f:
        f.write(f"{num_samples}\n")
    last = num_shards - 1
    pattern = "00000" if last == 0 else f"{{00000..{last:05d}}}"
    return os.path.join(out_dir, f"{pattern}.tar")


def _claim_output(out_dir: str) -> None:
    """Empty ``out_dir``'s train/ and val/ of an earlier synthetic run, or refuse in one line.

    Shards are numbered from 00000 again, so a bigger earlier run's 00002..00007.tar (or a val/
    that ``val_samples=0`` no longer writes) stayed beside the new data, and a directory read
    mixed both. Only files this writer names, in an ``out_dir`` it marked (or, unmarked, whose tars
    carry its fingerprint), are removed: anything else (an img2dataset folder, a user's file) is
    refused, not overwritten.
    """
    split_dirs = [os.path.join(out_dir, split) for split in _SPLIT_IDS]
    marked = os.path.exists(os.path.join(out_dir, SYNTHETIC_MARKER))
    for split_dir in split_dirs:
        foreign = _foreign_names(split_dir, marked)
        if foreign:
            raise FileExistsError(
                f"{split_dir} already holds files the synthetic writer did not write here "
                f"({', '.join(sorted(foreign)[:3])}{', ...' if len(foreign) > 3 else ''}), and new "
                "shards would mix with them: pass an empty or new output folder, or delete that one"
            )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, SYNTHETIC_MARKER), "w", encoding="utf-8") as fh:
        fh.write("written by vutrain.data.synthetic: a later run replaces train/ and val/ here\n")
    for split_dir in split_dirs:
        if os.path.isdir(split_dir):
            for name in os.listdir(split_dir):
                os.remove(os.path.join(split_dir, name))
            os.rmdir(split_dir)


def _foreign_names(split_dir: str, marked: bool) -> list[str]:
    """The entries of ``split_dir`` a new run must not remove.

    Marked: any name this writer does not give. Unmarked (written before the marker existed, or
    never by this writer): the names are not enough, since img2dataset gives the same ones, so each
    shard must also be one of this writer's tars (``_is_synthetic_tar``); a folder with no such
    tar is foreign whole.
    """
    names = os.listdir(split_dir) if os.path.isdir(split_dir) else []
    if marked:
        return [name for name in names if not _WRITTEN_NAME.fullmatch(name)]
    ours_tars = {
        name for name in names if name.endswith(".tar") and _is_synthetic_tar(os.path.join(split_dir, name))
    }
    if not ours_tars:
        return names
    return [name for name in names if not _legacy_own_file(name, ours_tars)]


def _legacy_own_file(name: str, ours_tars: set[str]) -> bool:
    """Whether ``name`` in an unmarked split folder holding ``ours_tars`` is this writer's: the
    split's counts, or a shard file (tar, table, stats) whose tar is one of them."""
    if name in ("sizes.json", "__len__"):
        return True
    shard = re.match(r"\d+", name)
    return bool(_WRITTEN_NAME.fullmatch(name) and shard and f"{shard.group()}.tar" in ours_tars)


_MEMBER_NAME = re.compile(r"(\d+)\.(jpg|json|txt)")


def _is_synthetic_tar(path: str) -> bool:
    """Whether ``path`` is a tar this writer wrote (every version: fixed mtime since the first).

    Every member a read-only regular file named ``<digits>.jpg|json|txt`` with ``_MTIME`` and no
    owner names (img2dataset's webdataset TarWriter stamps the write time and "bigdata"), and the
    first sample's JSON naming one of ``CLASSES`` under its own key. Unreadable or cut: not ours.
    """
    first_json = None
    try:
        with tarfile.open(path, "r:") as tar:
            members = 0
            for member in tar:
                match = _MEMBER_NAME.fullmatch(member.name)
                if not (match and member.isfile() and member.mtime == _MTIME and member.mode == 0o444):
                    return False
                if member.uname or member.gname:
                    return False
                if first_json is None and match.group(2) == "json":
                    first_json = (match.group(1), json.loads(tar.extractfile(member).read()))
                members += 1
    except (OSError, tarfile.TarError, ValueError, UnicodeDecodeError):
        return False
    if not members or first_json is None:
        return False
    key, meta = first_json
    return isinstance(meta, dict) and meta.get("key") == key and meta.get("category_name") in CLASSES


def write_synthetic(
    out_dir: str,
    num_samples: int,
    shard_size: int,
    image_size: int = 64,
    seed: int = 0,
    val_samples: int | None = None,
) -> dict:
    """Write ``out_dir/train`` and ``out_dir/val`` shards of the coloured-shapes task.

    Args:
        num_samples: training samples (>= 1).
        shard_size: samples per tar (the last shard may hold fewer).
        image_size: side of the square JPEGs in pixels.
        seed: everything (classes, jitter, titles, ids) is a function of it.
        val_samples: held-out samples; ``None`` -> ``max(len(CLASSES), num_samples // 10)``;
            0 -> no val split.

    ``out_dir/train`` and ``out_dir/val`` must be new, empty, or an earlier run's of this writer
    (replaced whole); anything else is refused with ``FileExistsError``.

    Returns:
        ``{"train_shards": spec, "val_shards": spec | None, "num_samples": n, "val_samples": m,
        "classes": CLASSES}`` where a spec is brace-expandable (``.../{00000..00003}.tar``).
    """
    if num_samples < 1 or shard_size < 1 or image_size < 8 or seed < 0:
        raise ValueError(
            f"need num_samples >= 1, shard_size >= 1, image_size >= 8 and seed >= 0; got "
            f"{num_samples}, {shard_size}, {image_size}, {seed}"
        )
    if val_samples is not None and val_samples < 0:
        raise ValueError(f"need val_samples >= 0 (0: no val split); got {val_samples}")
    if val_samples is None:
        val_samples = max(len(CLASSES), num_samples // 10)
    _claim_output(out_dir)
    train = _write_split(os.path.join(out_dir, "train"), "train", num_samples, shard_size, image_size, seed)
    val = None
    if val_samples > 0:
        val = _write_split(os.path.join(out_dir, "val"), "val", val_samples, shard_size, image_size, seed)
    return {
        "train_shards": train,
        "val_shards": val,
        "num_samples": num_samples,
        "val_samples": val_samples,
        "classes": list(CLASSES),
    }


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (0 or a negative count was a traceback, and a
    negative --val-samples silently wrote no val split)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {text}")
        return value

    parse.__name__ = "integer"  # argparse names the type in its message for a non-integer
    return parse


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; prints the shard specs to pass as data.train_shards / data.val_shards."""
    parser = argparse.ArgumentParser(
        prog="python -m vutrain.data.synthetic", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out",
        required=True,
        help="output directory (train/ and val/ are created in it, or replaced if an earlier run wrote them)",
    )
    parser.add_argument("--num-samples", type=_at_least(1), required=True, help="training samples")
    parser.add_argument("--shard-size", type=_at_least(1), required=True, help="samples per tar shard")
    parser.add_argument("--image-size", type=_at_least(8), default=64, help="image side in pixels")
    parser.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    parser.add_argument(
        "--val-samples",
        type=_at_least(0),
        default=None,
        help="held-out samples (default max(24, num_samples // 10); 0 disables)",
    )
    args = parser.parse_args(argv)
    try:
        info = write_synthetic(
            args.out, args.num_samples, args.shard_size, args.image_size, args.seed, args.val_samples
        )
    except OSError as exc:  # --out a file, no permission, disk full: one line, not a traceback
        parser.exit(1, f"error: cannot write the shards under --out {args.out}: {exc}\n")
    print(f"data.train_shards={info['train_shards']}")
    if info["val_shards"]:
        print(f"data.val_shards={info['val_shards']}")
    print(f"data.num_samples={info['num_samples']}  classes={len(CLASSES)}")
    if not parquet_available():
        print(
            "note: pyarrow is not installed, so no .parquet row tables were written (the trainer does "
            "not need them; pip install 'vutrain[data]' for img2dataset's full layout)"
        )
    return info


if __name__ == "__main__":
    main()
