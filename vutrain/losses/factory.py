"""`build_loss`: the one place that maps the config's `loss.name` to a loss object."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from vutrain.losses.align_uniform import AlignUniformLoss
from vutrain.losses.clip import ClipLoss
from vutrain.losses.siglip import SigLipLoss

LOSS_NAMES = ("clip", "siglip", "align_uniform")


def build_loss(name: str, *, rank: int, world_size: int, backend: str = "torch",
               local_loss: bool = True, gather_with_grad: bool = True, **kw: Any) -> nn.Module:
    """Build the loss named by `loss.name`.

    Defaults are the scalable, exact open_clip setting (`local_loss=True, gather_with_grad=True`).
    `backend` applies to "clip" only; "siglip" and "align_uniform" have torch implementations
    and reject any other backend (so a config asking for triton never silently runs torch).
    Extra keyword arguments go to the loss constructor (e.g. `cache_labels=True`, or
    `align_weight=..., uniform_weight=..., t=...` for align_uniform).

    Every returned object has `forward(image_features, text_features, logit_scale, logit_bias)`
    and a `last_terms: dict[str, float]` of extra terms to log (empty for clip and siglip).
    """
    if name == "clip":
        return ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, rank=rank,
                        world_size=world_size, backend=backend, **kw)
    if name not in LOSS_NAMES:
        raise ValueError(f"unknown loss.name {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    if backend not in ("torch", "auto"):
        raise ValueError(f"loss {name!r} has only a torch implementation; set loss.backend=torch "
                         f"or auto (got {backend!r})")
    if name == "siglip":
        return SigLipLoss(rank=rank, world_size=world_size, **kw)
    return AlignUniformLoss(rank=rank, world_size=world_size, **kw)
