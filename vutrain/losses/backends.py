"""Which implementation a loss call runs: torch, or a Triton kernel of the `kernels` package.

* "torch": never the kernels.
* "triton": always the kernels (the interpreter on CPU with TRITON_INTERPRET=1); a loss rejects
  there, with a clear error, what its kernel does not implement.
* "auto": the kernels for CUDA features when Triton can compile for the device (compute
  capability 7.0, 8.0 for bf16: `kernels.runtime.cuda_supported`) and the call
  needs nothing the kernel lacks (a logit bias for the softmax loss, multi-positive labels);
  anything else falls back to torch. "auto" is a speed preference, not a request, so a fallback
  is silent.
"""

from __future__ import annotations

import torch

BACKENDS = ("torch", "triton", "auto")


def check_backend(backend: str) -> None:
    """Raise on a backend name outside BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown loss backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def scalar_for_autograd(value: torch.Tensor | float | None) -> torch.Tensor | float | None:
    """A logit scale or bias as autograd can save it: an inference tensor (an eval loop's cached
    `model.logit_scale.exp()` made under `torch.inference_mode()`) becomes a plain copy.

    The torch path multiplies the logits by the scale, which saves it for backward, and failed
    with "Inference tensors cannot be saved for backward" where the kernels (which copy it
    themselves) ran: both backends must accept the same arguments.
    """
    if not isinstance(value, torch.Tensor):
        return value
    from kernels.reference import constant_for_autograd  # lazy, as every `kernels` import here

    return constant_for_autograd(value)


def kernel_available(name: str) -> bool:
    """`kernels.<name>` exists and Triton can run it in this process."""
    try:
        import kernels  # lazy: the trainer must import without Triton installed
    except ImportError:
        return False
    available = getattr(kernels, "triton_available", None)
    return callable(available) and bool(available()) and hasattr(kernels, name)


def takes_kernel(backend: str, features: torch.Tensor, kernel: str, supported: bool) -> bool:
    """Whether a loss call with `backend` runs `kernels.<kernel>`.

    supported: the call needs nothing the kernel lacks (decides "auto" only).
    """
    if backend != "auto":
        return backend == "triton"
    if not (features.is_cuda and supported and kernel_available(kernel)):
        return False
    from kernels.runtime import cuda_supported, kernel_dtype  # importable: kernels imported above

    # A GPU Triton cannot compile for (e.g. bf16 before Ampere) keeps "auto" on torch, silently;
    # judged in the dtype the kernels would compute in (autocast's for fp32 features under it).
    return cuda_supported(features.device, kernel_dtype(features))
