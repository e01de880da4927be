"""Review: what the trainer's losses and DeepSpeed config leave out of each step.

* The losses agree, at each call, that every rank passes one shape (test_review_losses8.py): one
  small host all-reduce per step, which also holds each step until every host reached it. The
  trainer's stream gives every rank full local batches of one size, so the losses it builds
  (`build_loss_from_config`) skip it; a loss built by hand keeps it.
* gloo on CUDA tensors (two ranks on one GPU) cannot reduce-scatter: the engine turns
  `reduce_scatter` off. It was only defaulted, so a JSON config asking for it
  (launch/ds_configs/zero2.json) kept it and the fallback never applied.
"""

from __future__ import annotations

import logging

import pytest
from test_launch_ds_configs import TEMPLATES, data

from vutrain.config import LossConfig, load_config
from vutrain.ds_config import build_ds_config
from vutrain.engine import reduce_with_all_reduce
from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss
from vutrain.losses.factory import build_loss_from_config


@pytest.mark.parametrize(
    "name,extra,cls",
    [
        ("clip", {}, ClipLoss),
        ("siglip", {}, SigLipLoss),
        ("siglip", {"bidir": True}, SigLipLoss),
        ("align_uniform", {}, AlignUniformLoss),
    ],
)
def test_the_trainers_losses_skip_the_per_step_shape_agreement(name, extra, cls):
    built = build_loss_from_config(LossConfig(name=name, **extra), rank=0, world_size=2)
    assert isinstance(built, cls)
    assert built.check_shapes is False
    assert cls(rank=0, world_size=2).check_shapes is True  # by hand: checked


def test_a_json_asking_for_reduce_scatter_is_all_reduced_under_gloo_on_cuda(tiny_shards, caplog):
    cfg = load_config(
        "tiny", [*data(tiny_shards), f"train.ds_config={TEMPLATES / 'zero2.json'}", "train.zero_stage=2"]
    )
    merged = build_ds_config(cfg.train, world_size=2)
    assert merged["zero_optimization"]["reduce_scatter"] is True  # what zero2.json asks for
    with caplog.at_level(logging.WARNING, logger="vutrain.engine"):
        reduce_with_all_reduce(merged)
    assert merged["zero_optimization"]["reduce_scatter"] is False
    assert [r.getMessage() for r in caplog.records if "reduce_scatter=true" in r.getMessage()]


def test_a_config_without_the_key_gets_it_off_without_a_word(caplog):
    merged = {"zero_optimization": {"stage": 1}}
    with caplog.at_level(logging.WARNING, logger="vutrain.engine"):
        reduce_with_all_reduce(merged)
    assert merged["zero_optimization"]["reduce_scatter"] is False
    assert not caplog.records
