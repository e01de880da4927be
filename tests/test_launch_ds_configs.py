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
import re
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
    # Refused by the config check already (it runs start-up's DeepSpeed-config checks), and by
    # build_ds_config for a config built without it.
    with pytest.raises(ConfigError, match="zero_optimization.stage=3"):
        load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2"])
    cfg = load_config("tiny", [*data(tiny_shards), "train.zero_stage=2"])
    cfg.train.ds_config = str(path)
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
    # Each row shows the LR its step used (schedule[s - 1] at step s), not the next step's.
    assert [r["train/lr"] for r in rows] == pytest.approx(schedule[:3])
    assert glob.glob(os.path.join(run_dir, "checkpoints", "step_00000003", "*"))


def _user_json(tmp_path, **sections) -> str:
    path = tmp_path / "user.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, **sections}))
    return str(path)


def test_user_json_optimizer_keeps_the_trainers_schedule_and_settings(tiny_shards, tmp_path, single_process):
    """A ds_config "optimizer" (DeepSpeed builds it) still gets train.lr/betas/eps and the warm-up +
    cosine schedule, with each step's row showing the LR that step used."""
    run_dir = str(tmp_path / "run")
    settings = dict(train__lr=2e-3, train__warmup_steps=2, train__min_lr_ratio=0.1, train__eps=1e-7)
    optimizer = {"type": "AdamW", "params": {"torch_adam": True, "betas": "auto"}}
    captured = {}
    train(
        tiny_shards,
        run_dir,
        steps=4,
        on_trainer=lambda t: captured.update(optimizer=t.engine.optimizer),
        train__ds_config=_user_json(tmp_path, optimizer=optimizer),
        train__zero_stage=2,
        train__checkpoint_every=0,
        eval__every=0,
        data__val_shards="",
        **settings,
    )
    cfg = load_config(
        "tiny", [*data(tiny_shards), "train.max_steps=4", "train.warmup_steps=2", "train.min_lr_ratio=0.1"]
    )
    schedule = [2e-3 * lr_lambda(s, cfg.train) for s in range(4)]
    rows = [r for r in read_metrics(run_dir) if "train/loss" in r]
    assert [r["train/lr"] for r in rows] == pytest.approx(schedule), rows  # before: constant 1e-3
    group = captured["optimizer"].param_groups[0]
    assert tuple(group["betas"]) == (0.9, 0.98) and group["eps"] == 1e-7


@pytest.mark.parametrize(
    "sections,message",
    [
        ({"scheduler": {"type": "WarmupLR", "params": {}}}, 'has a "scheduler" section'),
        (
            {"optimizer": {"type": "Adam", "params": {"lr": 1e-4}}, "scheduler": {"type": "WarmupLR"}},
            "the trainer owns the LR schedule",
        ),
        ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, "optimizer.params.lr=0.0001 but train.lr"),
        (
            {"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.999]}}},
            "train.beta1/2 gives [0.9, 0.98]",
        ),
    ],
    ids=["scheduler", "scheduler-with-optimizer", "lr-disagrees", "betas-disagree"],
)
def test_user_json_schedule_or_disagreeing_optimizer_is_a_config_error(
    tiny_shards, tmp_path, sections, message
):
    path = _user_json(tmp_path, **sections)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2"])


def test_user_json_optimizer_that_agrees_is_accepted(tiny_shards, tmp_path):
    optimizer = {
        "type": "AdamW",
        "params": {"lr": 3e-3, "betas": [0.9, 0.98], "eps": "auto"},
    }  # tiny.yaml: lr 3e-3
    path = _user_json(tmp_path, optimizer=optimizer)
    load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2"])


@pytest.mark.parametrize(
    "sections,overrides,message",
    [
        ({"gradient_clipping": 0.5}, [], "gradient_clipping=0.5 but train.grad_clip=1.0"),
        ({"bf16": {"enabled": True}}, [], "bf16.enabled=true but train.precision=fp32"),
        (
            {"fp16": {"enabled": False}},
            ["train.precision=fp16"],
            "fp16.enabled=false but train.precision=fp16",
        ),
    ],
    ids=["clipping", "bf16-under-fp32", "fp16-off-under-fp16"],
)
def test_user_json_that_contradicts_train_keys_is_a_config_error(
    tiny_shards, tmp_path, monkeypatch, sections, overrides, message
):
    """DeepSpeed followed the JSON (a bf16 engine, another clip) while config.yaml, the logs and the
    trainer's own precision handling followed train.*, without a word."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # fp16 is refused on CPU first
    path = _user_json(tmp_path, **sections)
    with pytest.raises(ConfigError, match=re.escape(message) + '; set it to "auto"'):
        load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2", *overrides])
    agreeing = {key: {"enabled": "auto"} if isinstance(v, dict) else "auto" for key, v in sections.items()}
    path = _user_json(tmp_path, **agreeing)
    load_config("tiny", [*data(tiny_shards), f"train.ds_config={path}", "train.zero_stage=2", *overrides])
