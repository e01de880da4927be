"""GradCache fed by an iterator (a generator, `zip(...)`) instead of a list.

Criterion: `gradcache_step` over a generator of k micro-batches runs k backward + `engine.step()`
calls and leaves the parameters the fp64 gradients of one loss over the whole batch, as it does
for a list. Until 2026-12-06 phase 1 spent the iterator, phase 3 replayed nothing, and the step
returned its loss with no gradient and no optimizer step (a plain engine), or a DeepSpeed engine's
`len()` check raised a TypeError traceback. A real DeepSpeed engine (1 gloo rank, ZeRO-1, torch
AdamW) trains the same weights from `zip(...)` as from a list. No micro-batch at all is a
one-line ValueError. One spawn; about 10 s on 2 CPU cores.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_dist import run_distributed

B, K, IN, OUT = 6, 3, 5, 4


class TwoTower(nn.Module):
    """Linear towers with the trainer's output contract (features, scale, bias)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(IN, OUT, dtype=dtype)
        self.text = nn.Linear(IN, OUT, dtype=dtype)
        self.logit_scale = nn.Parameter(torch.full([1], 1.5, dtype=dtype))  # 1-d: DeepSpeed broadcasts

    def forward(self, x_img, x_txt):
        img, txt = F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1)
        return img, txt, self.logit_scale.exp().reshape(()), None


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    return torch.randn(B, IN, generator=g, dtype=dtype), torch.randn(B, IN, generator=g, dtype=dtype)


class CountingEngine:
    """What GradCache asks of an engine besides DeepSpeed's: backward and step, counted."""

    def __init__(self):
        self.backwards = self.steps = 0

    def backward(self, loss, scale_wrt_gas=True):
        self.backwards += 1
        loss.backward()

    def step(self):
        self.steps += 1


def test_gradcache_step_takes_a_generator_of_micro_batches():
    """k micro-batches from a generator: k backward + step calls, and the fp64 gradients of one
    loss over all B samples (was: 0 calls and no gradient at all)."""
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    x_img, x_txt = _inputs(torch.float64)
    loss_fn = ClipLoss()
    model = TwoTower(torch.float64)
    want = loss_fn(*model(x_img, x_txt)[:3])
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    engine = CountingEngine()
    micro_batches = (pair for pair in zip(x_img.chunk(K), x_txt.chunk(K)))
    loss = gradcache_step(engine, micro_batches, lambda mb: model(*mb), lambda i, t, s, _: loss_fn(i, t, s))

    assert (engine.backwards, engine.steps) == (K, K)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-12)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)


def test_gradcache_without_micro_batches_is_a_one_line_error():
    """An empty list (e.g. a loader that ran dry) says what to pass, not torch.cat's
    "expected a non-empty list of Tensors"."""
    from vutrain.gradcache import GradCache
    from vutrain.losses import ClipLoss

    model = TwoTower()
    cache = GradCache(CountingEngine(), lambda mb: model(*mb), ClipLoss())
    with pytest.raises(ValueError, match="no micro-batches; pass a list of at least one"):
        cache.forward([])


def _deepspeed_weights(rank, world):
    import deepspeed

    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    deepspeed.init_distributed(dist_backend="gloo")
    x_img, x_txt = _inputs()
    loss_fn = ClipLoss()
    out = {}
    for kind in ("list", "zip"):
        model = TwoTower()
        config = {
            "train_micro_batch_size_per_gpu": B // K,
            "gradient_accumulation_steps": K,
            "train_batch_size": B * world,
            "zero_optimization": {"stage": 1},
            "steps_per_print": 10**9,
            "zero_allow_untested_optimizer": True,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, optimizer=optimizer)
        for _ in range(2):
            pairs = zip(x_img.chunk(K), x_txt.chunk(K))
            micro_batches = list(pairs) if kind == "list" else pairs
            gradcache_step(engine, micro_batches, lambda mb: engine(*mb), lambda i, t, s, _: loss_fn(i, t, s))
        out[kind] = (
            engine.global_steps,
            {n: p.detach().clone() for n, p in engine.module.named_parameters()},
        )
    return out


def test_deepspeed_engine_trains_the_same_from_zip_as_from_a_list():
    """1 gloo rank, ZeRO-1, 2 steps of 3 micro-batches: the same weights and step count whether the
    micro-batches come as a list or as zip(...) (was: TypeError: object of type 'zip' has no len())."""
    (out,) = run_distributed(_deepspeed_weights, 1, init_process_group=False, timeout_s=120)
    steps, weights = out["zip"]
    assert steps == out["list"][0] == 2
    start = TwoTower().state_dict()
    for name, value in out["list"][1].items():
        assert not torch.equal(value, start[name]), name  # the optimizer did move it
        torch.testing.assert_close(weights[name], value, rtol=0, atol=0, msg=name)
