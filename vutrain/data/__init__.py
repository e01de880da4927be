"""Trainer data pipeline: shard streams, CLIP preprocessing, BPE tokenizer, synthetic data set."""

from .captions import render_caption
from .preprocess import make_fast_preprocess, make_preprocess
from .shards import expand_shards
from .val import ValStream, collect_label_values, iter_val_batches
from .webdataset import TrainStream

__all__ = [
    "TrainStream",
    "ValStream",
    "iter_val_batches",
    "collect_label_values",
    "expand_shards",
    "render_caption",
    "make_preprocess",
    "make_fast_preprocess",
]
