"""A user's DeepSpeed JSON (train.ds_config) is read as DeepSpeed reads it, before anything starts.

DeepSpeed's ZeRO-1/2 optimizer never reads `zero_optimization.offload_param` (parameters are
offloaded at ZeRO-3 only), and ZeRO-0 has no ZeRO optimizer to offload: a real engine built from
such a JSON trained without the offload the JSON asked for, without a word. A misspelt key in the
zero_optimization, bf16 or fp16 section was refused by DeepSpeed only when the engine was built,
after the process group, the run directory and the tokenizer. DeepSpeed ignores a top-level key
it does not know, so "zero_optimisation" (stage 3, offload) or "gradient_cliping" trained without
them. All are now one config error from `build_ds_config`, which `vutrain/train.py` calls before
any process group.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from vutrain import train
from vutrain.config import ConfigError, TrainConfig
from vutrain.ds_config import build_ds_config

from helpers_dist import run_distributed

TEMPLATES = Path(__file__).resolve().parents[1] / "launch" / "ds_configs"


def _json(tmp_path, ds: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


# torch's AdamW on the CPU: a DeepSpeed JSON Adam would compile its CPU Adam op for 80 s
CPU_OPTIMIZER = {
    "zero_force_ds_cpu_optimizer": False,
    "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
}
IGNORED_OFFLOADS = {
    "param-at-zero1": (1, {"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}),
    "param-at-zero2": (2, {"zero_optimization": {"offload_param": {"device": "cpu", "pin_memory": True}}}),
    # DeepSpeed's older spelling of the same request
    "cpu_offload_param-at-zero2": (2, {"zero_optimization": {"stage": 2, "cpu_offload_param": True}}),
    "optimizer-at-zero0": (0, CPU_OPTIMIZER),
}


@pytest.mark.parametrize("stage, ds", IGNORED_OFFLOADS.values(), ids=IGNORED_OFFLOADS.keys())
def test_offload_the_stage_ignores_is_a_config_error(stage, ds, tmp_path):
    cfg = TrainConfig(micro_batch_size=4, zero_stage=stage, ds_config=_json(tmp_path, ds))
    key = "offload_param" if stage > 0 else "offload_optimizer"
    with pytest.raises(ConfigError, match=f"zero_optimization.{key} .*DeepSpeed ignores at ZeRO-{stage}"):
        build_ds_config(cfg, world_size=2)


@pytest.mark.parametrize(
    "stage, ds",
    [
        (3, json.loads((TEMPLATES / "zero3_offload.json").read_text())),
        (2, CPU_OPTIMIZER),
        (2, {"zero_optimization": {"offload_param": {"device": "none"}}}),
    ],
    ids=["shipped-zero3-offload", "optimizer-at-zero2", "param-device-none"],
)
def test_offload_that_deepspeed_reads_is_accepted(stage, ds, tmp_path):
    cfg = TrainConfig(micro_batch_size=4, zero_stage=stage, ds_config=_json(tmp_path, ds))
    merged = build_ds_config(cfg, world_size=2)
    assert merged["zero_optimization"]["stage"] == stage


@pytest.mark.parametrize(
    "ds, message",
    [
        (
            {"zero_optimization": {"stage": 2, "overlap_com": True}},
            "zero_optimization.overlap_com is not a DeepSpeed zero_optimization key: "
            'did you mean "overlap_comm"?',
        ),
        (
            {"bf16": {"enabled": "auto", "check_grad_overflw": True}},
            'bf16.check_grad_overflw is not a DeepSpeed bf16 key: did you mean "check_grad_overflow"?',
        ),
        (
            {"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
            "zero_optimization.offload_optimizer.device=\"gpu\": Input should be 'none', 'cpu' or 'nvme'",
        ),
    ],
    ids=["misspelt-zero-key", "misspelt-bf16-key", "bad-offload-device"],
)
def test_section_deepspeed_refuses_is_one_config_error_naming_the_key(ds, message, tmp_path):
    cfg = TrainConfig(micro_batch_size=4, zero_stage=2, ds_config=_json(tmp_path, ds))
    with pytest.raises(ConfigError) as err:
        build_ds_config(cfg, world_size=1)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_ignored_offload_stops_the_entry_point_before_anything_starts(tiny_shards, tmp_path, capsys):
    """Through `python vutrain/train.py`: one config error line, exit 2, no run directory (before:
    the run trained its steps at ZeRO-2 with the parameters in place)."""
    ds = {"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}
    run_dir = tmp_path / "run"
    argv = [
        "--config",
        "tiny",
        f"data.train_shards={tiny_shards['train_shards']}",
        f"data.val_shards={tiny_shards['val_shards']}",
        f"output_dir={run_dir}",
        f"train.ds_config={_json(tmp_path, ds)}",
        "train.zero_stage=2",
        "train.max_steps=1",
        "eval.every=0",
    ]
    assert train.main(argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("config error:")]
    assert len(errors) == 1 and "offload_param" in errors[0] and "ZeRO-2" in errors[0], errors
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "ds, near",
    [
        ({"zero_optimisation": {"stage": 3, "offload_param": {"device": "cpu"}}}, "zero_optimization"),
        ({"gradient_cliping": 1.0}, "gradient_clipping"),
        ({"train_micro_batch_size": 8}, "train_micro_batch_size_per_gpu"),
        ({"optimiser": {"type": "AdamW"}}, "optimizer"),
    ],
    ids=["zero_optimisation", "gradient_cliping", "micro-batch", "optimiser"],
)
def test_top_level_near_miss_is_a_config_error(ds, near, tmp_path):
    cfg = TrainConfig(micro_batch_size=4, zero_stage=2, grad_clip=0.0, ds_config=_json(tmp_path, ds))
    with pytest.raises(ConfigError, match=f'did you mean "{near}"'):
        build_ds_config(cfg, world_size=1)


def test_other_deepspeed_top_level_keys_are_accepted(tmp_path):
    ds = {
        "bfloat16": {"enabled": "auto"},
        "communication_data_type": "fp32",
        "zero_allow_untested_optimizer": True,
        "prescale_gradients": False,
        "gradient_predivide_factor": 1.0,
        "steps_per_print": 100,
        "activation_checkpointing": {"partition_activations": False},
        "flops_profiler": {"enabled": False},
        "comms_logger": {"enabled": False},
        "data_types": {"grad_accum_dtype": "fp32"},
    }
    cfg = TrainConfig(micro_batch_size=4, zero_stage=2, ds_config=_json(tmp_path, ds))
    merged = build_ds_config(cfg, world_size=1)
    assert merged["communication_data_type"] == "fp32" and merged["steps_per_print"] == 100


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.proj(x)).pow(2).mean()


def _auto_adagrad_engine(rank: int, world: int, path: str) -> dict:
    from vutrain.engine import build_engine

    cfg = TrainConfig(
        micro_batch_size=4, zero_stage=0, lr=0.01, warmup_steps=2, weight_decay=0.3, ds_config=path
    )
    engine = build_engine(_Tiny(), cfg, world, torch.device("cpu"))
    before = [(g["lr"], g["weight_decay"]) for g in engine.optimizer.param_groups]
    engine.backward(engine(torch.randn(4, 6, generator=torch.Generator().manual_seed(0))))
    engine.step()
    return {"before": before, "after": [g["lr"] for g in engine.optimizer.param_groups]}


def test_auto_params_of_another_optimizer_take_train_values(tmp_path):
    """A real ZeRO-0 engine with {"type": "Adagrad", "params": {"lr": "auto", "weight_decay": "auto"}}
    (before: `Adagrad(lr="auto")`, a TypeError from every rank when the engine was built)."""
    from vutrain.optim import lr_lambda

    ds = {"optimizer": {"type": "Adagrad", "params": {"lr": "auto", "weight_decay": "auto"}}}
    out = run_distributed(_auto_adagrad_engine, 1, _json(tmp_path, ds))[0]
    schedule = TrainConfig(lr=0.01, warmup_steps=2)
    first, second = (0.01 * lr_lambda(step, schedule) for step in (0, 1))
    # train.weight_decay on the weight; none on the norm and the biases
    assert out["before"] == [pytest.approx((first, 0.3)), pytest.approx((first, 0.0))]
    assert out["after"] == pytest.approx([second, second])


def test_auto_param_train_has_no_value_for_is_a_config_error(tmp_path):
    ds = {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": "auto"}}}
    cfg = TrainConfig(micro_batch_size=4, zero_stage=0, ds_config=_json(tmp_path, ds))
    with pytest.raises(ConfigError, match='optimizer.params.momentum="auto", but train.* has no value'):
        build_ds_config(cfg, world_size=1)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_torch_adagrad_under_zero_is_a_config_error(stage, tmp_path):
    """DeepSpeed's ZeRO rebuilds torch's Adagrad over one parameter group: the first step of a real
    engine failed with an IndexError (the trainer gives it two groups), after the whole start-up."""
    ds = {"optimizer": {"type": "Adagrad", "params": {"lr": 0.01}}}
    cfg = TrainConfig(micro_batch_size=4, zero_stage=stage, ds_config=_json(tmp_path, ds))
    with pytest.raises(ConfigError, match=f"ZeRO-{stage} rebuilds torch's Adagrad"):
        build_ds_config(cfg, world_size=2)
    cfg = TrainConfig(micro_batch_size=4, zero_stage=0, ds_config=cfg.ds_config)
    assert build_ds_config(cfg, world_size=2)["optimizer"]["type"] == "Adagrad"  # ZeRO-0 keeps it as built


@pytest.mark.parametrize(
    "precision, accum, refused",
    [("bf16", "fp32", True), ("fp32", "bf16", True), ("bf16", "bfloat16", False), ("fp32", "float32", False)],
)
def test_grad_accum_dtype_zero_0_cannot_run_is_a_config_error(precision, accum, refused, tmp_path):
    """Without ZeRO, DeepSpeed accumulates only in the model's dtype: bf16 weights with fp32
    accumulation raised NotImplementedError("unsupported mix ...") out of deepspeed.initialize, a
    traceback after the process group and the model were built. ZeRO-1 runs the same JSON
    (DeepSpeed's BF16_Optimizer), and a dtype name DeepSpeed does not know is named."""
    ds = {"data_types": {"grad_accum_dtype": accum}}
    cfg = TrainConfig(micro_batch_size=4, zero_stage=0, precision=precision, ds_config=_json(tmp_path, ds))
    if refused:
        with pytest.raises(
            ConfigError, match="not supported by DeepSpeed without ZeRO: use train.zero_stage=1"
        ):
            build_ds_config(cfg, world_size=1)
    else:
        assert build_ds_config(cfg, world_size=1)["data_types"]["grad_accum_dtype"] == accum
    cfg = TrainConfig(micro_batch_size=4, zero_stage=1, precision=precision, ds_config=cfg.ds_config)
    assert build_ds_config(cfg, world_size=1)["data_types"]["grad_accum_dtype"] == accum
    bad = TrainConfig(
        micro_batch_size=4,
        zero_stage=0,
        ds_config=_json(tmp_path, {"data_types": {"grad_accum_dtype": "f32"}}),
    )
    with pytest.raises(ConfigError, match='grad_accum_dtype="f32" is not a dtype DeepSpeed knows'):
        build_ds_config(bad, world_size=1)
