"""Review of the kernel ops (sixteenth round): a logit scale or bias on another device than the
features. The torch reference, which the public ops run for CPU features on a GPU machine (an eval
loop's cached CPU features with the model's CUDA ``logit_scale``), failed inside the logits'
product with torch's "Expected all tensors to be on the same device" (or, for a meta tensor, "Tensor
on device cpu is not on the expected device meta!"), naming neither the argument nor the fix. It is
now one ValueError line naming the argument, both devices and the ``.to`` that fixes it. A CPU
scale or bias stays accepted beside features anywhere (torch takes a CPU scalar with any device).

A ``meta`` tensor stands in for the second device (no GPU here). Expected runtime: ~2 s.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from kernels import reference

N, M, D = 3, 5, 8


def call(op, features_device, scale, bias):
    """``op``'s reference on features on ``features_device`` (queries [N, D], keys [M, D]; clip:
    both [N, D]), with ``scale`` and (sigmoid only) ``bias``."""
    q = torch.randn(N, D, device=features_device)
    if op == "clip_loss":
        return reference.clip_loss_reference(q, torch.randn(N, D, device=features_device), scale)
    k = torch.randn(M, D, device=features_device)
    if op == "contrastive_ce":
        return reference.contrastive_ce_reference(q, k, scale, label_offset=1)
    return reference.sigmoid_loss_reference(q, k, scale, bias, label_offset=1)


ELSEWHERE = torch.tensor(10.0, device="meta")
CASES = {  # (op, the argument placed elsewhere)
    "contrastive_ce scale": ("contrastive_ce", "logit_scale"),
    "clip_loss scale": ("clip_loss", "logit_scale"),
    "sigmoid_loss scale": ("sigmoid_loss", "logit_scale"),
    "sigmoid_loss bias": ("sigmoid_loss", "logit_bias"),
}


@pytest.mark.parametrize("case", CASES)
def test_a_scale_or_bias_on_another_device_is_one_line_saying_to_move_it(case):
    op, name = CASES[case]
    scale, bias = (ELSEWHERE, -10.0) if name == "logit_scale" else (10.0, ELSEWHERE)
    with pytest.raises(ValueError, match=f"^{name} is on meta but the features are on cpu") as info:
        call(op, "cpu", scale, bias)
    message = str(info.value)
    assert f"{name}.to(features.device)" in message and "\n" not in message, message


def test_a_cpu_scale_and_bias_stay_accepted_beside_features_on_another_device():
    # A [1] CPU parameter (its 0-dim form) beside features elsewhere is a scalar to torch.
    scale, bias = torch.tensor([10.0]), torch.tensor([[-10.0]])
    loss = call("sigmoid_loss", "meta", scale, bias)
    assert loss.device.type == "meta" and loss.shape == ()
    assert call("contrastive_ce", "meta", scale, None).device.type == "meta"


def test_a_cpu_scale_with_cpu_features_still_gets_its_gradient():
    scale = torch.tensor([10.0], requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    call("sigmoid_loss", "cpu", scale, bias).backward()
    assert scale.grad.shape == (1,) and bias.grad.shape == ()
    assert torch.isfinite(scale.grad).all() and torch.isfinite(bias.grad).all()
