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

SIZES = [3, 1, 2]


class GradsOnly:
    """engine.backward/step without an optimizer, so the accumulated gradients can be compared."""

    def __init__(self, k: int):
        self.k = k

    def gradient_accumulation_steps(self) -> int:
        return self.k

    def backward(self, loss, scale_wrt_gas=True):
        (loss / self.k if scale_wrt_gas else loss).backward()

    def step(self):
        pass


def _model():
    from vutrain.config import ModelConfig
    from vutrain.gradcache_bench import _Tokenizer
    from vutrain.model import build_model, lock_towers

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=32, gradient_checkpointing=True, lock_image=True)
    model = build_model(cfg, _Tokenizer()).train()
    lock_towers(model, cfg)
    for module in model.modules():  # HF's CLIPAttention keeps its attention dropout as a float
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.3
    return model


def _micro_batches():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    pixels = torch.randn(n, 3, 32, 32, generator=g)
    ids = torch.randint(4, 1000, (n, 12), generator=g)
    ids[:, -1] = 1  # eos
    bounds = torch.tensor([0, *SIZES]).cumsum(0).tolist()
    return [(pixels[a:b], ids[a:b]) for a, b in zip(bounds, bounds[1:])]


def test_locked_image_tower_with_dropout_and_checkpointing_gives_the_whole_step_gradients():
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    model = _model()
    torch.manual_seed(5)
    loss = gradcache_step(GradsOnly(len(SIZES)), _micro_batches(), lambda b: model(*b), ClipLoss())
    rng_after = torch.get_rng_state()
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}

    reference = _model()
    torch.manual_seed(5)
    outputs = [reference(*b) for b in _micro_batches()]
    img, txt = (torch.cat([o[i] for o in outputs]) for i in (0, 1))
    expected_loss = ClipLoss()(img, txt, outputs[0][2], None)
    expected_loss.backward()
    expected = {k: p.grad for k, p in reference.named_parameters() if p.grad is not None}

    assert torch.equal(rng_after, torch.get_rng_state())
    assert not any("vision" in k or "visual" in k for k in got), "the locked tower got a gradient"
    assert got.keys() == expected.keys() and any("logit_scale" in k for k in got)
    torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-6, atol=1e-6)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6, msg=name)
