"""The samples TrainStreams draw: their keys, read through the stream's own test hook
(SAMPLE_LOG_ENV), or their video ids, carried through the batch by a caption tokenized into its bytes."""

from __future__ import annotations

import glob
import os

import torch

from vutrain.data.epoch_remainder import SAMPLE_LOG_ENV


def draw_keys(streams, steps, log_dir, monkeypatch) -> list[str]:
    """Keys of ``steps`` batches from every stream, in the order the streams' workers logged them."""
    monkeypatch.setenv(SAMPLE_LOG_ENV, str(log_dir / "keys"))
    for _ in range(steps):
        for s in streams:
            next(s)
    for s in streams:
        s.close()
    keys = []
    for path in sorted(glob.glob(str(log_dir / "keys.*"))):
        keys += open(path).read().split()
        os.remove(path)
    return keys


def tokenize_caption_bytes(captions: list[str]) -> dict:
    """A tokenizer whose ids are the caption's bytes (up to 24): with `caption_template="{video_id}"`
    a batch's input_ids name its samples."""
    ids = torch.zeros(len(captions), 24, dtype=torch.long)
    for row, caption in enumerate(captions):
        data = caption.encode()[:24]
        ids[row, : len(data)] = torch.tensor(list(data))
    return {"input_ids": ids}


def batch_captions(batch: dict) -> list[str]:
    """The captions back from a batch tokenized by `tokenize_caption_bytes`."""
    return ["".join(map(chr, filter(None, row.tolist()))) for row in batch["input_ids"]]
