"""GradCache with a tower locked the way the trainer locks it (`model.lock_image`: its weights
`requires_grad=False`, still in train mode, not under `torch.no_grad()`), on the real tiny HF CLIP
in fp32 with attention dropout, gradient checkpointing and micro-batches of 3, 1 and 2 rows.

Criterion: GradCache's loss and every trainable gradient (text tower, logit scale) equal one
loss over the concatenated whole-step features with autograd, the same dropout masks drawn (same
seed, one forward per micro-batch), to fp32 rounding; the locked tower gets no gradient; the RNG
ends where that reference leaves it. One process, a few seconds.
"""

from __future__ import annotations

import torch
from gradcache_models import SIZES, GradsOnly, micro_batches, tiny_clip, whole_step_reference


def _model():
    return tiny_clip(lock=True, gradient_checkpointing=True, lock_image=True)


def test_locked_image_tower_with_dropout_and_checkpointing_gives_the_whole_step_gradients():
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    model = _model()
    torch.manual_seed(5)
    loss = gradcache_step(GradsOnly(len(SIZES)), micro_batches(), lambda b: model(*b), ClipLoss())
    rng_after = torch.get_rng_state()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    expected_loss, expected = whole_step_reference(_model(), seed=5)

    assert torch.equal(rng_after, torch.get_rng_state())
    assert not any("vision" in k or "visual" in k for k in got), "the locked tower got a gradient"
    assert got.keys() == expected.keys() and any("logit_scale" in k for k in got)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
