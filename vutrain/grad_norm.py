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


class IntervalNormMax:
    """The largest global gradient norm of a logging interval's optimizer steps (train/grad_norm_max).

    train/grad_norm is the logging step's norm alone: a spike between two logging steps, the
    step that shows a run going wrong, never appeared, while train/loss is an interval mean. Kept
    on the device (one maximum per step, no host read), read once per logged row, and saved with
    the checkpoint so a run resumed mid-interval logs the uninterrupted run's value.
    """

    def __init__(self) -> None:
        self._max: torch.Tensor | None = None

    def add(self, norm, device: torch.device) -> None:
        """Fold in one step's norm as DeepSpeed reports it (a tensor, a float, or None for none).

        Its -1 (ZeRO's non-finite marker) and NaN count as inf, as train/grad_norm reads them."""
        if norm is None:
            return
        with torch.no_grad():
            if isinstance(norm, torch.Tensor):
                value = norm.detach().to(device=device, dtype=torch.float64).reshape(())
            else:  # a fill kernel: as_tensor of a host float copies from pageable memory, a device wait
                value = torch.full((), float(norm), dtype=torch.float64, device=device)
            # NaN >= 0 is False too: both markers become inf
            value = torch.where(value >= 0, value, torch.full_like(value, float("inf")))
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
