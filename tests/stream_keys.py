"""The sample keys TrainStreams draw, read through the stream's own test hook (SAMPLE_LOG_ENV)."""

from __future__ import annotations

import glob
import os

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
