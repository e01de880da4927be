"""16-byte alignment of every trainable parameter and gradient under DeepSpeed ZeRO.

ZeRO-1/2 flatten each parameter group into one buffer and turn every parameter into a view of it.
Packed back to back, one odd-sized parameter (the 1-element logit scale) shifts all that follow
off the 16-byte boundary, and cuBLAS then falls back to kernels about three times slower (on an
H100, ViT-B/32 forward at batch 256: 61 ms packed, 19 ms aligned). DeepSpeed (>= 0.19) pads
between parameters when `zero_optimization.parameter_alignment` is true: each parameter then
starts at a multiple of 16 bytes (8 bf16 or 4 fp32 elements). ZeRO-3 gathers each parameter
into a buffer of its own, already aligned. Gradients: ZeRO-2 and 3 by default copy each one into
a reduce bucket, back to back, and make `param.grad` a view of it; `contiguous_gradients: false`
keeps every gradient in its own (aligned) storage, at the price of some allocator fragmentation.
A user's train.ds_config may set either key back.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)
ALIGNMENT_BYTES = 16


def deepspeed_supports_alignment() -> bool:
    """Whether the installed DeepSpeed has `zero_optimization.parameter_alignment` (0.19+)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    return "parameter_alignment" in inspect.signature(DeepSpeedZeroOptimizer.__init__).parameters


def alignment_config(zero_stage: int) -> dict:
    """Keys to merge into the DeepSpeed `zero_optimization` section for aligned parameters."""
    out: dict = {}
    if zero_stage in (1, 2) and deepspeed_supports_alignment():
        out["parameter_alignment"] = True
    if zero_stage in (1, 2, 3):
        # ZeRO-2/3 copy each gradient into a reduce bucket at the unpadded running offset and make
        # param.grad a view of it; without that copy each gradient keeps its own aligned storage.
        # ZeRO-1 copied each of its partition's gradients into a contiguous buffer at the boundary:
        # one more copy per parameter per step (398 kernels for ViT-B/32), for no gain here.
        out["contiguous_gradients"] = False
    return out


def is_aligned(tensor: torch.Tensor, alignment: int = ALIGNMENT_BYTES) -> bool:
    """Whether the tensor's first element sits at a multiple of `alignment` bytes."""
    return tensor.data_ptr() % alignment == 0


def misaligned(
    named: Iterable[tuple[str, torch.Tensor | None]], alignment: int = ALIGNMENT_BYTES
) -> list[str]:
    """Names of the non-empty tensors that do not start on an `alignment`-byte boundary."""
    return [name for name, t in named if t is not None and t.numel() > 0 and not is_aligned(t, alignment)]


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of every parameter that requires grad."""
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def warn_if_misaligned(module: nn.Module, zero_stage: int, optimizer=None) -> list[str]:
    """Log once (one line) if any trainable parameter is misaligned after the engine is built,
    with what to change for the engine's optimizer wrapper (`optimizer`: the engine's).

    Under ZeRO-3 parameters are partitioned (their data is empty until gathered), so only
    ZeRO 0-2 are checked here; the tests check ZeRO-3 inside the forward.
    """
    if zero_stage == 3:
        return []
    bad = misaligned(trainable(module))
    if bad:
        log.warning(
            "%d trainable parameters are not %d-byte aligned (first: %s); GPU matmuls on them run slower. %s",
            len(bad),
            ALIGNMENT_BYTES,
            bad[0],
            misalignment_remedy(optimizer),
        )
    return bad


def misalignment_remedy(optimizer) -> str:
    """What packed the parameters without padding, and what to change.

    The advice was always to upgrade DeepSpeed, also on a DeepSpeed that has parameter_alignment:
    ZeRO-1 in bf16 with `data_types.grad_accum_dtype: fp32` runs DeepSpeed's BF16_Optimizer, which
    flattens its groups back to back whatever the config says (67 of the tiny preset's 110 weights
    misaligned), and a user ds_config may have set parameter_alignment back to false.
    """
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer

    if isinstance(optimizer, BF16_Optimizer):
        return (
            "DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, data_types.grad_accum_dtype=fp32 in train.ds_config) "
            "packs them back to back: use train.zero_stage=2, or leave data_types.grad_accum_dtype out."
        )
    if isinstance(optimizer, FP16_Optimizer):
        return (
            "DeepSpeed's FP16_Optimizer (ZeRO-0 with DeepSpeed's fused Adam) packs them back to back: "
            "use train.zero_stage=1, or leave the optimizer section out of train.ds_config."
        )
    if not deepspeed_supports_alignment():
        return "Upgrade deepspeed to >= 0.19 for zero_optimization.parameter_alignment."
    if getattr(optimizer, "parameter_alignment", True) is False:
        return "train.ds_config sets zero_optimization.parameter_alignment to false: leave it out."
    return "Set zero_optimization.parameter_alignment to true in train.ds_config."
