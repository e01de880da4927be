"""DeepSpeed's gradient norm in a few kernels instead of two per parameter.

At every optimizer step ZeRO (stages 1, 2 and 3) computes the global gradient norm for clipping
and overflow in ``get_grad_norm_direct``: per gradient, a cast to fp64 (a copy four times the size
of a bf16 gradient) and a norm, two kernels each: 796 of the optimizer step's 894 compute ops for
ViT-B/32's 398 trainable tensors (BENCHMARKS.md, tools/count_step_ops.py). Issue 9 asks for an
optimizer phase under 10% of the step.

:func:`use_multi_tensor_grad_norm` wraps the optimizer's method: the per-gradient norms come from
one ``torch._foreach_norm`` (fp32 results, accumulated in fp32; a handful of multi-tensor kernels
on CUDA), and DeepSpeed's own method then finishes from the stacked norms, i.e. it sees one
"gradient" whose norm is the norm of all of them, so its sum over the data-parallel group, its
model-parallel and expert-parallel reductions and its non-finite masking (-1) stay DeepSpeed's.
The per-gradient norms are fp32 instead of DeepSpeed's fp64: a relative difference of about 1e-7,
far below what clipping can tell apart. Anything unusual (another norm type, pipeline-replicated
or model-parallel ranks other than 0, a failing multi-tensor norm) takes DeepSpeed's own path.
"""

from __future__ import annotations

import functools

import torch


def use_multi_tensor_grad_norm(optimizer) -> bool:
    """Wrap ``optimizer.get_grad_norm_direct`` (a ZeRO optimizer's) in place; False when the
    optimizer has none or model parallelism makes ranks count parameters differently."""
    original = getattr(optimizer, "get_grad_norm_direct", None)
    if original is None or getattr(optimizer, "model_parallel_rank", None) != 0:
        return False
    if getattr(original, "_vutrain_multi_tensor", False):
        return True

    @functools.wraps(original)
    def get_grad_norm_direct(gradients, params, norm_type=2):
        stacked = _stacked_norms(gradients, params, norm_type)
        if stacked is None:
            return original(gradients, params, norm_type)
        # DeepSpeed pairs gradients with params by zip: one "gradient", paired with params[0].
        return original([stacked], params, norm_type)

    get_grad_norm_direct._vutrain_multi_tensor = True
    optimizer.get_grad_norm_direct = get_grad_norm_direct
    return True


def _stacked_norms(gradients, params, norm_type) -> torch.Tensor | None:
    """The [n] fp32 L2 norms of the gradients DeepSpeed would count, or None for its own path."""
    if float(norm_type) != 2.0 or any(getattr(p, "ds_pipe_replicated", False) for p in params):
        return None
    # ZeRO-1/2 skip their partition's zero padding; zip pairs what is left with params.
    kept = (g for g in gradients if not getattr(g, "_zero_padding", False))
    counted = [g for g, _ in zip(kept, params)]
    # One device only: DeepSpeed moves each gradient to the accelerator itself (ZeRO-3 fills a
    # frozen parameter's slot with zeros on the CPU under offload_param); stacking mixed devices fails.
    if not counted or len({g.device for g in counted}) != 1:
        return None
    try:
        with torch.no_grad():
            return torch.stack(torch._foreach_norm(counted, 2.0, dtype=torch.float32))
    except (RuntimeError, TypeError):  # e.g. a torch without _foreach_norm's dtype argument
        return None


def report_zero0_grad_norm(engine) -> bool:
    """ZeRO-0 with fp32 weights (fp32, amp_bf16): have ``engine.get_global_grad_norm()`` report
    the step's norm (before clipping, on the device) instead of None.

    There the engine's optimizer is the torch AdamW, which has no ``_global_grad_norm`` for
    DeepSpeed to copy after its step, and DeepSpeed's ``clip_fp32_gradients`` drops the norm its
    ``clip_grad_norm_`` returns: train/grad_norm and train/grad_norm_max were missing from every
    row at ZeRO-0 fp32 and amp_bf16, the stage and precisions a small run starts with. The clip is
    DeepSpeed's own function, its norm kept; with clipping off (no clip runs) a step pre-hook
    takes the norm with one multi-tensor norm. Install before any pre-hook that changes the
    gradients (``grad_clip.zero_nonfinite_at_step`` zeroes a NaN step's: its norm reads NaN, not
    0). Returns whether installed (False for any other engine: its optimizer reports its own).
    """
    optimizer = engine.optimizer
    if getattr(optimizer, "_vutrain_reports_norm", False):
        return True
    if engine.zero_optimization_stage() != 0 or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False
    if not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "_global_grad_norm"):
        return False
    from deepspeed.runtime.utils import clip_grad_norm_

    def clip_fp32_gradients():
        # DeepSpeed's method body, whose result it drops: the norm before clipping, all ranks.
        optimizer._vutrain_clip_norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(), mpu=engine.mpu
        )

    engine.clip_fp32_gradients = clip_fp32_gradients
    optimizer._global_grad_norm = None  # DeepSpeed copies it to the engine after each step
    optimizer.register_step_pre_hook(_keep_step_norm)
    optimizer._vutrain_reports_norm = True
    return True


def _keep_step_norm(optimizer, args, kwargs) -> None:
    """The step's norm: the clip's, or (clipping off) the gradients' own, ZeRO-0's all-reduced ones."""
    norm = optimizer.__dict__.pop("_vutrain_clip_norm", None)
    if norm is None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        with torch.no_grad():
            norm = torch.nn.utils.get_total_norm(grads, 2.0)
    optimizer._global_grad_norm = norm


def step_norm(norm, device: torch.device, skipped: torch.Tensor | None = None) -> torch.Tensor:
    """One step's norm as a float64 0-dim tensor on `device`, with the logs' reading: DeepSpeed's -1,
    NaN and a step the non-finite guard skipped (`skipped`, a device bool) are inf. No host read."""
    if isinstance(norm, torch.Tensor):
        value = norm.detach().to(device=device, dtype=torch.float64).reshape(())
    else:  # a fill kernel: as_tensor of a host float copies from pageable memory, a device wait
        value = torch.full((), float(norm), dtype=torch.float64, device=device)
    invalid = ~(value >= 0)  # NaN >= 0 is False too: both markers become inf
    if skipped is not None:
        invalid = invalid | skipped.to(device)
    return torch.where(invalid, torch.full_like(value, float("inf")), value)


def logged_step_norm(norm, device: torch.device, skipped: torch.Tensor | None = None) -> float | None:
    """train/grad_norm: `step_norm` read on the host (a logging step's one read), None for none."""
    return None if norm is None else float(step_norm(norm, device, skipped))


class IntervalNormMax:
    """The largest global gradient norm of a logging interval's optimizer steps (train/grad_norm_max).

    train/grad_norm is the logging step's norm alone: a spike between two logging steps, the
    step that shows a run going wrong, never appeared, while train/loss is an interval mean. Kept
    on the device (one maximum per step, no host read), read once per logged row, and saved with
    the checkpoint so a run resumed mid-interval logs the uninterrupted run's value.
    """

    def __init__(self) -> None:
        self._max: torch.Tensor | None = None

    def add(self, norm, device: torch.device, skipped: torch.Tensor | None = None) -> None:
        """Fold in one step's norm as DeepSpeed reports it (a tensor, a float, or None for none).

        Its -1 (ZeRO's non-finite marker) and NaN count as inf, as train/grad_norm reads them, and
        so does a step the non-finite guard skipped (`skipped`: NonFiniteGuard.step_skipped, on the
        device): bf16 ZeRO-1/2's step-time mask reports -1 for it, the per-parameter hooks' zeroed
        gradients 0, which hid the skip behind the interval's other steps."""
        if norm is None:
            return
        with torch.no_grad():
            value = step_norm(norm, device, skipped)
            self._max = value if self._max is None else torch.maximum(self._max, value)

    def read(self) -> float | None:
        """The interval's largest norm (None where no step had one); the next interval starts empty."""
        if self._max is None:
            return None
        value, self._max = float(self._max), None
        return value

    def state_dict(self) -> float | None:
        """The interval's maximum so far (float64 survives a checkpoint's JSON exactly; inf too)."""
        return None if self._max is None else float(self._max)

    def load_state_dict(self, value, device: torch.device) -> None:
        self._max = None if value is None else torch.tensor(float(value), dtype=torch.float64, device=device)
