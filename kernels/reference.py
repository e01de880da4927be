"""Plain-torch versions of the kernels' ops: the oracle for tests and benchmarks,
and the fallback when Triton cannot run.

They build the full ``N x M`` logits (O(N*M) memory), like open_clip's ``ClipLoss``, but
in float32 (float64 for float64 inputs) whatever the input dtype, as the Triton tiles
accumulate them (``scaled_logits``); losses come back in that dtype.
"""

from __future__ import annotations

import contextlib
import operator

import numpy as np
import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")
# clip_loss's two feature arguments, as its errors name them.
CLIP_NAMES = ("image_features", "text_features")


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernel_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype the kernels compute ``features`` in: the autocast dtype for fp32 features while
    autocast is on for their device type (as the torch reference's matmul, and open_clip's loss
    under amp, run them), their own dtype otherwise.

    Without this, fp32 features under ``torch.autocast`` ran the kernels' tiles as exact fp32
    dots on CUDA cores (torch's default matmul precision), many times slower than the bf16
    tensor-core tiles the reference path got."""
    device_type = features.device.type
    if features.dtype != torch.float32 or not torch.amp.is_autocast_available(device_type):
        return features.dtype  # e.g. meta tensors, which have no autocast (and raised asking)
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return features.dtype


def scaled_logits(
    queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """``logit_scale * queries @ keys.T`` as the kernels form it: each side rounded to the dtype the
    kernels compute it in (:func:`kernel_dtype`), the products summed and kept in fp32 (float64 for
    float64 inputs). Formed in the input dtype, fp16 logits overflowed to inf past 65504 (scale 100
    on features of norm 26) and the loss was NaN where the kernels' stayed finite; bf16 logits lost
    all but 8 bits (0.4 at a logit of 100). A product of two 16-bit values is exact in fp32, so
    this is the kernels' tile up to the order of the sums."""
    exact = _loss_dtype(queries.dtype)
    q = queries.to(kernel_dtype(queries)).to(exact)
    k = keys.to(kernel_dtype(keys)).to(exact)
    with _autocast_off(queries.device.type):  # autocast would run the fp32 matmul in 16 bits again
        return as_zero_dim(logit_scale) * (q @ k.T)


def as_zero_dim(value: torch.Tensor | float) -> torch.Tensor | float:
    """A one-element scale or bias as a 0-dim tensor, any other number as a Python float (as the
    kernels read it): a [1] float64 tensor or a 0-dim numpy array would otherwise promote the
    [N, M] logits (and the loss) to float64, where the kernels return float32, and a Fraction or
    Decimal cannot multiply a tensor at all."""
    return constant_for_autograd(value.reshape(())) if isinstance(value, torch.Tensor) else float(value)


def constant_for_autograd(value: torch.Tensor) -> torch.Tensor:
    """``value``, or a plain copy of it if it is an inference tensor (one made under
    ``torch.inference_mode()``, e.g. a bias or scale cached by an eval loop). Such a tensor cannot
    require grad, so it is a constant to autograd, but the scale's product with the logits (and
    the kernels' backward) saves it: with features that require grad the ops failed with
    "Inference tensors cannot be saved for backward", the kernels even for the bias, whose sum
    the reference never saves. A copy of one number is free."""
    if value.is_inference() and not torch.is_inference_mode_enabled():
        return value.clone()
    return value


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_inputs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    label_offset: int,
    reduction: str,
    names: tuple[str, str] = ("queries", "keys"),
) -> None:
    """Validate shapes and the label range shared by every implementation. ``names``: the two
    arguments as the caller's op calls them, so that clip_loss's errors name ``image_features`` and
    ``text_features`` (it has no ``queries`` or ``keys`` for its caller to look for)."""
    first, second = names
    check_tensors(queries, keys, names)
    if queries.dim() != 2 or keys.dim() != 2:
        raise ValueError(
            f"{first} and {second} must be 2-D [N, D] and [M, D]; "
            f"got {tuple(queries.shape)} and {tuple(keys.shape)}"
        )
    n, d = queries.shape
    m, dk = keys.shape
    if d != dk:
        raise ValueError(f"{first} have D={d} but {second} have D={dk}; both must share the embedding size")
    if n == 0 or m == 0:
        raise ValueError(f"{first} and {second} must each hold at least one row")
    if n > m:
        # The range below would read [0, negative]: no offset can help, the caller swapped sides.
        raise ValueError(
            f"{first} (N={n}) outnumber {second} (M={m}): row i is labelled at column label_offset + i, "
            f"so pass the longer side (e.g. the gathered features) as {second}"
        )
    if not 0 <= label_offset <= m - n:
        raise ValueError(
            f"label_offset={label_offset} puts the labels of N={n} rows outside the M={m} columns; "
            f"it must lie in [0, {m - n}] (e.g. rank * local_batch)"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    if not (queries.is_floating_point() and keys.is_floating_point()):
        # The reference would run an integer (or bool) matmul and the kernels the same as fp32:
        # features come from an encoder, so these are a caller's mistake (token ids, masks).
        raise ValueError(
            f"{first} and {second} must be floating-point features (fp32, fp16 or bf16); "
            f"got {queries.dtype} and {keys.dtype}"
        )
    if queries.device != keys.device:
        # The Triton path would otherwise launch one kernel with pointers into two devices'
        # memory (an illegal address on a GPU, not a clear error).
        raise ValueError(
            f"{first} ({queries.device}) and {second} ({keys.device}) must be on the same device"
        )
    if kernel_dtype(queries) != kernel_dtype(keys):  # under autocast: the dtype the matmul sees
        raise ValueError(f"{first} ({queries.dtype}) and {second} ({keys.dtype}) must share a dtype")


def check_tensors(queries, keys, names: tuple[str, str] = ("queries", "keys")) -> None:
    """Both feature sets are torch tensors (a numpy array or a list failed with an AttributeError
    deep inside the ops)."""
    for name, value in zip(names, (queries, keys)):
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor of features; got {type(value).__name__} "
                f"(convert it with torch.as_tensor)"
            )


def check_square(image_features: torch.Tensor, text_features: torch.Tensor) -> None:
    """clip_loss's own shape rule, checked before ``check_inputs``: with more images than texts
    that would blame a ``label_offset`` the caller never passed."""
    check_tensors(image_features, text_features, CLIP_NAMES)
    if image_features.dim() == 2 and text_features.dim() == 2:
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(
                f"clip_loss needs as many images as texts; got {image_features.shape[0]} and "
                f"{text_features.shape[0]} (use contrastive_ce for rectangular problems)"
            )


def check_scalar(value, name: str) -> None:
    """``value`` (``logit_scale`` or ``logit_bias``) is one number: a float or a one-element tensor.
    The kernels refuse more; without this check the reference broadcast a [k] tensor against the
    [N, M] logits (per column when k == M: a silently different loss) where Triton does not run."""
    if is_bool(value):
        raise ValueError(f"{name} must be a number or a one-element tensor; got the boolean {value!r}")
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold one value; got shape {tuple(value.shape)}")
        if value.is_complex():  # the kernels' fp32 copy would drop the imaginary part silently
            raise ValueError(f"{name} must be a real number; got a {value.dtype} tensor")
        return
    # A string parses as a float, so the kernels took "100" (e.g. a quoted YAML value) while the
    # reference raised a TypeError: refused on both paths.
    bad = isinstance(value, (str, bytes))
    try:
        float(value)
    except (TypeError, ValueError):
        bad = True
    if bad:
        raise ValueError(f"{name} must be a number or a one-element tensor; got {value!r}")


def check_scalar_device(value, name: str, device: torch.device) -> None:
    """A ``logit_scale`` or ``logit_bias`` tensor lives where the features' logits can use it: on
    their device, or on the CPU (torch, and ``as_zero_dim``'s 0-dim form, take a CPU scalar beside
    any device's tensor). A CUDA scale beside CPU features (an eval loop's cached features with the
    model's parameter) failed inside the logits' product with torch's "Expected all tensors to be
    on the same device", naming neither the argument nor the fix."""
    if isinstance(value, torch.Tensor) and value.device != device and value.device.type != "cpu":
        raise ValueError(
            f"{name} is on {value.device} but the features are on {device}; move it to the "
            f"features' device first ({name}.to(features.device)) or the features to {value.device}"
        )


def is_bool(value) -> bool:
    """A Python, numpy or torch boolean. Each passes as the number 0 or 1 (``operator.index(True)``
    is 1, ``float(torch.tensor(True))`` 1.0), so ``label_offset=True`` silently shifted every label
    by one column and ``logit_scale=True`` scaled by 1, while a numpy ``True`` offset was refused: a flag
    passed where a number belongs (``local_loss``, ``learn_scale``) is a caller's mistake."""
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, (bool, np.bool_))


def as_label_offset(label_offset) -> int:
    """``label_offset`` as a Python int: the kernels take it as a launch scalar, where a 0-dim
    tensor (or a numpy integer) failed deep inside Triton although the reference accepts it."""
    if is_bool(label_offset):
        raise ValueError(
            f"label_offset must be an integer (e.g. rank * local_batch); got the boolean {label_offset!r}"
        )
    try:
        return operator.index(label_offset)
    except TypeError:
        raise ValueError(
            f"label_offset must be an integer (e.g. rank * local_batch); got {label_offset!r}"
        ) from None


def contrastive_ce_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    label_offset: int = 0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of each row of ``logit_scale * queries @ keys.T`` against column
    ``label_offset + i``.

    queries: [N, D]; keys: [M, D]; logit_scale: scalar (already exponentiated).
    Returns a scalar (``mean``/``sum``) or [N] (``none``).
    """
    label_offset = as_label_offset(label_offset)
    check_inputs(queries, keys, label_offset, reduction)
    check_scalar(logit_scale, "logit_scale")
    check_scalar_device(logit_scale, "logit_scale", queries.device)
    logits = scaled_logits(queries, keys, logit_scale)
    labels = torch.arange(queries.shape[0], device=queries.device) + label_offset
    return F.cross_entropy(logits, labels, reduction=reduction)


def clip_loss_reference(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float
) -> torch.Tensor:
    """Symmetric CLIP loss of one square problem:
    ``(CE(S, diag) + CE(S.T, diag)) / 2`` with ``S = logit_scale * I @ T.T``.

    image_features, text_features: [N, D] (rows i are positives of each other).
    """
    check_square(image_features, text_features)
    check_inputs(image_features, text_features, 0, "mean", CLIP_NAMES)
    check_scalar(logit_scale, "logit_scale")
    check_scalar_device(logit_scale, "logit_scale", image_features.device)
    logits = scaled_logits(image_features, text_features, logit_scale)
    labels = torch.arange(image_features.shape[0], device=image_features.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def sigmoid_loss_reference(
    queries: torch.Tensor,
    keys: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    label_offset: int = 0,
) -> torch.Tensor:
    """SigLIP loss of ``logit_scale * queries @ keys.T + logit_bias``: the sum over all
    pairs of ``-logsigmoid(z * logit)`` (z = +1 at column ``label_offset + i`` of row i,
    -1 elsewhere) divided by N, as open_clip's ``SigLipLoss``.

    queries: [N, D]; keys: [M, D]; logit_scale (already exponentiated), logit_bias: scalars.
    """
    label_offset = as_label_offset(label_offset)
    check_inputs(queries, keys, label_offset, "mean")
    check_scalar(logit_scale, "logit_scale")
    check_scalar(logit_bias, "logit_bias")
    for value, name in ((logit_scale, "logit_scale"), (logit_bias, "logit_bias")):
        check_scalar_device(value, name, queries.device)
    logits = scaled_logits(queries, keys, logit_scale) + as_zero_dim(logit_bias)
    n = queries.shape[0]
    labels = -torch.ones_like(logits)
    rows = torch.arange(n, device=queries.device)
    labels[rows, rows + label_offset] = 1
    return -F.logsigmoid(labels * logits).sum() / n
