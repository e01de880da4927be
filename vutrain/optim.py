"""AdamW parameter groups and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from vutrain.config import TrainConfig


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Norm gains, biases (all 1-D tensors) and the logit scale/bias are never decayed.

    Decaying the logit scale would pull the temperature towards 1 and undo what the loss learns;
    decaying norms and biases hurts CLIP training (open_clip excludes them the same way).
    """
    return param.ndim < 2 or "norm" in name or name.endswith("bias") or "logit_" in name


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters split into a decayed group and a never-decayed one (empty groups dropped)."""
    decay, keep = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (keep if no_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at optimizer step `step` (0-based): linear warm-up, cosine to the floor."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_kernel_options(device: torch.device) -> dict:
    """One fused kernel per step on CUDA; on CPU the multi-tensor (foreach) path.

    The default per-parameter loop launches several kernels per tensor (thousands per step on a
    GPU). Under ZeRO-1/2 DeepSpeed hands the optimizer a few flat fp32 partitions instead, where
    either path is a handful of launches.
    """
    return {"fused": True} if device.type == "cuda" else {"foreach": True}


def build_optimizer(
    module: nn.Module, cfg: TrainConfig, device: torch.device | None = None
) -> tuple[torch.optim.Optimizer, object]:
    """AdamW over `param_groups` and its LambdaLR schedule. `device`: where the parameters will live
    (the module must already be there when it is CUDA: the fused kernel checks at construction)."""
    groups = param_groups(module, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters: check model.lock_image / model.lock_text / model.lora")
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **adamw_kernel_options(device or torch.device("cpu")),
    )
    return optimizer, build_scheduler(optimizer, cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The warm-up + cosine schedule (`lr_lambda`) over `optimizer`'s groups, ours or DeepSpeed's.

    DeepSpeed takes it as `lr_scheduler=` or as a callable that it calls with the optimizer it
    built from a user ds_config's "optimizer" section (engine.py).
    """
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, cfg))
