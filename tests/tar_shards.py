"""Real tar shards for the stream tests, written with tarfile, and the training stream that reads
them as a run does on one rank: small flat-colour images, a preprocess that keeps the pixels and a
tokenizer whose one id is the caption's length (so a test can tell which caption came through)."""

from __future__ import annotations

import io
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


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float()


def length_ids(captions: list[str]) -> dict:
    """One token a caption: its length."""
    ids = torch.tensor([[len(c)] for c in captions])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def one_rank_stream(
    shard: str, num_samples: int, shuffle_buffer: int = 2, tokenize=length_ids
) -> TrainStream:
    """The training stream of rank 0 of 1, one sample a batch, no workers, seed 0."""
    return TrainStream(
        shard,
        preprocess=to_tensor,
        tokenize=tokenize,
        batch_size=1,
        rank=0,
        world_size=1,
        num_workers=0,
        seed=0,
        shuffle_buffer=shuffle_buffer,
        num_samples=num_samples,
    )
