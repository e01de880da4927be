"""Real tar shards for the stream tests, written with tarfile, and the training streams that read
them as a run does on one rank or on simulated ranks (damaged shards too, for the skip counts): small
flat-colour images, a preprocess that keeps the pixels and a tokenizer whose one id is the caption's
length (so a test can tell which caption came through)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import torch
from PIL import Image

from vutrain.data import TrainStream

IMAGE = 8


def image_bytes(fmt: str = "JPEG", grey: int = 128) -> bytes:
    """An IMAGE x IMAGE picture of one grey, encoded as `fmt` (a PIL format name)."""
    out = io.BytesIO()
    Image.fromarray(np.full((IMAGE, IMAGE, 3), grey, np.uint8)).save(out, fmt)
    return out.getvalue()


def write_members(path, members: list[tuple[str, bytes]]) -> str:
    """A tar of `members` ((name, bytes) pairs) in the order given, repeats included."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def rewrite_members(shard: str, edit) -> None:
    """Rewrite `shard` in place, its members in tar order with their headers: `edit(name, payload)`
    gives the bytes to keep under that name, or None to leave the member out."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, payload in members:
            payload = edit(member.name, payload)
            if payload is not None:
                member.size = len(payload)
                tar.addfile(member, io.BytesIO(payload))


def break_jpegs(shard: str, count: int | None = None) -> int:
    """Replace the first `count` JPEGs of `shard` (all of them: None) by bytes no decoder reads;
    returns how many were replaced."""
    broken = 0

    def edit(name: str, payload: bytes) -> bytes:
        nonlocal broken
        if name.endswith(".jpg") and (count is None or broken < count):
            broken += 1
            return b"not a jpeg"
        return payload

    rewrite_members(shard, edit)
    return broken


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def length_ids(captions: list[str]) -> dict:
    """One token a caption: its length."""
    ids = torch.tensor([[len(c)] for c in captions])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def one_rank_stream(
    shard: str, num_samples: int, shuffle_buffer: int = 2, tokenize=length_ids, **stream_kw
) -> TrainStream:
    """The training stream of rank 0 of 1, one sample a batch, no workers, seed 0; `stream_kw`:
    further TrainStream arguments (caption_template, positives, ...)."""
    return rank_streams(shard, 1, 1, shuffle_buffer, num_samples, tokenize=tokenize, **stream_kw)[0]


def rank_streams(
    shards: str,
    world: int,
    batch: int,
    shuffle_buffer: int,
    num_samples: int,
    workers: int = 0,
    tokenize=length_ids,
    **stream_kw,
) -> list[TrainStream]:
    """The training streams of ranks 0..world-1 (simulated: no process group; the data plan is a pure
    function of seed, epoch, rank and worker), `batch` samples a batch a rank, seed 0."""
    return [
        TrainStream(
            shards,
            preprocess=to_tensor,
            tokenize=tokenize,
            batch_size=batch,
            rank=r,
            world_size=world,
            num_workers=workers,
            seed=0,
            shuffle_buffer=shuffle_buffer,
            num_samples=num_samples,
            **stream_kw,
        )
        for r in range(world)
    ]


def write_two_image_shards(root, shards: int, per_shard: int, damaged: bool = False) -> str:
    """`shards` tars root/0.tar.. of `per_shard` samples s{s}k{k}, each a JPEG, a second image (a PNG:
    ignored and counted as `ignored_member`, the sample trains) and the caption "caption {k}". With
    `damaged`, each shard ends in one more sample cut short inside its own second member: dropped, one
    `tar_error` after the last readable sample. Returns the shards' brace pattern."""
    jpg, png = image_bytes(), image_bytes("PNG")
    for s in range(shards):
        members = []
        for k in range(per_shard):
            key = f"s{s}k{k}"
            members += [(f"{key}.jpg", jpg), (f"{key}.png", png), (f"{key}.txt", b"caption %d" % k)]
        if damaged:
            members += [(f"s{s}k{per_shard}.jpg", jpg), (f"s{s}k{per_shard}.png", bytes(4096))]
        path = write_members(root / f"{s}.tar", members)
        if damaged:
            with tarfile.open(path) as tar:
                cut = tar.getmember(f"s{s}k{per_shard}.png").offset_data + 100
            with open(path, "r+b") as fh:
                fh.truncate(cut)
    return f"{root}/{{0..{shards - 1}}}.tar"


def save_and_resume(old: list[TrainStream], steps: int, new: list[TrainStream]) -> list[TrainStream]:
    """A checkpoint of the ranks `old` after `steps` batches each, resumed by the ranks `new` (any
    world size): their states saved as the trainer saves them (``{"ranks": [rank 0's, ...]}``), `old`
    closed, the states loaded into every stream of `new`; returns `new`."""
    for _ in range(steps):
        for s in old:
            next(s)
    states = {"ranks": [s.state_dict() for s in old]}
    for s in old:
        s.close()
    for s in new:
        s.load_state_dict(states)
    return new


def summed_skips(streams: list[TrainStream], epoch: int = 1) -> dict:
    """Run every stream to the start of `epoch` and close it; the skip counts summed over the ranks."""
    total = {}
    for s in streams:
        while s.epoch < epoch:
            next(s)
        s.close()
        for reason, n in s.skipped().items():
            total[reason] = total.get(reason, 0) + n
    return total


def read_captions(shard: str, count: int, caption_template: str) -> list[tuple[str, set[int]]]:
    """The first `count` samples of `shard` in tar order (shuffle_buffer 1) through one rank's stream
    with tag positives: each sample's rendered caption and its tag ids."""
    captions = []

    def tokenize(texts):
        captions.extend(texts)
        return {"input_ids": [[0]] * len(texts), "attention_mask": [[1]] * len(texts)}

    stream = one_rank_stream(shard, count, 1, tokenize, caption_template=caption_template, positives="tags")
    with stream:
        batches = [next(stream) for _ in range(count)]
    labels = [{i for i in batch["labels"][0].tolist() if i != -1} for batch in batches]
    return list(zip(captions, labels, strict=True))


def write_built_shard(folder: str, shard_id: int, rows: list[dict], schema) -> None:
    """Shard `shard_id` of a dataset_tools folder (tar, parquet and stats, through dataset_tools.shards):
    one sample a row, keyed by its "key", with a rendered thumbnail, caption "c" and the row as JSON."""
    import os

    from dataset_tools import shards
    from dataset_tools.fake_host import render_thumbnail

    name = shards.shard_name(shard_id)
    samples = [
        (
            r["key"],
            {"jpg": render_thumbnail(r["key"], "mqdefault"), "txt": b"c", "json": json.dumps(r).encode()},
        )
        for r in rows
    ]
    shards.write_tar(os.path.join(folder, f"{name}.tar"), samples)
    shards.write_parquet(os.path.join(folder, f"{name}.parquet"), rows, schema)
    shards.write_stats(folder, shard_id, shards.stats_from_rows(rows, 0.0, 1.0))
