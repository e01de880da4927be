"""Review of the kernels (fourth round): what a caller passes to the public ops. Every number type
the kernel path accepts as ``logit_scale`` / ``logit_bias`` gives the same float32 loss on the torch
fallback (a Fraction or a 0-dim numpy array raised a TypeError there, a numpy bias made it
float64); a string or complex scale is refused on both paths (the kernels parsed ``"100"``); features
that are not tensors are one ValueError (an AttributeError deep inside). Runs the Triton
interpreter on CPU (the conftest sets TRITON_INTERPRET); expected runtime: ~3 s."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from kernels.runtime import interpreting

N, M, D, OFFSET = 5, 9, 20, 3
SCALE, BIAS = 7.0, -2.0


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


Q, K = _features(N, D, 0), _features(M, D, 1)


def _oracle(op: str, s: float, b: float) -> float:
    """The loss in fp64 from its definition, on the same fp32 features."""
    q, k = Q.double(), K.double()
    if op == "clip_loss":
        x = s * q @ q.T
        diag = x.diagonal()
        return (((x.logsumexp(1) - diag).mean() + (x.logsumexp(0) - diag).mean()) / 2).item()
    x = s * q @ k.T + (b if op == "sigmoid_loss" else 0.0)
    rows = torch.arange(N)
    if op == "contrastive_ce":
        return (x.logsumexp(1) - x[rows, rows + OFFSET]).mean().item()
    z = -torch.ones_like(x)
    z[rows, rows + OFFSET] = 1
    return (torch.logaddexp(torch.zeros_like(x), -z * x).sum() / N).item()


def _call(fn, op: str, scale, bias):
    if op == "clip_loss":
        return fn(Q, Q, scale)
    if op == "sigmoid_loss":
        return fn(Q, K, scale, bias, label_offset=OFFSET)
    return fn(Q, K, scale, label_offset=OFFSET)


PATHS = {
    "fallback": lambda op: getattr(reference, f"{op}_reference"),
    "kernels": lambda op: getattr(kernels, op),
}
NUMBERS = {
    "numpy_float64": np.float64,
    "numpy_0d_array": np.array,  # e.g. np.load("run.npz")["logit_bias"]
    "fraction": lambda v: Fraction(v).limit_denominator(),
    "decimal": lambda v: Decimal(str(v)),
}


@pytest.mark.parametrize("number", NUMBERS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["contrastive_ce", "clip_loss", "sigmoid_loss"])
def test_every_number_type_gives_the_same_float32_loss_on_both_paths(op, path, number):
    if path == "kernels" and not interpreting():
        pytest.skip("needs the Triton interpreter")
    as_number = NUMBERS[number]
    loss = _call(PATHS[path](op), op, as_number(SCALE), as_number(BIAS))
    assert loss.dtype == torch.float32, f"{path} returned {loss.dtype} for a {number} scale/bias"
    want = _oracle(op, SCALE, BIAS)
    assert abs(loss.item() - want) <= 1e-5 * abs(want) + 1e-6, (loss.item(), want)


BAD_SCALARS = [
    (op, scale, bias, name)
    for op in ("contrastive_ce", "clip_loss", "sigmoid_loss")
    for scale, bias, name in [
        ("7", BIAS, "logit_scale"),  # e.g. a quoted YAML value
        (torch.tensor(7 + 1j), BIAS, "logit_scale"),
        (SCALE, b"-2", "logit_bias"),
    ]
    if op == "sigmoid_loss" or name == "logit_scale"
]


@pytest.mark.parametrize("op,scale,bias,name", BAD_SCALARS)
@pytest.mark.parametrize("path", PATHS)
def test_a_string_or_complex_scale_is_refused_on_both_paths(op, path, scale, bias, name):
    if path == "kernels" and not interpreting():
        pytest.skip("needs the Triton interpreter")
    with pytest.raises(ValueError, match=f"^{name} must be a (real )?number"):
        _call(PATHS[path](op), op, scale, bias)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("op", ["contrastive_ce", "clip_loss", "sigmoid_loss"])
def test_features_that_are_not_tensors_are_one_clear_error(op, path):
    fn = PATHS[path](op)
    first, second = ("image_features", "text_features") if op == "clip_loss" else ("queries", "keys")
    extra = (SCALE, BIAS) if op == "sigmoid_loss" else (SCALE,)
    with pytest.raises(ValueError, match=f"^{first} must be a torch.Tensor .* got ndarray"):
        fn(Q.numpy(), Q if op == "clip_loss" else K, *extra)
    with pytest.raises(ValueError, match=f"^{second} must be a torch.Tensor .* got list"):
        fn(Q, (Q if op == "clip_loss" else K).tolist(), *extra)
