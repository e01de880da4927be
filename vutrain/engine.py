"""The DeepSpeed engine around a module, built the same way for the trainer, the tests and the bench.

`build_engine` derives the DeepSpeed config from `train.*` (ds_config.py: aligned ZeRO buffers,
no bf16 overflow scan), builds the fused or multi-tensor AdamW and its schedule (optim.py; an
optimizer from the user's ds_config gets train.*'s settings and the same schedule), computes
ZeRO's gradient norm with one multi-tensor norm (grad_norm.py) and clips with it on the device
(grad_clip.py: no host read at the step), skips ZeRO-1/2's per-parameter work that changes
nothing (grad_reduction.py, weight_views.py), and tells DeepSpeed the rank's device explicitly:
with VUTRAIN_DEVICE two ranks may share one GPU, which a guess from the node-local rank would get
wrong.
"""

from __future__ import annotations

import argparse
import functools
import logging

import torch
from torch import nn

from vutrain.config import (
    DS_ADAM_TYPES,
    ConfigError,
    TrainConfig,
    check_user_ds_config,
    ds_optimizer_settings,
)
from vutrain.distributed import collective_backend
from vutrain.ds_config import build_ds_config
from vutrain.grad_clip import use_device_side_clip, zero_nonfinite_at_step
from vutrain.grad_norm import report_zero0_grad_norm, use_multi_tensor_grad_norm
from vutrain.grad_reduction import use_lean_reduction
from vutrain.optim import build_optimizer, build_scheduler, param_groups
from vutrain.param_alignment import warn_if_misaligned
from vutrain.weight_views import use_view_check

log = logging.getLogger(__name__)


def reduce_with_all_reduce(ds_config: dict) -> None:
    """gloo on CUDA tensors (VUTRAIN_DIST_BACKEND=cuda:gloo: two ranks on one GPU) all-reduces but
    does not reduce(-scatter): ZeRO-1/2 reduce gradients with all-reduce there. Set, not defaulted:
    a JSON config that asks for reduce_scatter (launch/ds_configs/zero2.json does) kept it, and the
    gloo fallback never applied; the override is said once."""
    zero = ds_config.setdefault("zero_optimization", {})
    if zero.get("reduce_scatter") is True:
        log.warning(
            "zero_optimization.reduce_scatter=true in the DeepSpeed config is turned off: the gloo "
            "backend on CUDA tensors cannot reduce-scatter, so gradients are all-reduced instead"
        )
    zero["reduce_scatter"] = False


def build_engine(module: nn.Module, cfg: TrainConfig, world_size: int, device: torch.device):
    """`deepspeed.initialize` for `module` on `device`; returns the engine."""
    import deepspeed

    ds_config = build_ds_config(cfg, world_size)
    if device.type == "cuda" and not _nccl_on_cuda():
        reduce_with_all_reduce(ds_config)
    kwargs: dict = {"config": ds_config}
    if device.type == "cuda":
        # DeepSpeed asserts args.local_rank == $LOCAL_RANK, which init_distributed sets to the
        # device's index (distributed.deepspeed_env).
        # A bare "cuda" (no index) means the current device; DeepSpeed needs the number.
        index = device.index if device.index is not None else torch.cuda.current_device()
        kwargs["args"] = argparse.Namespace(device_rank=index, local_rank=index)
        module.to(device)  # the fused AdamW checks its parameters' device when it is built
    check_user_ds_config(ds_config, cfg, cfg.ds_config or "the DeepSpeed config")
    if ds_config["zero_optimization"].get("stage") == 3:
        refuse_empty_parameters(module)
    if "optimizer" in ds_config:  # the user's ds_config brings its own (e.g. CPU-offload Adam)
        use_train_settings(ds_config["optimizer"], cfg)
        kwargs["model_parameters"] = param_groups(module, json_weight_decay(ds_config["optimizer"], cfg))
        # DeepSpeed builds the optimizer, then calls this with it: the schedule is still ours.
        kwargs["lr_scheduler"] = lambda optimizer: build_scheduler(optimizer, cfg)
    else:
        kwargs["optimizer"], kwargs["lr_scheduler"] = build_optimizer(module, cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=module, **kwargs)
    undo_state_init_step(engine.optimizer)  # ZeRO-0 fp16/bf16: the first update as ZeRO-1/2/3's
    warn_if_misaligned(engine.module, cfg.zero_stage, engine.optimizer)
    use_multi_tensor_grad_norm(engine.optimizer)  # 2 kernels per parameter -> a few (grad_norm.py)
    use_device_side_clip(engine.optimizer)  # ZeRO-1/2: 2 host reads per step -> 0 (grad_clip.py)
    report_zero0_grad_norm(engine)  # ZeRO-0 fp32/amp_bf16: train/grad_norm (before the zeroing hook)
    zero_nonfinite_at_step(engine)  # ZeRO-0 fp32/amp_bf16: a NaN gradient never reaches AdamW (grad_clip.py)
    use_lean_reduction(engine.optimizer)  # ZeRO-1/2: no per-parameter copy or filing (grad_reduction.py)
    use_view_check(engine.optimizer)  # ZeRO-1/2: no per-step re-pointing of every weight (weight_views.py)
    keep_settings_on_load(engine)  # a resume trains with this run's train.lr / weight_decay / betas / eps
    if cfg.compile:
        compile_model(engine, cfg.compile_scope, cfg.compile_backend, cfg.compile_mode)
    return engine


def refuse_empty_parameters(module: nn.Module) -> None:
    """ConfigError (one line) for a parameter without elements under ZeRO-3.

    ZeRO-3 partitions and gathers every parameter, frozen or not, and fails on an empty one inside
    DeepSpeed at the first forward ("AssertionError: {'id': 0, 'status': 'NOT_AVAILABLE', ...") or
    at its gradient's reduction (torch.cat of an empty list), with nothing naming the parameter.
    """
    empty = [name for name, p in module.named_parameters() if p.numel() == 0]
    if empty:
        raise ConfigError(
            f"parameter {empty[0]} has no elements ({len(empty)} such parameters): DeepSpeed ZeRO-3 "
            "cannot partition it; remove it from the model (or register it as a buffer), or use "
            "train.zero_stage 0, 1 or 2"
        )


def undo_state_init_step(optimizer) -> bool:
    """Undo the optimizer step that DeepSpeed's ZeRO-0 fp16/bf16 wrappers take on zero gradients.

    FP16_UnfusedOptimizer (ZeRO-0 with fp16 or bf16 and a torch optimizer) and FP16_Optimizer (with
    a fused Adam) create the inner optimizer's state by calling its step() with all-zero gradients.
    For AdamW that step is not a no-op: its decoupled weight decay shrinks every fp32 master weight
    once (by lr x weight_decay) and its step count starts at 1, so every later step uses the bias
    corrections of the next one (the first real update was 0.74 x lr x sign(g) with betas 0.9/0.98
    instead of lr x sign(g)). ZeRO-1/2/3 take no such step, so a ZeRO-0 bf16 run trained
    differently from the same run at another stage. The masters go back to the 16-bit weights they
    were copied from (unchanged until the first real step) and the state is dropped: torch's and
    DeepSpeed's Adam build it at their first step. Returns whether there was a step to undo.
    """
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):
        pairs = [pair for group in zip(optimizer.fp32_groups, optimizer.fp16_groups) for pair in zip(*group)]
    elif isinstance(optimizer, FP16_Optimizer):
        pairs = list(zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat))
    else:
        return False
    with torch.no_grad():
        for master, weight in pairs:
            master.copy_(weight)
    optimizer.optimizer.state.clear()
    return True


def use_train_settings(optimizer: dict, cfg: TrainConfig) -> None:
    """Fill a user ds_config's optimizer params from train.* (lr: the schedule's peak).

    An Adam(W) takes train.lr/beta1/beta2/eps/weight_decay wherever its params leave them out or say
    "auto" (check_user_ds_config has refused values that disagree). Another type keeps its own
    params, and its optimizer's defaults where it leaves them out; an "auto" there takes train.*'s
    value too: passed on as the string, it was a TypeError from every rank when the engine built
    the optimizer (`Adagrad(lr="auto")`). The schedule (a multiplier of the lr) is always ours.
    """
    params = optimizer.get("params") or {}
    optimizer["params"] = params
    adam = str(optimizer.get("type", "")).lower() in DS_ADAM_TYPES
    if not adam:
        log.warning(
            "train.ds_config optimizer %s: its own params apply (train.lr/beta1/beta2/eps only where "
            'they say "auto"); weight decay %s on all but norms, biases and the logit scale; the '
            "warm-up + cosine schedule scales its lr",
            optimizer.get("type"),
            json_weight_decay(optimizer, cfg),
        )
    for key, value in ds_optimizer_settings(cfg).items():
        if params.get(key) == "auto" or (adam and key not in params):
            params[key] = value


def json_weight_decay(optimizer: dict, cfg: TrainConfig) -> float:
    """The decayed parameter group's weight decay for an optimizer from the user's ds_config.

    Its params' own value where it gives a number (an Adam(W)'s agrees with train.weight_decay, or
    is train.weight_decay: use_train_settings); else train.weight_decay. The group's value wins over
    the optimizer's params, so passing train.weight_decay regardless made an Adagrad JSON's
    "weight_decay": 0.0 train with train.weight_decay (0.2 by default; L2 for Adagrad), silently.
    """
    own = (optimizer.get("params") or {}).get("weight_decay")
    is_number = isinstance(own, (int, float)) and not isinstance(own, bool)
    return float(own) if is_number else cfg.weight_decay


# Per-group optimizer settings a checkpoint must not bring back (the LR is the schedule's).
RUN_SETTINGS = ("weight_decay", "betas", "eps")


def keep_settings_on_load(engine) -> None:
    """Wrap ``engine.load_checkpoint`` so that the optimizer's settings stay this run's config's.

    DeepSpeed's load restores the optimizer's param groups (lr, weight decay, betas, eps) and the
    schedule's base LR as saved: a run resumed with a lower train.lr (what the non-finite-loss
    error suggests) or another train.weight_decay trained on with the old values, silently, while
    config.yaml said otherwise; and a finished run resumed with a larger train.max_steps ran its
    first step at the old schedule's last LR (0 with train.min_lr_ratio=0). What is restored is the
    training state: the schedule's position (its step) and the optimizer's moments. An unchanged
    config gives the same values, bit for bit.
    """
    scheduler, optimizer = engine.lr_scheduler, engine.optimizer
    if scheduler is None or getattr(engine.load_checkpoint, "_vutrain_keeps_settings", False):
        return
    base_lrs = list(scheduler.base_lrs)
    settings = [{k: group[k] for k in RUN_SETTINGS if k in group} for group in optimizer.param_groups]
    clip_grad = getattr(optimizer, "clip_grad", None)
    original = engine.load_checkpoint

    @functools.wraps(original)
    def load_checkpoint(*args, **kwargs):
        own_scaler = getattr(optimizer, "loss_scaler", None)
        loaded = original(*args, **kwargs)
        keep_own_loss_scaler(optimizer, own_scaler)
        if clip_grad is not None:  # ZeRO-1/2 restore the saved train.grad_clip (_load_global_state)
            optimizer.clip_grad = clip_grad
        scheduler.base_lrs = list(base_lrs)
        # LambdaLR's own formula at the restored step: the LR of the next optimizer step.
        lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(base_lrs, scheduler.lr_lambdas)]
        for group, lr, base, kept in zip(optimizer.param_groups, lrs, base_lrs, settings):
            group.update(kept, lr=lr, initial_lr=base)
        scheduler._last_lr = lrs
        return loaded

    load_checkpoint._vutrain_keeps_settings = True
    engine.load_checkpoint = load_checkpoint


def keep_own_loss_scaler(optimizer, own) -> bool:
    """Put this engine's loss scaler back unless both it and the loaded one scale dynamically.

    DeepSpeed's ZeRO optimizers load the saved scaler in place of their own (_load_global_state),
    also across a train.precision switch between fp32 and fp16, which keeps the same file names:
    an fp16 run resumed from an fp32 checkpoint trained with fp32's static scale of 1 (its fp16
    gradients underflow), and an fp32 run from an fp16 one with fp16's dynamic scale (2**16 and
    skipped steps), which DeepSpeed asserts never happens in fp32. A static scaler holds nothing
    but its configured scale; only a dynamic one's current scale is training state worth resuming.
    Returns whether this engine's scaler was put back.
    """
    loaded = getattr(optimizer, "loss_scaler", None)
    if own is None or loaded is own or (getattr(own, "dynamic", False) and getattr(loaded, "dynamic", False)):
        return False
    optimizer.loss_scaler = own
    optimizer.dynamic_loss_scale = own.dynamic
    return True


def compile_model(engine, scope: str, backend: str, mode: str = "default") -> int:
    """torch.compile the engine's model in place; returns the number of modules compiled.

    After the engine is built: DeepSpeed's hooks and the parameters' flat-buffer views are in
    place. In place (nn.Module.compile), so parameter names, and with them checkpoints and export,
    stay those of the eager model. scope "layers" compiles each block of the towers' layer lists
    (torchtitan's per-block compile): one graph serves every block of a tower, and each block's
    backward hands its gradients to ZeRO's reduction hooks as it finishes, so reduction still
    overlaps with backward on several GPUs. scope "model" compiles the whole module through
    DeepSpeed's engine.compile: one graph per tower call, whose backward returns every gradient at
    its end. `mode` is inductor's (config.py checks): reduce-overhead and max-autotune replay the
    compiled graphs as CUDA graphs, which takes the host's launches out of the step.
    """
    kwargs = compile_kwargs(mode)
    allow_every_signature()
    if scope == "model":
        engine.compile(backend=backend, compile_kwargs=kwargs)
        return 1
    blocks = [
        block for module in engine.module.modules() if isinstance(module, nn.ModuleList) for block in module
    ]
    for block in blocks:
        block.compile(backend=backend, **kwargs)
    return len(blocks)


RECOMPILE_LIMIT = 64
"""Graphs Dynamo keeps per compiled function before it runs new signatures eagerly (its default: 8)."""


def allow_every_signature() -> None:
    """Raise Dynamo's per-function recompile limit to RECOMPILE_LIMIT (never lower a user's).

    Dynamo keeps at most `recompile_limit` graphs per code object and runs any further signature
    eagerly, with one warning ("hit config.recompile_limit (8)"). Every block of both towers runs
    the same code object, so one limit counts each tower x grad mode (GradCache's no-grad pass and
    replay, eval) x whether the block's input requires grad x eval's batch sizes: measured 9 on
    the tiny preset (LoRA, GradCache, an eval with a short last batch), whose eval text blocks
    then ran eager in every eval. A run still compiles a bounded number of graphs: its
    signatures are few, fixed by the config, not one per step.
    """
    import torch._dynamo

    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)


def compile_kwargs(mode: str) -> dict:
    """torch.compile's keyword for an inductor `mode`; none for "default" (other backends take none)."""
    return {} if mode == "default" else {"mode": mode}


def _nccl_on_cuda() -> bool:
    import torch.distributed as dist

    if not dist.is_initialized():
        return True  # one process, nothing to reduce
    return collective_backend("cuda") == "nccl"
