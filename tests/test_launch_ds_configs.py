"""launch/ds_configs/*.json merge into the trainer's generated DeepSpeed config.

The templates leave every key the trainer derives ("auto"), so the merged config carries the
trainer's batch sizes and precision and the template's ZeRO settings. Runtime: about a second.
"""
from __future__ import annotations

import json

import pytest

from slurm_cluster import REPO
from vutrain.config import ConfigError, load_config
from vutrain.ds_config import build_ds_config

CONFIGS = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


@pytest.mark.parametrize("name,stage", sorted(CONFIGS.items()))
def test_template_merges(name, stage):
    path = REPO / "launch" / "ds_configs" / name
    cfg = load_config(str(REPO / "vutrain/configs/tiny.yaml"),
                      [f"train.ds_config={path}", f"train.zero_stage={stage}", "train.micro_batch_size=8"])
    merged = build_ds_config(cfg.train, world_size=4)
    assert merged["train_micro_batch_size_per_gpu"] == 8
    assert merged["train_batch_size"] == 8 * cfg.train.grad_accum_steps * 4
    assert merged["zero_optimization"]["stage"] == stage
    assert "auto" not in json.dumps(merged), merged
    template = json.loads(path.read_text())
    for key, value in template["zero_optimization"].items():
        assert merged["zero_optimization"][key] == value
    if name == "zero3_offload.json":
        assert merged["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_template_stage_must_match_train_zero_stage():
    path = REPO / "launch" / "ds_configs" / "zero3.json"
    with pytest.raises(ConfigError, match="zero_optimization.stage=3"):
        build_ds_config(load_config(str(REPO / "vutrain/configs/tiny.yaml"),
                                    [f"train.ds_config={path}", "train.zero_stage=2"]).train, world_size=2)
