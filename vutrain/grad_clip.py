"""ZeRO-1/2's gradient clipping decided on the device: no host read at the optimizer step.

DeepSpeed's ``DeepSpeedZeroOptimizer.unscale_and_clip_grads`` (ZeRO-1 and 2) asks on the host
whether the global norm is invalid (``is_invalid_grad_norm``: ``bool(...)`` of a device tensor)
before it scales each parameter group's flat gradient, once per group: two host reads per step for
vutrain's two groups (weight decay or not), measured on an H200 by ``python -m vutrain.bench
--compare open_clip`` (``host_reads_per_step``; open_clip's step has none). Each read waits until
the GPU has finished the backward, so the CPU cannot queue the optimizer's kernels and the next
forward while the GPU still works: at batch 256 the step is partly serial.

:func:`use_device_side_clip` replaces the method on the optimizer by the same arithmetic with the
invalid case chosen by ``torch.where`` on the device: an invalid norm (non-finite, or DeepSpeed's
-1 sentinel) clips with an infinite norm, i.e. multiplies the gradients by 0, as DeepSpeed does,
and then zeroes them: times 0 leaves a NaN or inf entry NaN, and in bf16 (no overflow check) such a
gradient with a finite loss would reach AdamW and make its moments and the weights NaN for good.
The step's own overflow decision (fp16, or ``check_grad_overflow``) is untouched: in bf16 DeepSpeed
makes none, and in fp16 it skips the step before this runs. ZeRO-3's method has no host read.
With clipping off (``train.grad_clip=0``) an invalid norm zeroes the gradients all the same: the
bf16 reason holds whether or not the step clips.

:func:`mask_at_step` also gives the wrapper the non-finite guard's device-side skip flag
(vutrain/nonfinite.py): where the step has one micro-batch and DeepSpeed makes no overflow
decision of its own (bf16 without ``check_grad_overflow``, no CPU offload), a skipped micro-batch
is a skipped step, and zeroing the flat fp32 gradient partitions once here (a ``masked_fill_`` per
parameter group) replaces the guard's ``masked_fill`` hook on every parameter in backward (398 ops
and Python calls per micro-batch for ViT-B/32). NaN gradients of a skipped micro-batch then pass
through ZeRO's reduction (every rank skips together) and are zeroed before the optimizer sees
them: AdamW steps with a zero gradient, as it did with the hooks.

:func:`zero_nonfinite_at_step` gives ZeRO-0 with fp32 weights (fp32, amp_bf16), whose plain AdamW
checks nothing, the same zero-gradient step for a NaN or inf gradient, decided on the device.

:func:`count_zeroed_steps` hands both zeroing paths a device counter (the non-finite guard's
``zeroed_steps``) that each zeroed step adds 1 to, on the device: such a step was counted nowhere
(DeepSpeed's ``skipped_steps`` counts only the steps it skips), so a run whose gradients kept
overflowing under finite losses trained on without a word. A step zeroed because the guard
skipped its micro-batch (``mask_at_step``) is the guard's to count, not this counter's.
"""

from __future__ import annotations

import functools

import torch


def is_zero_1_2(optimizer) -> bool:
    """Whether `optimizer` is DeepSpeed's ZeRO-1/2 optimizer (the class whose methods we wrap)."""
    try:
        from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    except ImportError:  # pragma: no cover - deepspeed is a core requirement
        return False
    return isinstance(optimizer, DeepSpeedZeroOptimizer)


def use_device_side_clip(optimizer) -> bool:
    """Wrap a ZeRO-1/2 optimizer's ``unscale_and_clip_grads`` in place; False for any other."""
    if not is_zero_1_2(optimizer):
        return False
    original = optimizer.unscale_and_clip_grads
    if getattr(original, "_vutrain_device_side", False):
        return True

    @functools.wraps(original)
    def unscale_and_clip_grads(grad_groups_flat, total_norm):
        skip = unscale_and_clip_grads.skip
        if skip is not None:  # the guard's verdict on this step's one micro-batch (mask_at_step)
            for g in _flat_tensors(grad_groups_flat):
                g.data.masked_fill_(skip, 0)
        clip_grad, loss_scale = optimizer.clip_grad, optimizer.loss_scale
        if not torch.is_tensor(total_norm) or torch.is_tensor(loss_scale):
            return original(grad_groups_flat, total_norm)  # a form not seen here
        _count_once_per_step(unscale_and_clip_grads, total_norm)
        if clip_grad <= 0.0:
            # No clip, but an invalid norm still zeroes the gradients: in bf16 nothing else skips
            # the step, and train.grad_clip=0 (open_clip's default) made the weights NaN for good.
            original(grad_groups_flat, total_norm)  # unscales fp16's gradients; at scale 1 nothing
            return zero_where_invalid(grad_groups_flat, total_norm)
        with torch.no_grad():
            # DeepSpeed calls this once per parameter group with the step's one norm tensor: the
            # factor (16 small ops, counted) is computed for the first group and reused for the rest.
            # The version counter tells an in-place update of the same tensor from a reuse.
            key = (total_norm, total_norm._version, loss_scale, clip_grad)
            last = unscale_and_clip_grads.last
            if last is not None and last[0] is key[0] and last[1:] == key[1:]:
                inverse, invalid = unscale_and_clip_grads.last_factor
            else:
                invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
                clip_norm = torch.where(invalid, torch.full_like(total_norm, float("inf")), total_norm)
                # DeepSpeed's formula: the norm is of the scaled gradients.
                clip = torch.clamp(((clip_norm / loss_scale) + 1e-6) / clip_grad, min=1.0)
                inverse = 1.0 / (clip * loss_scale)
                unscale_and_clip_grads.last, unscale_and_clip_grads.last_factor = key, (inverse, invalid)
            for g in _flat_tensors(grad_groups_flat):
                g.data.mul_(inverse)
                # An invalid norm zeroes the gradients: times 0 alone leaves a NaN or inf entry NaN
                # (DeepSpeed's method too), and in bf16 no overflow check skips the step, so AdamW
                # would write NaN into its moments and the weights for good.
                g.data.masked_fill_(invalid, 0)

    unscale_and_clip_grads._vutrain_device_side = True
    unscale_and_clip_grads.skip = unscale_and_clip_grads.zeroed = unscale_and_clip_grads.counted = None
    unscale_and_clip_grads.last = unscale_and_clip_grads.last_factor = None
    optimizer.unscale_and_clip_grads = unscale_and_clip_grads
    return True


def _count_once_per_step(clip, total_norm: torch.Tensor) -> None:
    """Add 1 to ``clip.zeroed`` (on the device) if this step's norm is invalid and the guard did not
    skip the step. DeepSpeed calls the clip once per parameter group with the step's one norm
    tensor: only the first call of a step counts (the version tells an in-place update apart)."""
    if clip.zeroed is None:
        return
    seen = clip.counted
    if seen is not None and seen[0] is total_norm and seen[1] == total_norm._version:
        return
    clip.counted = (total_norm, total_norm._version)
    with torch.no_grad():
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
        if clip.skip is not None:
            invalid = invalid & ~clip.skip
        clip.zeroed.add_(invalid.to(clip.zeroed.device, clip.zeroed.dtype))


def count_zeroed_steps(engine, counter: torch.Tensor) -> bool:
    """Have the zeroing path installed on ``engine`` (``use_device_side_clip`` or
    ``zero_nonfinite_at_step``) add 1 to ``counter`` (a 0-dim tensor on the engine's device) for
    each optimizer step it zeroes for a NaN/inf gradient. False where neither is installed (the
    engine's optimizer skips such steps itself and counts them in ``engine.skipped_steps``)."""
    optimizer = engine.optimizer
    clip = getattr(optimizer, "unscale_and_clip_grads", None)
    if getattr(clip, "_vutrain_device_side", False):
        clip.zeroed = counter
        return True
    if getattr(optimizer, "_vutrain_zeroes_nonfinite", False):
        optimizer._vutrain_zeroed = counter
        return True
    return False


def zero_where_invalid(grad_groups_flat, total_norm: torch.Tensor) -> None:
    """Zero every flat gradient where the step's norm is non-finite or DeepSpeed's -1, on the device."""
    with torch.no_grad():
        invalid = ~torch.isfinite(total_norm) | (total_norm < 0)
        for g in _flat_tensors(grad_groups_flat):
            g.data.masked_fill_(invalid.to(g.device), 0)


def _flat_tensors(grad_groups_flat):
    """The flat gradient tensors DeepSpeed passes: one per group, or a list of sub-partitions."""
    for grad in grad_groups_flat:
        yield from grad if isinstance(grad, list) else [grad]


def mask_at_step(engine, skip: torch.Tensor) -> bool:
    """Have the wrapped clip zero the step's gradients where ``skip`` (a 0-dim bool on the device)
    is set, if a skipped micro-batch is a skipped step whose gradients nothing reads before the
    clip: ZeRO-1/2 wrapped by :func:`use_device_side_clip`, one micro-batch per step, bf16 without
    DeepSpeed's own overflow check (it would skip the step: fp16, fp32), no CPU offload (the flat
    gradients live on the host there), no Muon parameters (Muon turns gradients into updates during
    backward, before this step). True when installed: the guard's per-parameter hooks can go."""
    optimizer = engine.optimizer
    clip = getattr(optimizer, "unscale_and_clip_grads", None)
    if not getattr(clip, "_vutrain_device_side", False) or engine.gradient_accumulation_steps() != 1:
        return False
    if optimizer.dtype != torch.bfloat16 or optimizer.check_grad_overflow or optimizer.cpu_offload:
        return False
    if any(getattr(p, "use_muon", False) for group in optimizer.bit16_groups for p in group):
        return False
    clip.skip = skip
    return True


def zero_nonfinite_at_step(engine) -> bool:
    """ZeRO-0 in fp32: have the optimizer zero every gradient of a step where any is NaN or inf.

    There the engine's optimizer is the plain torch (or DeepSpeed fused) AdamW, which skips
    nothing: one NaN gradient under a finite loss made its moments and the weights NaN for good,
    while every other precision and stage skips or zeroes such a step. A step pre-hook makes it a
    zero-gradient step, as bf16 at ZeRO-1/2 (``use_device_side_clip``), decided on the device: one
    multi-tensor max-norm (NaN if any entry is NaN, inf if any is inf), no host read. ZeRO-0's
    gradients are all-reduced before the step, so a NaN on one rank is a NaN on every rank and all
    ranks zero the same step. False where the engine is another (its optimizer checks already) or
    where torch's autocast GradScaler steps (it skips such a step itself). Returns whether installed.
    """
    optimizer = engine.optimizer
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False
    if getattr(engine, "torch_autocast_z0_gradscaler", None):
        return False
    if not isinstance(optimizer, torch.optim.Optimizer):
        return False
    if getattr(optimizer, "_vutrain_zeroes_nonfinite", False):
        return True
    optimizer.register_step_pre_hook(_zero_grads_if_nonfinite)
    optimizer._vutrain_zeroes_nonfinite = True
    return True


def _zero_grads_if_nonfinite(optimizer, args, kwargs) -> None:
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # A zero-element parameter's empty gradient has nothing to zero and no max-norm (_foreach_norm
    # raised "cannot compute the infinity norm on an empty tensor": every ZeRO-0 fp32 step failed).
    grads = [g for g in grads if g.numel()]
    if not grads:
        return
    with torch.no_grad():
        device = grads[0].device
        largest = torch.stack([n.to(device) for n in torch._foreach_norm(grads, float("inf"))])
        invalid = ~torch.isfinite(largest).all()
        for g in grads:
            g.masked_fill_(invalid.to(g.device), 0)
        counter = getattr(optimizer, "_vutrain_zeroed", None)
        if counter is not None:  # count_zeroed_steps: a device add, no host read
            counter.add_(invalid.to(counter.device, counter.dtype))
