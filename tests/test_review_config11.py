"""Review 11 of the run configuration: a shell variable in a path key, and DeepSpeed optimizer
params that the optimizer DeepSpeed builds does not take.

`output_dir: $SCRATCH/runs/a` in a run file (no shell there) trained into a folder named
`$SCRATCH` under the working directory without a word. A JSON optimizer param DeepSpeed passes on
as a keyword ("weight_decy", "momentun") was a TypeError traceback from every rank when the engine
was built, after the process group, the run directory and the tokenizer; `python -m vutrain.config`
passed it. Both are now one config error before anything starts.

Runtime: ~15 s on 2 busy cores (one real ZeRO-0 engine).
"""

from __future__ import annotations

import json

import pytest
import torch
from test_review_dsconfig import _Tiny

from vutrain.config import ConfigError, TrainConfig, build_config, load_config
from vutrain.ds_config import build_ds_config

from helpers_dist import run_distributed

# ------------------------------------------------------------------ environment variables in paths


def _run_file(tmp_path, key: str, value: str) -> str:
    section, _, leaf = key.rpartition(".")
    path = tmp_path / "run.yaml"
    path.write_text(f"{section}:\n  {leaf}: {value}\n" if section else f"{leaf}: {value}\n")
    return str(path)


@pytest.mark.parametrize(
    "key, value, variable",
    [
        ("output_dir", "$SCRATCH/runs/a", "$SCRATCH"),
        ("output_dir", "runs/${SLURM_JOB_ID}", "${SLURM_JOB_ID}"),
        ("train.resume", "$CKPT_DIR", "$CKPT_DIR"),
        ("train.ds_config", "$HOME/zero2.json", "$HOME"),
        ("model.name_or_path", "${MODELS}/clip", "${MODELS}"),
    ],
)
def test_a_path_key_naming_an_environment_variable_is_refused(tmp_path, key, value, variable):
    """From a run file (no shell) and a quoted override (the shell left it) alike."""
    want = f"{key}={value!r} names the environment variable {variable}, which a run file"
    for path, overrides in ((_run_file(tmp_path, key, value), []), (None, [f"{key}={value}"])):
        with pytest.raises(ConfigError) as caught:
            build_config(path, overrides)
        assert str(caught.value).startswith(want)
        assert f"pass {key}=... unquoted on the command line" in str(caught.value)


@pytest.mark.parametrize("value", ["runs/a$", "runs/price$5", "runs/$", "runs/a-b"])
def test_a_dollar_that_names_no_variable_stays_in_the_path(value):
    assert build_config(None, [f"output_dir={value}"]).output_dir == value


def test_a_shard_spec_keeps_its_dollar_for_the_pipe_command_shell():
    """webdataset runs a `pipe:` spec through a shell, which expands its variables when it opens."""
    spec = "pipe:curl -s https://host/$BUCKET/{00000..00001}.tar"
    assert build_config(None, [f"data.train_shards={spec}"]).data.train_shards == spec


# ------------------------------------------------------------------ optimizer params


def _json(tmp_path, ds: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return str(path)


REFUSED = {
    "sgd-typo": (
        0,
        {"optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentun": 0.9}}},
        'optimizer.params.momentun is not a parameter of SGD, which DeepSpeed builds for type "SGD": '
        'did you mean "momentum"?',
    ),
    "adamw-typo": (
        2,
        {"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.2}}},
        "optimizer.params.weight_decy is not a parameter of FusedAdam, which DeepSpeed builds for type "
        '"AdamW": did you mean "weight_decay"?',
    ),
    # DeepSpeed passes the CPU Adam's adamw_mode itself: given twice, a TypeError
    "cpu-adam-adamw_mode": (
        2,
        {
            "optimizer": {"type": "AdamW", "params": {"adamw_mode": True}},
            "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
        },
        "optimizer.params.adamw_mode is not a parameter of DeepSpeedCPUAdam, which DeepSpeed builds for "
        'type "AdamW": did you mean "adam_w_mode"?',
    ),
    "max_grad_norm": (
        2,
        {"optimizer": {"type": "AdamW", "params": {"max_grad_norm": 1.0}}},
        "optimizer.params.max_grad_norm is not supported by DeepSpeed; remove it and set train.grad_clip",
    ),
}


@pytest.mark.parametrize("stage, ds, message", REFUSED.values(), ids=REFUSED.keys())
def test_an_optimizer_param_the_built_optimizer_does_not_take_is_a_config_error(tmp_path, stage, ds, message):
    cfg = TrainConfig(micro_batch_size=4, zero_stage=stage, ds_config=_json(tmp_path, ds))
    with pytest.raises(ConfigError) as caught:
        build_ds_config(cfg, world_size=1)
    assert str(caught.value).startswith(f"{cfg.ds_config}: {message}")


def test_python_m_config_refuses_the_misspelt_param_before_anything_starts(tmp_path):
    """load_config is what `python -m vutrain.config` and train.py run before any process group."""
    path = _json(tmp_path, {"optimizer": {"type": "SGD", "params": {"momentun": 0.9}}})
    overrides = [f"data.train_shards={tmp_path}/x.tar", f"train.ds_config={path}", "train.zero_stage=0"]
    with pytest.raises(ConfigError, match="optimizer.params.momentun is not a parameter of SGD"):
        load_config(None, overrides)


ACCEPTED = {
    "torch-adam": (2, {"type": "AdamW", "params": {"torch_adam": True, "foreach": False, "betas": "auto"}}),
    "adam-modes": (2, {"type": "Adam", "params": {"adam_w_mode": False, "amsgrad": True, "eps": "auto"}}),
    "lamb": (2, {"type": "Lamb", "params": {"max_coeff": 5.0, "min_coeff": 0.1}}),
    "lion": (2, {"type": "Lion", "params": {"betas": [0.9, 0.99]}}),
    "adagrad-zero0": (0, {"type": "Adagrad", "params": {"lr_decay": 0.01, "initial_accumulator_value": 0.1}}),
    "rmsprop": (2, {"type": "RMSprop", "params": {"alpha": 0.9, "centered": True}}),
    "muon-unchecked": (2, {"type": "Muon", "params": {"momentum": 0.9, "ns_method": "gram"}}),
}


@pytest.mark.parametrize("stage, optimizer", ACCEPTED.values(), ids=ACCEPTED.keys())
def test_params_the_optimizer_takes_still_pass(tmp_path, stage, optimizer):
    path = _json(tmp_path, {"optimizer": optimizer})
    cfg = TrainConfig(micro_batch_size=4, zero_stage=stage, ds_config=path)
    assert build_ds_config(cfg, world_size=1)["optimizer"] == optimizer


def test_cpu_adam_takes_fp32_optimizer_states(tmp_path):
    ds = {
        "optimizer": {"type": "AdamW", "params": {"fp32_optimizer_states": False}},
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
    }
    cfg = TrainConfig(micro_batch_size=4, zero_stage=2, ds_config=_json(tmp_path, ds))
    assert build_ds_config(cfg, world_size=1)["optimizer"] == ds["optimizer"]


def _sgd_engine(rank: int, world: int, path: str) -> list:
    from vutrain.engine import build_engine

    cfg = TrainConfig(micro_batch_size=4, zero_stage=0, lr=0.01, warmup_steps=1, ds_config=path)
    engine = build_engine(_Tiny(), cfg, world, torch.device("cpu"))
    return [(g["momentum"], g["nesterov"], g["dampening"]) for g in engine.optimizer.param_groups]


def test_a_real_engine_builds_with_the_params_the_check_accepts(tmp_path):
    """The accepted names are the constructor's own: DeepSpeed builds torch's SGD with all three."""
    params = {"lr": 0.01, "momentum": 0.9, "nesterov": True, "dampening": 0}
    ds = {"optimizer": {"type": "SGD", "params": params}}
    assert run_distributed(_sgd_engine, 1, _json(tmp_path, ds))[0] == [(0.9, True, 0)] * 2
