"""Every launch/ds_configs/*.json merges into the trainer's generated DeepSpeed config and trains.

The templates leave every key the trainer derives ("auto"), so the merged config carries the
trainer's batch sizes and precision and the template's ZeRO settings (about a second). Then each
template trains for real: a world-1 Trainer in this process with the template as train.ds_config,
three steps and a checkpoint (about 15 s each on 2 cores, hence `slow`).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest

from vutrain.config import ConfigError, load_config
from vutrain.ds_config import build_ds_config
from vutrain.metrics import read_metrics
from vutrain.optim import lr_lambda

from inprocess_trainer import train

TEMPLATES = Path(__file__).resolve().parents[1] / "launch" / "ds_configs"
STAGES = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def test_every_shipped_template_is_listed_here():
    assert sorted(p.name for p in TEMPLATES.glob("*.json")) == sorted(STAGES)


def data(shards: dict) -> list[str]:
    """Existing shards, so that no shard check can reject the run file (tiny.yaml names demo_out/)."""
    return [f"data.train_shards={shards['train_shards']}", f"data.val_shards={shards['val_shards']}"]


@pytest.mark.parametrize("name,stage", sorted(STAGES.items()))
def test_template_merges(name, stage, tiny_shards):
    path = TEMPLATES / name
    cfg = load_config(
        "tiny",
        [
            *data(tiny_shards),
            f"train.ds_config={path}",
            f"train.zero_stage={stage}",
            "train.micro_batch_size=8",
        ],
    )
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


def test_template_stage_must_match_train_zero_stage(tiny_shards):
    path = TEMPLATES / "zero3.json"
    cfg = load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2"])
    with pytest.raises(ConfigError, match="zero_optimization.stage=3"):
        build_ds_config(cfg.train, world_size=2)


@pytest.mark.slow
@pytest.mark.parametrize("name,stage", sorted(STAGES.items()))
def test_template_trains_and_checkpoints(name, stage, tiny_shards, tmp_path, single_process):
    """The engine accepts the template with the trainer's own optimizer and LR schedule, and trains."""
    run_dir = str(tmp_path / "run")
    train(
        tiny_shards,
        run_dir,
        steps=3,
        train__ds_config=str(TEMPLATES / name),
        train__zero_stage=stage,
        train__lr=1e-3,
        train__warmup_steps=2,
        eval__every=0,
        data__val_shards="",
    )
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(0 < r["train/loss"] < 10 for r in rows), rows
    # The LR is the trainer's warm-up + cosine schedule (a template brings no scheduler of its own).
    schedule = [
        1e-3
        * lr_lambda(
            s, load_config("tiny", [*data(tiny_shards), "train.max_steps=3", "train.warmup_steps=2"]).train
        )
        for s in range(4)
    ]
    assert [r["train/lr"] for r in rows] == pytest.approx(schedule[:3]) or [
        r["train/lr"] for r in rows
    ] == pytest.approx(schedule[1:4])
    assert glob.glob(os.path.join(run_dir, "checkpoints", "step_00000003", "*"))
