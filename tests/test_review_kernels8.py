"""Review of the kernels' Python surface: a logit scale or bias made under
``torch.inference_mode()`` is a constant, not a crash, on both paths; a boolean where
``label_offset``, ``logit_scale`` or ``logit_bias`` belongs is a one-line error, not 0 or 1."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
import numpy as np
import torch
import torch.nn.functional as F

from kernels import clip_loss, contrastive_ce, sigmoid_loss
from kernels.reference import clip_loss_reference, contrastive_ce_reference, sigmoid_loss_reference
from kernels.runtime import interpreting, use_triton

needs_interpreter = pytest.mark.skipif(
    not interpreting(), reason="needs TRITON_INTERPRET=1 before Triton's import"
)


def features(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1)


def inference_scalar(value: float) -> torch.Tensor:
    """A 0-dim fp32 tensor as an eval loop under inference mode leaves it (``scale.exp()``...)."""
    with torch.inference_mode():
        return torch.tensor(value)


def loss_and_grads(op, bias_is_inference: bool):
    """``op``'s loss and gradients in both towers and the scale, with a bias (sigmoid only) made
    under inference mode or not, and the scale as the trainer's parameter (requires grad)."""
    q, k = features(8).requires_grad_(), features(8, seed=1).requires_grad_()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = inference_scalar(-2.0) if bias_is_inference else torch.tensor(-2.0)
    loss = op(q, k, scale, bias)
    loss.backward()
    return loss.detach(), q.grad, k.grad, scale.grad


SIGMOID_OPS = {"kernel": sigmoid_loss, "reference": sigmoid_loss_reference}


@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_sigmoid_loss_takes_a_bias_made_under_inference_mode_as_a_constant(path):
    """A SigLIP bias computed (or cached) under ``torch.inference_mode()`` with features that require
    grad: the kernels failed with "Inference tensors cannot be saved for backward" (their fp32 copy of
    the bias is saved) where the reference, which only adds it, returned the loss. Both now give the
    loss and gradients of the same bias made normally."""
    if path == "kernel" and not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1 before Triton's import")
    op = SIGMOID_OPS[path]
    assert path == "reference" or use_triton(features(8), features(8))  # not the fallback
    got = loss_and_grads(op, bias_is_inference=True)
    want = loss_and_grads(op, bias_is_inference=False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def scale_ops():
    return {
        "clip_loss": (clip_loss, clip_loss_reference, lambda op, q, k, s: op(q, k, s)),
        "contrastive_ce": (contrastive_ce, contrastive_ce_reference, lambda op, q, k, s: op(q, k, s)),
        "sigmoid_loss": (sigmoid_loss, sigmoid_loss_reference, lambda op, q, k, s: op(q, k, s, -1.0)),
    }


@needs_interpreter
@pytest.mark.parametrize("name", ["clip_loss", "contrastive_ce", "sigmoid_loss"])
def test_a_scale_made_under_inference_mode_is_a_constant_on_both_paths(name):
    """A logit scale made under inference mode (it cannot require grad: a constant) with features that
    require grad: every op failed with "Inference tensors cannot be saved for backward", kernels and
    reference alike. Both now return the same loss and feature gradients as with a plain scale."""
    kernel, reference, call = scale_ops()[name]
    results = []
    for op in (kernel, reference):
        for scale in (inference_scalar(7.0), torch.tensor(7.0)):
            q, k = features(8).requires_grad_(), features(8, seed=2).requires_grad_()
            loss = call(op, q, k, scale)
            loss.backward()
            results.append((loss.detach(), q.grad, k.grad))
    for got in results[1:]:
        for g, w in zip(got, results[0]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_inference_mode_scale_leaves_the_callers_tensor_an_inference_tensor():
    """The copy is the ops' own: the caller's scale stays what it was, and under inference mode
    itself the ops still compute (nothing is saved there)."""
    scale = inference_scalar(5.0)
    q, k = features(8), features(8, seed=3)
    with torch.inference_mode():
        inside = clip_loss(q, k, scale)
    outside = clip_loss(q.requires_grad_(), k, scale)
    outside.backward()
    assert scale.is_inference()
    torch.testing.assert_close(inside, outside.detach(), rtol=0, atol=0)


BOOLS = [True, False, np.bool_(True), torch.tensor(True)]


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("flag", BOOLS, ids=repr)
def test_a_boolean_label_offset_is_a_one_line_error(path, flag):
    """``label_offset=True`` (a ``local_loss`` flag in the wrong place) was taken as 1 by both paths
    and shifted every label one column silently, while numpy's ``True`` was refused: every boolean
    is now the same one-line ValueError naming the argument."""
    ops = {
        "kernel": (contrastive_ce, sigmoid_loss),
        "reference": (contrastive_ce_reference, sigmoid_loss_reference),
    }[path]
    q, k = features(4), features(8, seed=4)
    with pytest.raises(ValueError, match="label_offset must be an integer.*boolean"):
        ops[0](q, k, 10.0, label_offset=flag)
    with pytest.raises(ValueError, match="label_offset must be an integer.*boolean"):
        ops[1](q, k, 10.0, -1.0, label_offset=flag)


@pytest.mark.parametrize("path", ["kernel", "reference"])
@pytest.mark.parametrize("flag", BOOLS, ids=repr)
def test_a_boolean_scale_or_bias_is_a_one_line_error(path, flag):
    """``logit_scale=True`` computed the loss at scale 1 (``float(True)``) on both paths; a boolean
    scale or bias is now a ValueError naming the argument, as a string or a [k] tensor already was."""
    clip, sigmoid = {
        "kernel": (clip_loss, sigmoid_loss),
        "reference": (clip_loss_reference, sigmoid_loss_reference),
    }[path]
    q, k = features(4), features(4, seed=5)
    with pytest.raises(ValueError, match="logit_scale must be .*boolean"):
        clip(q, k, flag)
    with pytest.raises(ValueError, match="logit_bias must be .*boolean"):
        sigmoid(q, k, 10.0, flag)


def test_integer_offsets_and_numeric_scales_still_pass():
    """The boolean check refuses only booleans: numpy and 0-dim tensor integers stay offsets, an
    integer tensor stays a scale."""
    q, k = features(4), features(8, seed=6)
    want = contrastive_ce_reference(q, k, 10.0, label_offset=1)
    for offset in (1, np.int64(1), torch.tensor(1)):
        torch.testing.assert_close(contrastive_ce(q, k, torch.tensor(10), label_offset=offset), want)
