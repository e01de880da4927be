"""GradCache on the real tiny HF CLIP where a serious user goes: LoRA (frozen base), attention
dropout on, micro-batches of 3, 1 and 2 rows (one of a single row, none dividing the batch),
multi-hot tag positives, SigLIP's learnt bias and the bounded logit scale, align_uniform, with
and without gradient checkpointing. Criterion: the loss and every trainable parameter's
gradient equal one forward/backward of the whole batch in fp64 (to 1e-12), the same dropout
masks drawn in both (each micro-batch's RNG state replayed). One process, a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from gradcache_models import SIZES, GradsOnly, tiny_clip, tiny_rows


def _inputs():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    pixels, ids = tiny_rows(n, g, torch.float64)
    tags = torch.rand(n, 5, generator=g) < 0.4
    return pixels, ids, torch.ones_like(ids), tags


def _model(use_bias: bool, checkpointing: bool, dropout: float):
    from vutrain.config import LoraConfig

    return tiny_clip(
        dropout,
        fp64=True,
        build={"use_bias": use_bias, "init_scale": 2.3},
        gradient_checkpointing=checkpointing,
        lora=LoraConfig(enabled=True, r=4),
    )


def _step(loss_name: str, mode: str, checkpointing: bool, dropout: float = 0.3):
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import AlignUniformLoss, ClipLoss, SigLipLoss

    loss_fn = {"clip": ClipLoss(), "siglip": SigLipLoss(), "align_uniform": AlignUniformLoss()}[loss_name]
    model = _model(loss_name == "siglip", checkpointing, dropout)
    pixels, ids, mask, tags = _inputs()
    labels = {} if loss_name == "align_uniform" else {"labels": tags}
    chunks = list(zip(pixels.split(SIZES), ids.split(SIZES), mask.split(SIZES)))
    torch.manual_seed(5)  # the dropout draws: the same stream in both modes
    if mode == "whole":  # micro-batch by micro-batch with autograd: the RNG order GradCache replays
        outs = [model(*chunk) for chunk in chunks]
        img, txt = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
        loss = loss_fn(img, txt, outs[0][2], outs[0][3], **labels)
        loss.backward()
    else:
        loss = gradcache_step(
            GradsOnly(len(SIZES)),
            chunks,
            lambda batch: model(*batch),
            lambda i, t, s, b: loss_fn(i, t, s, b, **labels),
        )
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, trainable


@pytest.mark.parametrize(
    "loss_name, checkpointing", [("clip", False), ("siglip", True), ("align_uniform", False)]
)
def test_gradcache_on_the_lora_clip_preset_equals_the_whole_batch(loss_name, checkpointing):
    want_loss, want, trainable = _step(loss_name, "whole", checkpointing)
    got_loss, got, _ = _step(loss_name, "gradcache", checkpointing)
    if loss_name == "clip":  # once: the dropout set here does draw masks
        no_dropout_loss = _step(loss_name, "whole", checkpointing, dropout=0.0)[0]
        assert not torch.allclose(no_dropout_loss, want_loss), "no dropout mask drawn: replay unchecked"
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-12, atol=1e-12)
    assert got.keys() == want.keys() and set(want) <= trainable
    assert any("lora_" in n for n in want) and not any("lora_" not in n and "logit" not in n for n in want)
    if loss_name != "align_uniform":  # align_uniform never reads the scale: no gradient there
        assert any("logit_scale" in n for n in want)
    if loss_name == "siglip":
        assert "logit_bias" in want
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12, msg=name)
