"""Shared fixtures: small synthetic shards (real JPEG tars) made once per test session."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's albumentations phones home
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.join(REPO, "tests"))

import torch  # noqa: E402

# Triton's interpreter must be chosen before Triton is first imported anywhere in the session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """{"train_shards", "val_shards", "num_samples", "dir"}: 1024 training samples in 8 shards."""
    from vutrain.data.synthetic import write_synthetic
    out = tmp_path_factory.mktemp("synthetic")
    info = write_synthetic(str(out), num_samples=1024, shard_size=128, val_samples=96, seed=0)
    info["dir"] = str(out)
    return info
