"""When the Triton kernels can run, and with which tile configuration (``kernels.tile_configs``).

Rule (documented in README.md, Kernels): the public ops use Triton when
``triton_available()`` is true and either the inputs are CUDA tensors or the
Triton interpreter is on (``TRITON_INTERPRET=1`` set before Triton is first
imported). Otherwise they fall back to ``kernels.reference`` (plain torch,
same semantics, materialises the logits).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import warnings

import torch

from kernels import tile_configs
from kernels.reference import kernel_dtype
from kernels.tile_configs import TileConfig

__all__ = [
    "TileConfig",
    "autocast_inputs",
    "cuda_supported",
    "device_guard",
    "functorch_transforming",
    "kernel_dtype",
    "run_eagerly",
    "savable_for_backward",
    "tile_config",
    "triton_available",
    "use_triton",
]


def _installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # e.g. sys.modules["triton"] = None
        return False


# Installed, not imported: importing ``kernels`` must neither need Triton nor import
# it, because Triton fixes interpreter mode at its own first import (see interpreting()).
HAS_TRITON = _installed()


@functools.cache
def triton_importable() -> bool:
    """Triton imports cleanly (imports it on first call)."""
    if not HAS_TRITON:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent: the ops fall back
        return False
    return True


# The values Triton's own ``getenv_bool`` reads as true (case-insensitive; 3.9 adds y/yes).
# Anything else, ``false``/``off``/``no`` included, leaves Triton compiling: counting those as
# requests imported Triton on a CPU and warned that the variable came too late.
_TRUTHY = ("1", "true", "on", "yes", "y")


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` is set to a value Triton reads as true (``1``, ``true``, ``on``...)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in _TRUTHY


def interpreting() -> bool:
    """True when the Triton CPU interpreter is really active.

    Triton decides at *its own* import time: its standard library (``tl.sum``,
    ``tl.zeros``...) is built as interpreter functions only if ``TRITON_INTERPRET=1``
    was already set. Setting it later (e.g. after ``torch.distributed.nn`` or
    ``transformers`` imported Triton) would crash every kernel, so that case counts
    as "not interpreting" and the ops fall back to the torch reference, with a warning.
    """
    if not (interpret_requested() and triton_importable()):
        return False
    import triton.language.standard as tl_std
    from triton.runtime.interpreter import InterpretedFunction

    active = isinstance(tl_std.sum, InterpretedFunction)
    if active:
        _patch_scalar_index()
    else:
        _warn_late_interpret()
    return active


@functools.cache
def _patch_scalar_index() -> None:
    """Make interpreter scalars usable as Python ints (``range(start, ...)``) with numpy 2.

    Triton 3.6's interpreter defines ``tensor.__index__`` as ``int(data)``, and a scalar's
    data is a one-element 1-D array there; numpy >= 2.4 refuses ``int()`` of a 1-D array
    ("only 0-dimensional arrays can be converted"), so every kernel loop over a program-id
    derived bound crashed. Triton 3.9 squeezes first; this applies the same fix to older
    versions and is a no-op for newer ones.
    """
    import triton.runtime.interpreter as interp

    original = getattr(interp, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_vutrain_index_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patch_lang_tensor._vutrain_index_fix = True
    interp._patch_lang_tensor = patch_lang_tensor


_WARNED = False


def _warn_late_interpret() -> None:
    global _WARNED
    if not _WARNED:
        _WARNED = True
        warnings.warn(
            "TRITON_INTERPRET=1 was set after Triton was imported, so the Triton interpreter is "
            "not active; kernels fall back to the torch reference. Set TRITON_INTERPRET=1 in the "
            "environment before starting Python.",
            RuntimeWarning,
            stacklevel=3,
        )


def triton_available() -> bool:
    """Triton is importable and can run: a CUDA device exists or the interpreter is on."""
    # Checked in this order so that a CPU-only process never imports Triton needlessly.
    return (torch.cuda.is_available() and triton_importable()) or interpreting()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether the ops should take the Triton path for these input tensors (judged in the dtype
    the kernels would get them in: :func:`kernel_dtype`). Other dtypes than fp32, fp16 and bf16
    (fp64: the oracle's) take the reference: compiled, an fp64 tile fails to build, and the
    interpreter would upcast it to fp32 and give an fp32 result. Under a ``torch.func``
    transform the reference runs too (see :func:`functorch_transforming`)."""
    if functorch_transforming():
        return False
    if not triton_available() or kernel_dtype(tensors[0]) not in KERNEL_DTYPES:
        return False
    if interpreting():
        return True
    if not all(t.is_cuda for t in tensors):
        return False
    dtype = kernel_dtype(tensors[0])
    if not cuda_supported(tensors[0].device, dtype):
        _warn_unsupported(tensors[0].device, dtype)
        return False
    return True


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def functorch_transforming() -> bool:
    """A ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``hessian``...) is tracing the call.
    The kernels' autograd Functions stash forward results on ``ctx``, which such transforms do not
    support: the Triton path failed with "it must override the setup_context staticmethod" (a
    change the caller cannot make) where the reference, plain torch ops, gives the same values,
    and per-sample gradients or Hessians too."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def autocast_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each input in its :func:`kernel_dtype` (a differentiable cast: gradients come back in fp32).
    Per tensor: fp32 image features beside bf16 text features under autocast both become bf16,
    as the reference's matmul has them. Inference tensors are also made savable for backward."""
    return tuple(savable_for_backward(t.to(kernel_dtype(t))) for t in tensors)


def savable_for_backward(features: torch.Tensor) -> torch.Tensor:
    """``features``, or a plain copy of them if they are an inference tensor that autograd may have
    to save. Features made under ``torch.inference_mode()`` (an eval loop's) with a logit scale that
    requires grad failed in the ops' ``save_for_backward`` ("Inference tensors cannot be saved for
    backward"), where the reference, which saves only the logits, returned the loss."""
    if features.is_inference() and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        return features.clone()
    return features


# Triton compiles for compute capability >= 7.0 (torch's inductor has the same floor): below
# it the first launch fails (or, under loss.backend=auto, a training run's first step). bf16
# tensor cores start at Ampere (8.0); below that Triton lowers a bf16 tl.dot to fp32 FMAs (it
# compiles for sm_75), a path never run or timed here, so bf16 inputs there take the reference.
MIN_CAPABILITY = (7, 0)
MIN_CAPABILITY_BF16 = (8, 0)


def cuda_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Triton can compile the kernels for this CUDA device and input dtype (ROCm: always)."""
    if torch.version.hip is not None:
        return True
    capability = tuple(torch.cuda.get_device_capability(device))
    return capability >= (MIN_CAPABILITY_BF16 if dtype == torch.bfloat16 else MIN_CAPABILITY)


_WARNED_UNSUPPORTED: set = set()


def _warn_unsupported(device: torch.device, dtype: torch.dtype) -> None:
    capability = tuple(torch.cuda.get_device_capability(device))
    if (capability, dtype) in _WARNED_UNSUPPORTED:
        return
    _WARNED_UNSUPPORTED.add((capability, dtype))
    need = MIN_CAPABILITY_BF16 if dtype == torch.bfloat16 else MIN_CAPABILITY
    fix = "fp16 inputs (train.precision=fp16)" if capability >= MIN_CAPABILITY else "loss.backend=torch"
    warnings.warn(
        f"{torch.cuda.get_device_name(device)} has compute capability {capability[0]}.{capability[1]}, "
        f"below the {need[0]}.{need[1]} these kernels need for {str(dtype).removeprefix('torch.')} inputs: "
        f"the kernels use the torch reference instead (it builds the N x M logits); use {fix}",
        RuntimeWarning,
        stacklevel=3,
    )


def run_eagerly(op):
    """``op`` wrapped to run outside torch.compile's graph (a graph break), for an op called while
    Dynamo traces. Traced, the launch code failed under the interpreter ("failed to run FX node with
    fake tensors", deep in Triton). Only called while compiling: importing ``torch._dynamo`` imports
    Triton, which a CPU-only process must not do before it knows whether the interpreter is on."""
    import torch._dynamo

    return torch._dynamo.disable(op)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Make ``device`` torch's current CUDA device for the block (a no-op off CUDA).

    Triton launches on torch's *current* device and that device's current stream, not on
    the device of the tensors it is handed: features on cuda:1 while cuda:0 is current
    would run the kernels on cuda:0 with cuda:1 pointers (an illegal address, or garbage
    through peer access) and unordered with the torch ops on cuda:1's stream."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def tile_config(kind: str, inputs: torch.Tensor, n: int, m: int, d: int) -> TileConfig:
    """The tile config for one launch of ``kind`` on an N x M x D problem whose operands have
    ``inputs``' device and dtype (see ``kernels.tile_configs``)."""
    # The precision too: on an H100, exact fp32 dots pipeline one operand stage fewer than TF32
    # ones, so the shared memory a config needs follows torch's matmul setting at this launch.
    return tile_configs.select(
        kind, n, m, d, inputs.device, interpreting(), inputs.element_size(), inputs.dtype,
        dot_precision(inputs.dtype),
    )  # fmt: skip


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in under the interpreter."""
    if device.type == "cuda" and not interpreting():
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 inputs follows torch's matmul setting:
    exact fp32 by default, TF32 when ``torch.set_float32_matmul_precision("high")``
    (or ``allow_tf32``) is on. Irrelevant (native) for 16-bit inputs."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if torch.get_float32_matmul_precision() != "highest" else "ieee"


def launch_kwargs(cfg, dtype: torch.dtype) -> dict:
    """The keywords every tile kernel launch shares: the tile shape and launch settings of
    ``cfg`` (a ``TileConfig``) and the dtype-derived constexprs ``UPCAST`` (16-bit inputs in
    the interpreter, which computes them wrongly: upcast at load) and ``PRECISION``
    (:func:`dot_precision`)."""
    return {
        "BM": cfg.BM,
        "BN": cfg.BN,
        "BD": cfg.BD,
        "UPCAST": interpreting() and dtype != torch.float32,
        "PRECISION": dot_precision(dtype),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
