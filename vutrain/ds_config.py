"""The DeepSpeed config dict, derived from the run config and the world size.

Batch keys are computed, never typed twice: train_batch_size = micro x accumulation x world.
A user's own JSON (train.ds_config) is merged over the generated dict; keys it sets to "auto"
keep the generated value, and batch keys that disagree with the derived ones are an error rather
than a silent change of the global batch.

Three settings serve speed on GPUs: ZeRO-1/2 pad their flat buffers so every parameter starts
16-byte aligned (see param_alignment.py), bf16 runs skip DeepSpeed's per-parameter overflow
scan before each step (bf16 has fp32's range; the trainer zeroes a non-finite micro-batch itself,
see nonfinite.py; fp16 keeps the scan: its dynamic loss scale depends on it), and DeepSpeed's
throughput timer, which synchronises the device twice a step, is off.
"""

from __future__ import annotations

import json

from vutrain.config import ConfigError, TrainConfig, read_user_ds_config
from vutrain.param_alignment import alignment_config

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if value == "auto":
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config for this run: generated from `cfg`, then the user's train.ds_config over it."""
    generated = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum_steps * world_size,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage, **alignment_config(cfg.zero_stage)},
        "bf16": {"enabled": cfg.precision == "bf16", "check_grad_overflow": False},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        # On by default, DeepSpeed's throughput timer waits for the device in every forward and
        # at every optimizer step: the CPU could never queue work ahead of the GPU. The trainer
        # measures samples/s itself.
        "timers": {"throughput": {"enabled": False}},
    }
    if cfg.precision == "amp_bf16":
        # open_clip's amp_bf16: fp32 weights, gradients and optimizer; the forward under
        # torch.autocast (matmuls in bf16, norms, softmax and the residual stream in fp32).
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.zero_stage == 3:
        # Gather the 16-bit weights on save so export does not need the optimizer shards.
        generated["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if not cfg.ds_config:
        return generated
    user = read_user_ds_config(cfg.ds_config)
    for key in BATCH_KEYS:
        if key in user and user[key] != "auto" and user[key] != generated[key]:
            raise ConfigError(
                # json.dumps: a string "8" against 8 read "sets train_batch_size=8 but ... gives 8".
                f"{cfg.ds_config} sets {key}={json.dumps(user[key])} but the run config gives "
                f"{generated[key]} (train.micro_batch_size x train.grad_accum_steps x "
                f'world {world_size}); set it to "auto" or change the train.* keys'
            )
    merged = _merge(generated, user)
    stage = merged.get("zero_optimization", {}).get("stage", cfg.zero_stage)
    if stage != cfg.zero_stage:
        raise ConfigError(
            f"{cfg.ds_config} sets zero_optimization.stage={json.dumps(stage)} but train.zero_stage="
            f"{cfg.zero_stage}; make them agree"
        )
    return merged
