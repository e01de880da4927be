"""`build_loss`: the one place that maps the config's `loss.name` to a loss object."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from vutrain.config import LossConfig
from vutrain.losses.align_uniform import AlignUniformLoss
from vutrain.losses.clip import ClipLoss
from vutrain.losses.siglip import SigLipLoss

LOSS_NAMES = ("clip", "siglip", "align_uniform")


def build_loss(
    name: str,
    *,
    rank: int,
    world_size: int,
    backend: str = "torch",
    local_loss: bool = True,
    gather_with_grad: bool = True,
    **kw: Any,
) -> nn.Module:
    """Build the loss named by `loss.name`.

    Defaults are the scalable, exact open_clip setting (`local_loss=True, gather_with_grad=True`).
    `backend` applies to "clip" and "siglip" ("siglip" with triton needs `kernels.sigmoid_loss`);
    "align_uniform" has a torch implementation only and rejects any other backend (so a config
    asking for triton never silently runs torch). Extra keyword arguments go to the loss
    constructor (e.g. `cache_labels=True`, `bidir=True` for siglip, or
    `align_weight=..., uniform_weight=..., t=...` for align_uniform).

    Every returned object has `forward(image_features, text_features, logit_scale, logit_bias)`
    (clip and siglip also take `labels=`) and a `last_terms` dict of extra terms to log (0-dim
    tensors or floats, read with `float()` on logging steps; empty for clip and siglip).
    """
    if name == "clip":
        return ClipLoss(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            rank=rank,
            world_size=world_size,
            backend=backend,
            **kw,
        )
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss.name {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    check_clip_only_options(name, local_loss, gather_with_grad)
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size, backend=backend, **kw)
    if backend not in ("torch", "auto"):
        raise ValueError(
            f"loss {name!r} has only a torch implementation; set loss.backend=torch or auto (got {backend!r})"
        )
    return AlignUniformLoss(rank=rank, world_size=world_size, **kw)


def check_clip_only_options(name: str, local_loss: bool, gather_with_grad: bool) -> None:
    """siglip and align_uniform always score this rank's rows against every rank's columns with
    gradients through the gather; a False for either was dropped without a word, so a caller
    asking for open_clip's constant (no-grad) gather trained with other gradients than asked."""
    refused = [
        f"{key}=False"
        for key, value in (("local_loss", local_loss), ("gather_with_grad", gather_with_grad))
        if not value
    ]
    if refused:
        raise ValueError(
            f"loss {name!r} always scores this rank's rows against a gather with gradients; "
            f"{' and '.join(refused)} "
            + ("are 'clip' options" if len(refused) > 1 else "is a 'clip' option")
            + " only (drop it)"
        )


def build_loss_from_config(cfg: LossConfig, *, rank: int, world_size: int) -> nn.Module:
    """The loss of a run's `loss.*` section (only the keys that apply to `loss.name` are passed).

    The trainer's loss: its stream gives every rank full local batches of one size, so the losses'
    per-call shape agreement (a small host all-reduce at every step, which also holds each step
    until every host reached it) is off; a loss built by hand keeps it."""
    if cfg.name == "clip":
        return build_loss(
            "clip",
            rank=rank,
            world_size=world_size,
            backend=cfg.backend,
            local_loss=cfg.local_loss,
            gather_with_grad=cfg.gather_with_grad,
            check_shapes=False,
        )
    if cfg.name == "siglip":
        return build_loss(
            "siglip",
            rank=rank,
            world_size=world_size,
            backend=cfg.backend,
            bidir=cfg.bidir,
            check_shapes=False,
        )
    return build_loss(
        cfg.name,
        rank=rank,
        world_size=world_size,
        backend=cfg.backend,
        align_weight=cfg.align_weight,
        uniform_weight=cfg.uniform_weight,
        t=cfg.uniform_t,
        check_shapes=False,
    )
