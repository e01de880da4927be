"""GradCache under fp16 loss scaling: the cached feature gradients must not underflow.

Criterion: with an fp16 model whose features reach the loss in fp16 (as the Triton loss kernels
take them under train.precision=fp16), and an engine that scales the loss by 2**16 before its
backward (DeepSpeed's fp16 optimizers: `optimizer.loss_scale`, initial_scale_power 16), a GradCache
step over k micro-batches leaves the fp16 parameters the same (unscaled) gradients as the engine's
plain backward of the whole batch, and the fp64 gradients to within fp16 rounding. The loss is
weighted so that its feature gradients are ~1e-8, what a large batch late in training gives: until
2026-12-06 phase 2 took them unscaled in fp16, where they flush to 0, and every parameter
gradient of the step was 0 (or a few subnormals) while plain accumulation trained. Under 2 s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vutrain.gradcache import GradCache, engine_loss_scale

B, K, IN, OUT = 8, 2, 6, 4
WEIGHT = 1e-6  # feature gradients ~1e-8: below fp16's smallest subnormal (6e-8) unscaled
LOSS_SCALE = 2.0**16


class TwoTower(nn.Module):
    """Linear towers with the trainer's output contract (features, scale, bias)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(IN, OUT).to(dtype)
        self.text = nn.Linear(IN, OUT).to(dtype)
        self.logit_scale = nn.Parameter(torch.full([], 2.0, dtype=dtype))

    def forward(self, batch):
        x_img, x_txt = batch
        img, txt = F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1)
        return img, txt, self.logit_scale.float().exp(), None


def clip_loss(img, txt, scale, bias):
    """Symmetric InfoNCE over every pair; the features stay in their dtype, the math is fp32
    or better (as the kernels accumulate), so the features' gradient has the features' dtype."""
    compute = torch.float64 if img.dtype == torch.float64 else torch.float32
    logits = scale.to(compute) * img.to(compute) @ txt.to(compute).T
    labels = torch.arange(img.shape[0])
    return WEIGHT * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


class LossScalingEngine:
    """DeepSpeed's fp16 backward contract: the loss times `optimizer.loss_scale`, gradients kept
    scaled in the 16-bit parameters' .grad until the step unscales them."""

    def __init__(self, module: nn.Module, scale: float):
        self.module, self.optimizer = module, type("FP16Optimizer", (), {"loss_scale": scale})()

    def backward(self, loss, scale_wrt_gas=True):
        (loss * self.optimizer.loss_scale).backward()

    def step(self):
        pass

    def unscaled_grads(self) -> dict[str, torch.Tensor]:
        scale = self.optimizer.loss_scale
        return {n: p.grad.double() / scale for n, p in self.module.named_parameters()}


def _batch(dtype):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, IN, generator=g).to(dtype), torch.randn(B, IN, generator=g).to(dtype)


def _gradcache_grads() -> dict[str, torch.Tensor]:
    model = TwoTower(torch.float16)
    engine = LossScalingEngine(model, LOSS_SCALE)
    x_img, x_txt = _batch(torch.float16)
    cache = GradCache(engine, model, clip_loss)
    cache.forward(list(zip(x_img.chunk(K), x_txt.chunk(K))))
    cache.backward()
    return engine.unscaled_grads()


def _plain_grads() -> dict[str, torch.Tensor]:
    model = TwoTower(torch.float16)
    engine = LossScalingEngine(model, LOSS_SCALE)
    engine.backward(clip_loss(*model(_batch(torch.float16))))
    return engine.unscaled_grads()


def _fp64_grads() -> dict[str, torch.Tensor]:
    model = TwoTower(torch.float16).double()  # the fp16 weights, exactly, in fp64
    img, txt, scale, bias = model(tuple(x.double() for x in _batch(torch.float16)))
    clip_loss(img, txt, scale.double(), bias).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def test_fp16_gradcache_keeps_the_feature_gradients_the_loss_scale_protects():
    """k fp16 micro-batches under a 2**16 loss scale: the parameter gradients of the whole-batch
    loss, as the plain scaled backward gets them (was: all 0, the cache underflowed)."""
    cached, plain, exact = _gradcache_grads(), _plain_grads(), _fp64_grads()
    for name, reference in exact.items():
        assert reference.abs().max() > 1e-9, name  # the step has a gradient to lose
        scale = reference.abs().max().item()
        torch.testing.assert_close(plain[name], reference, rtol=0, atol=2e-2 * scale, msg=name)
        torch.testing.assert_close(cached[name], reference, rtol=0, atol=2e-2 * scale, msg=name)


def test_engine_loss_scale_is_one_without_an_fp16_optimizer():
    """fp32/bf16 engines and plain engines: no scaling (the phase-2 loss is backpropagated as is)."""
    model = TwoTower(torch.float32)
    assert engine_loss_scale(object()) == 1.0
    assert engine_loss_scale(LossScalingEngine(model, 1.0)) == 1.0
    assert engine_loss_scale(LossScalingEngine(model, LOSS_SCALE)) == LOSS_SCALE
