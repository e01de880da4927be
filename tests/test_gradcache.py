"""GradCache on real DeepSpeed engines, world 2 (gloo, CPU), fp32, ZeRO 1, 2 and 3.

Criterion: with k micro-batches of B/k per rank, `gradcache_step` gives the same per-step losses
and the same parameters after several optimizer steps as one micro-batch of B (1e-5), because
its loss sees every sample of the step as a negative. With dropout on, its replayed second
forward draws the same masks as the first: it matches a (B x 1) engine whose forward runs the
same k chunks in sequence, and it does NOT match once the replay is switched off (so the
replay is what the test measures). One spawn for everything; ~30-60 s on 2 CPU cores.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers_dist import run_distributed

B, K, STEPS, IN, HID, OUT = 8, 4, 3, 12, 16, 8


class TwoTower(nn.Module):
    """A tiny image/text model with the trainer's output contract (features, scale, bias)."""

    def __init__(self, dropout: float = 0.0, chunks: int = 1):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Dropout(dropout), nn.Linear(HID, OUT))
        self.text = nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Dropout(dropout), nn.Linear(HID, OUT))
        self.logit_scale = nn.Parameter(torch.full([1], 2.0))  # 1-d: DeepSpeed broadcasts bytes
        self.chunks = chunks  # >1: run the batch as k sequential chunks (the dropout reference)

    def forward(self, x_img, x_txt):
        # chunk by chunk, image then text: the RNG order of k separate forwards
        chunks = zip(x_img.chunk(self.chunks), x_txt.chunk(self.chunks))
        pairs = [(self.image(i), self.text(t)) for i, t in chunks]
        img, txt = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1), self.logit_scale.exp().reshape(()), None


def _data(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(B, IN, generator=g), torch.randn(B, IN, generator=g)


def _train(rank, world, stage, mode, dropout=0.0, replay=True):
    import deepspeed

    from vutrain import gradcache
    from vutrain.losses import ClipLoss

    torch.manual_seed(0)
    gc = mode == "gradcache"
    model = TwoTower(dropout, chunks=K if mode == "chunked" else 1)
    micro, gas = (B // K, K) if gc else (B, 1)
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, config=config, optimizer=torch.optim.AdamW(model.parameters(), lr=0.05)
    )
    loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
    saved_restore = gradcache.RngState.restore
    if not replay:
        gradcache.RngState.restore = lambda self: None
    losses = []
    try:
        for step in range(STEPS):
            x_img, x_txt = _data(step, rank)
            torch.manual_seed(100 + step)
            if gc:
                micro_batches = list(zip(x_img.chunk(K), x_txt.chunk(K)))
                loss = gradcache.gradcache_step(
                    engine, micro_batches, lambda mb: engine(*mb), lambda i, t, s, b: loss_fn(i, t, s, b)
                )
            else:
                img, txt, scale, bias = engine(x_img, x_txt)
                loss = loss_fn(img, txt, scale, bias)
                engine.backward(loss)
                engine.step()
            losses.append(loss.item())
    finally:
        gradcache.RngState.restore = saved_restore
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):  # ZeRO-3: full tensors
        state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    return torch.tensor(losses), state


def _worker(rank, world):
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in (1, 2, 3):
        for mode in ("plain", "gradcache"):
            out[(stage, mode)] = _train(rank, world, stage, mode)
    out["dropout_chunked"] = _train(rank, world, 2, "chunked", dropout=0.3)
    out["dropout_gradcache"] = _train(rank, world, 2, "gradcache", dropout=0.3)
    out["dropout_no_replay"] = _train(rank, world, 2, "gradcache", dropout=0.3, replay=False)
    return out


@functools.cache
def results():
    return run_distributed(_worker, 2, init_process_group=False, timeout_s=300)


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradcache_equals_one_big_micro_batch(stage):
    for rank_result in results():
        plain, cached = rank_result[(stage, "plain")], rank_result[(stage, "gradcache")]
        _assert_same(cached, plain)
        assert not torch.equal(plain[1]["logit_scale"], torch.full([1], 2.0))  # it trained
    # same parameters on both ranks (data parallel)
    for name, value in results()[0][(stage, "gradcache")][1].items():
        torch.testing.assert_close(value, results()[1][(stage, "gradcache")][1][name], rtol=0, atol=0)


@pytest.mark.slow
def test_gradcache_replays_dropout():
    for rank_result in results():
        _assert_same(rank_result["dropout_gradcache"], rank_result["dropout_chunked"])
        no_replay, ref = rank_result["dropout_no_replay"], rank_result["dropout_chunked"]
        assert not torch.allclose(no_replay[1]["image.0.weight"], ref[1]["image.0.weight"], atol=1e-5)


def test_engine_must_accumulate_the_micro_batch_count():
    from vutrain.gradcache import GradCache

    class Engine:
        def gradient_accumulation_steps(self):
            return 2

    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        GradCache(Engine(), lambda b: b, lambda *a: a[0].sum()).forward([1, 2, 3])


class PlainEngine:
    """What GradCache asks of DeepSpeed: backward and step, no accumulation count."""

    def backward(self, loss, scale_wrt_gas=True):
        loss.backward()

    def step(self):
        pass


def test_backward_without_a_forward_says_so():
    """backward() before forward(), or twice after one forward, raised "not enough values to
    unpack (expected 4, got 0)" from inside GradCache."""
    from vutrain.gradcache import GradCache
    from vutrain.losses import ClipLoss

    torch.manual_seed(0)
    model = TwoTower()
    cache = GradCache(PlainEngine(), lambda mb: model(*mb), ClipLoss())
    with pytest.raises(RuntimeError, match=r"needs a forward\(micro_batches\) first"):
        cache.backward()
    x_img, x_txt = _data(0, 0)
    cache.forward(list(zip(x_img.chunk(K), x_txt.chunk(K))))
    cache.backward()
    with pytest.raises(RuntimeError, match="each forward allows one backward"):
        cache.backward()


@pytest.mark.slow
def test_trainer_gradcache_matches_one_big_micro_batch(synthetic_shards, tmp_path):
    """Through the trainer (deepspeed launcher, 2 ranks, ZeRO-2): micro 8 x 2 with
    train.accumulation=gradcache logs the same per-step losses as micro 16 x 1 (same samples per
    step with one loader worker). Plain accumulation would log the mean of two 8-sample losses."""
    import train_runner as tr

    runs = {}
    for name, micro, accum in (("gradcache", 8, 2), ("big", 16, 1)):
        run_dir = str(tmp_path / name)
        proc = tr.run(
            "deepspeed",
            tr.base_overrides(
                synthetic_shards,
                run_dir,
                3,
                data__val_shards="",
                train__micro_batch_size=micro,
                train__grad_accum_steps=accum,
                train__accumulation="gradcache",
            ),
        )
        assert proc.returncode == 0, tr.describe(proc)
        runs[name] = tr.losses(run_dir)
    assert sorted(runs["gradcache"]) == [1, 2, 3]
    for step, value in runs["big"].items():
        assert runs["gradcache"][step] == pytest.approx(value, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradcache_with_lora_and_gradient_checkpointing_on_the_clip_preset(backend):
    """The tiny HF CLIP with LoRA and gradient checkpointing (one process): 2 x 4 GradCache gives
    the trainable parameters the gradients of one micro-batch of 8, within 1e-5 (fp32), with the
    torch loss and with the Triton kernels (the interpreter on CPU)."""
    from vutrain.config import LoraConfig, ModelConfig
    from vutrain.gradcache import gradcache_step
    from vutrain.gradcache_bench import _Tokenizer
    from vutrain.losses import ClipLoss
    from vutrain.model import build_model

    class GradsOnly:  # backward without an optimizer step, so the gradients can be compared
        def __init__(self, module, k):
            self.module, self.k = module, k

        def gradient_accumulation_steps(self):
            return self.k

        def backward(self, loss, scale_wrt_gas=True):
            (loss / self.k if scale_wrt_gas else loss).backward()

        def step(self):
            pass

    cfg = ModelConfig(preset="tiny", gradient_checkpointing=True, lora=LoraConfig(enabled=True, r=4))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(8, 3, 64, 64, generator=g)
    ids = torch.randint(4, 1000, (8, 12), generator=g)
    ids[:, -1] = 1
    mask = torch.ones_like(ids)
    loss_fn = ClipLoss(backend=backend)
    grads = {}
    for name, k in (("plain", 1), ("gradcache", 2)):
        torch.manual_seed(0)
        module = build_model(cfg, _Tokenizer()).train()
        engine = GradsOnly(module, k)
        if k == 1:
            loss = loss_fn(*module(pixels, ids, mask)[:3])
            engine.backward(loss)
        else:
            batches = list(zip(pixels.chunk(k), ids.chunk(k), mask.chunk(k)))
            loss = gradcache_step(engine, batches, lambda b: module(*b), lambda i, t, s, _: loss_fn(i, t, s))
        grads[name] = (
            loss.detach(),
            {
                n: p.grad.clone()
                for n, p in module.named_parameters()
                if p.requires_grad and p.grad is not None
            },
        )
    torch.testing.assert_close(grads["gradcache"][0], grads["plain"][0], rtol=1e-5, atol=1e-5)
    assert any("lora" in n for n in grads["plain"][1])
    assert grads["plain"][1].keys() == grads["gradcache"][1].keys()
    for n, value in grads["plain"][1].items():
        torch.testing.assert_close(grads["gradcache"][1][n], value, rtol=1e-4, atol=1e-6, msg=n)


def test_gradcache_with_a_loss_that_ignores_the_logit_scale():
    """align_uniform never reads the logit scale, so the step's loss leaves no gradient on it;
    the replayed backward must skip it (it crashed on `None.to`) and still match one big batch."""
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import AlignUniformLoss

    torch.manual_seed(0)
    model, loss_fn = TwoTower(), AlignUniformLoss()
    x_img, x_txt = _data(0, 0)
    micro_batches = list(zip(x_img.chunk(K), x_txt.chunk(K)))
    loss = gradcache_step(PlainEngine(), micro_batches, lambda mb: model(*mb), loss_fn)
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    want = loss_fn(*model(x_img, x_txt))
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    assert model.logit_scale.grad is None and "logit_scale" not in cached
    for name, param in model.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(cached[name], param.grad, msg=name)


class StaticOutputs(nn.Module):
    """A model whose no-grad calls write into the same output tensors each time: what a CUDA-graph
    replay (torch.compile mode reduce-overhead, `train.compile_scope=model`) hands back."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.out = model, None

    def forward(self, *inputs):
        outputs = self.model(*inputs)
        if torch.is_grad_enabled():
            return outputs
        if self.out is None:
            self.out = [x.clone() for x in outputs[:3]]
        for static, x in zip(self.out, outputs[:3]):
            static.copy_(x)
        return (*self.out, None)


def test_gradcache_keeps_its_own_copy_of_each_micro_batch_s_features():
    """Phase 1 kept the forward's output tensors: with outputs in static memory every kept entry
    became the last micro-batch's features, and the step's loss and gradients were wrong."""
    from vutrain.gradcache import gradcache_step
    from vutrain.losses import ClipLoss

    torch.manual_seed(0)
    model, loss_fn = StaticOutputs(TwoTower()), ClipLoss()
    x_img, x_txt = _data(0, 0)
    micro_batches = list(zip(x_img.chunk(K), x_txt.chunk(K)))
    loss = gradcache_step(PlainEngine(), micro_batches, lambda mb: model(*mb), loss_fn)
    with torch.no_grad():
        want = loss_fn(*model.model(x_img, x_txt))
    torch.testing.assert_close(loss, want)
