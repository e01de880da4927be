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

The merged zero_optimization, bf16 and fp16 sections are read with DeepSpeed's own config models
here, before any process group: a misspelt key is one config error naming it, and an offload that
the run's ZeRO stage ignores (parameters below ZeRO-3, the optimizer at ZeRO-0) is refused rather
than run without it. A top-level near miss of a key the trainer sets ("zero_optimisation"), which
DeepSpeed would ignore, is refused with the key it resembles; so are an optimizer param set to
"auto" that train.* has no value for, torch's Adagrad under ZeRO (DeepSpeed rebuilds it over
one parameter group and fails at the first step), and an optimizer param that the optimizer class
DeepSpeed builds does not take ("weight_decy").
"""

from __future__ import annotations

import difflib
import inspect
import json

from vutrain.config import (
    DS_ADAM_TYPES,
    ConfigError,
    TrainConfig,
    ds_optimizer_settings,
    read_user_ds_config,
)
from vutrain.param_alignment import alignment_config

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
WATCHED_KEYS = (
    *BATCH_KEYS,
    *("gradient_clipping", "zero_optimization", "zero_force_ds_cpu_optimizer", "bf16", "fp16"),
    *("torch_autocast", "optimizer", "scheduler", "amp", "elasticity"),
)
"""Top-level keys the trainer generates or checks: a near miss of one is a typo, not another key."""


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
    refuse_near_misses(user, cfg.ds_config)
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
    zero = check_sections_as_deepspeed_reads_them(merged, cfg.zero_stage, cfg.ds_config)
    refuse_auto_without_value(merged, cfg)
    refuse_zero_adagrad(merged, zero, cfg.zero_stage, cfg.ds_config)
    refuse_unknown_optimizer_params(merged, zero, cfg.ds_config)
    refuse_zero0_grad_accum_dtype(merged, cfg, cfg.ds_config)
    return merged


def refuse_zero0_grad_accum_dtype(ds: dict, cfg: TrainConfig, source: str) -> None:
    """ConfigError for a ``data_types.grad_accum_dtype`` that ZeRO-0 cannot run.

    Without ZeRO, DeepSpeed accumulates gradients only in the model's own dtype: bf16 weights with
    fp32 accumulation raised NotImplementedError("unsupported mix ...") out of
    ``deepspeed.initialize``, a traceback after the process group and the model were built.
    """
    data_types = ds.get("data_types")
    wanted = data_types.get("grad_accum_dtype") if isinstance(data_types, dict) else None
    if cfg.zero_stage != 0 or wanted is None:
        return
    from deepspeed.runtime.config import DtypeEnum

    try:
        accum = DtypeEnum(wanted).value
    except ValueError:
        raise ConfigError(
            f"{source}: data_types.grad_accum_dtype={json.dumps(wanted)} is not a dtype DeepSpeed knows "
            "(fp32, bf16, fp16): fix it or leave it out"
        ) from None
    model = {"bf16": "bfloat16", "fp16": "float16"}.get(cfg.precision, "float32")
    if str(accum) != f"torch.{model}":
        raise ConfigError(
            f"{source}: data_types.grad_accum_dtype={json.dumps(wanted)} beside {model} weights "
            f"(train.precision={cfg.precision}) is not supported by DeepSpeed without ZeRO: use "
            "train.zero_stage=1 or 2, or leave grad_accum_dtype out"
        )


def refuse_zero_adagrad(ds: dict, zero, stage: int, source: str) -> None:
    """ConfigError for torch's Adagrad (a JSON "Adagrad" without CPU offload) under ZeRO.

    ZeRO-1/2/3 replace a torch Adagrad by a new one over their flat partitions in one parameter
    group, with the first group's defaults, while they keep indexing the trainer's two groups (decay
    and no-decay): the first step failed with an IndexError from every rank, after the whole
    start-up. Had it run, the no-decay group and the warm-up + cosine schedule (bound to the
    replaced optimizer) would be lost. ZeRO-0 keeps the optimizer as built.
    """
    optimizer = ds.get("optimizer")
    kind = str(optimizer.get("type", "")).lower() if isinstance(optimizer, dict) else ""
    if kind == "adagrad" and stage > 0 and _offload_device(zero, "offload_optimizer") == "none":
        raise ConfigError(
            f"{source}: DeepSpeed's ZeRO-{stage} rebuilds torch's Adagrad over one parameter group and "
            "fails at the first step (the no-decay group and the LR schedule would be lost): use "
            "train.zero_stage=0, CPU offload (DeepSpeed's CPU Adagrad), or another optimizer"
        )


# optimizer.params DeepSpeed's engine reads itself before it builds an Adam(W): adam_w_mode picks
# AdamW's decoupled decay, torch_adam torch's class, fp32_optimizer_states the CPU Adam's moments.
ADAM_ENGINE_PARAMS = ("adam_w_mode", "torch_adam", "fp32_optimizer_states")


def refuse_unknown_optimizer_params(ds: dict, zero, source: str) -> None:
    """ConfigError for an optimizer param the optimizer DeepSpeed builds does not take.

    DeepSpeed passes optimizer.params to the optimizer's constructor as keywords: a misspelt
    "weight_decy" or "momentun" was a TypeError traceback from every rank when the engine was built,
    after the process group, the run directory and the tokenizer.
    """
    optimizer = ds.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    kind = optimizer.get("type") if isinstance(optimizer, dict) else None
    if not isinstance(params, dict) or not isinstance(kind, str):
        return  # none, or a section check_user_ds_config refuses
    if "max_grad_norm" in params:  # DeepSpeed refuses it for every type, at engine start-up
        raise ConfigError(
            f"{source}: optimizer.params.max_grad_norm is not supported by DeepSpeed; remove it and "
            "set train.grad_clip (DeepSpeed's gradient_clipping)"
        )
    built = _optimizer_class(kind, params, _offload_device(zero, "offload_optimizer") in ("cpu", "nvme"))
    if built is None:
        return
    signature = inspect.signature(built)
    if any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
        return  # takes any keyword
    accepted = list(signature.parameters)[1:]  # the first is the parameters to optimize
    if kind.lower() in DS_ADAM_TYPES:
        # The engine passes the CPU Adam's adamw_mode itself (from adam_w_mode): given twice, a TypeError.
        own = [name for name in accepted if name != "adamw_mode"]
        accepted = list(dict.fromkeys([*own, *ADAM_ENGINE_PARAMS]))
    for key in params:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f'did you mean "{close[0]}"? I' if close else "i"
            raise ConfigError(
                f"{source}: optimizer.params.{key} is not a parameter of {built.__name__}, which DeepSpeed "
                f"builds for type {json.dumps(kind)}: {hint}t takes {', '.join(accepted)}"
            )


def _optimizer_class(kind: str, params: dict, cpu_offload: bool):
    """The class DeepSpeed's engine builds for a JSON optimizer of type `kind` (as its
    _configure_basic_optimizer picks it); None where it is not known here (Muon, MuP)."""
    import torch

    name = kind.lower()
    if name in DS_ADAM_TYPES:
        if params.get("torch_adam"):
            adam_w = name == "adamw" or params.get("adam_w_mode", True)
            return torch.optim.AdamW if adam_w else torch.optim.Adam
        from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

        return DeepSpeedCPUAdam if cpu_offload else FusedAdam
    if name == "adagrad":
        from deepspeed.ops.adagrad import DeepSpeedCPUAdagrad

        return DeepSpeedCPUAdagrad if cpu_offload else torch.optim.Adagrad
    if name == "lamb":
        from deepspeed.ops.lamb import FusedLamb

        return FusedLamb
    if name == "lion":
        from deepspeed.ops.lion import DeepSpeedCPULion, FusedLion

        return DeepSpeedCPULion if cpu_offload else FusedLion
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    if name in DEEPSPEED_OPTIMIZERS:
        return None
    built = getattr(torch.optim, kind, None)
    return built if isinstance(built, type) else None


def _offload_device(zero, key: str) -> str:
    """The device of a parsed zero_optimization's offload section `key`; "none" without one."""
    device = getattr(getattr(zero, key, None), "device", "none")
    return str(getattr(device, "value", device))  # a str here; an enum where use_enum_values is off


def refuse_auto_without_value(ds: dict, cfg: TrainConfig) -> None:
    """ConfigError for an optimizer param set to "auto" that train.* gives no value for.

    engine.use_train_settings fills lr, betas, eps and weight_decay; any other "auto" reached the
    optimizer's constructor as the string, a TypeError from every rank after the process group.
    """
    optimizer = ds.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    if not isinstance(params, dict):
        return  # no section, or one check_user_ds_config refuses
    for key, value in params.items():
        if value == "auto" and key not in ds_optimizer_settings(cfg):
            raise ConfigError(
                f'{cfg.ds_config} sets optimizer.params.{key}="auto", but train.* has no value for it '
                f"(only for {', '.join(ds_optimizer_settings(cfg))}): write the value, or leave it out "
                "for the optimizer's default"
            )


def refuse_near_misses(user: dict, source: str) -> None:
    """ConfigError for a top-level key DeepSpeed does not know that is a near miss of WATCHED_KEYS.

    DeepSpeed ignores top-level keys it does not know without a word: "zero_optimisation" with
    stage 3 and CPU offload trained at train.zero_stage without offload, a "gradient_cliping"
    trained unclipped, and no check here saw them (they looked like keys of their own).
    """
    known = _deepspeed_top_level_names()
    for key in user:
        if key in known or key in WATCHED_KEYS:
            continue
        close = difflib.get_close_matches(key, WATCHED_KEYS, n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f'{source}: "{key}" is not a DeepSpeed key (DeepSpeed would ignore it without a word): '
                f'did you mean "{close[0]}"?'
            )


def _deepspeed_top_level_names() -> set[str]:
    """The key names of DeepSpeed's runtime constants: never taken for a typo."""
    from deepspeed.runtime import constants

    return {value for name, value in vars(constants).items() if name.isupper() and isinstance(value, str)}


def _section_models() -> dict:
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    return {
        "zero_optimization": DeepSpeedZeroConfig,
        "bf16": DeepSpeedBF16Config,
        "fp16": DeepSpeedFP16Config,
    }


def check_sections_as_deepspeed_reads_them(ds: dict, stage: int, source: str):
    """ConfigError where DeepSpeed would refuse a section, or ignore an offload it asks for; else
    the zero_optimization section as DeepSpeed reads it (None when it is not a JSON object).

    DeepSpeed refused a misspelt key ("overlap_com") only when the engine was built, after the
    process group, the run directory and the tokenizer, while `python -m vutrain.config` passed it.
    """
    import pydantic

    parsed = {}
    for key, model in _section_models().items():
        section = ds.get(key)
        if not isinstance(section, dict):
            continue  # not a JSON object: check_user_ds_config says so
        try:
            parsed[key] = model(**section)
        except pydantic.ValidationError as exc:
            raise ConfigError(f"{source}: {_first_problem(exc, key, model)}") from None
    if "zero_optimization" in parsed:
        _check_offload_stage(parsed["zero_optimization"], stage, source)
    return parsed.get("zero_optimization")


def _first_problem(exc, section: str, model) -> str:
    """One line for the first of a pydantic ValidationError's errors, with the key it names."""
    error = exc.errors()[0]
    where = ".".join([section, *map(str, error["loc"])])
    if not error["loc"]:  # a check across keys (e.g. one that needs another stage): no one value
        return f"{where}: {error['msg']}"
    if error["type"] != "extra_forbidden":
        return f"{where}={json.dumps(error.get('input'), default=str)}: {error['msg']}; fix the value"
    names = [name for field, info in model.model_fields.items() for name in (field, info.alias) if name]
    close = difflib.get_close_matches(str(error["loc"][-1]), names, n=1)
    hint = f'did you mean "{close[0]}"?' if close and len(error["loc"]) == 1 else "fix or remove it"
    return f"{where} is not a DeepSpeed {section} key: {hint}"


def _check_offload_stage(zero, stage: int, source: str) -> None:
    """Offloads that DeepSpeed reads at this stage, or a ConfigError.

    ZeRO-1/2 never read offload_param (DeepSpeed offloads parameters at ZeRO-3 only) and ZeRO-0
    has no ZeRO optimizer to offload: both ran on without the offload, which the JSON asked for
    to fit the model, and without a word.
    """
    needs = (("offload_param", 3, "3"), ("offload_optimizer", 1, "1, 2 or 3"))
    for key, lowest, stages in needs:
        device = _offload_device(zero, key)
        if device != "none" and stage < lowest:
            raise ConfigError(
                f"{source} sets zero_optimization.{key} (device {device}), which DeepSpeed ignores at "
                f"ZeRO-{stage}: set train.zero_stage to {stages} (and the JSON's stage), or remove {key}"
            )
