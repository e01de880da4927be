"""The set-up of the GradCache tests on the real tiny HF CLIP: the model (attention dropout on, seed
0), the micro-batches of 3, 1 and 2 rows, an engine that only accumulates gradients, and the
whole-step autograd reference GradCache must equal."""

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


def tiny_clip(
    dropout: float = 0.3, fp64: bool = False, lock: bool = False, build: dict | None = None, **config
) -> torch.nn.Module:
    """The tiny preset at 32 px (torch seed 0 before it is built), in train mode, every attention
    dropout set to `dropout`. `config`: further ModelConfig fields; `build`: further build_model
    arguments; `fp64`: in float64; `lock`: its towers locked as the trainer locks them (lock_towers)."""
    from vutrain.config import ModelConfig
    from vutrain.gradcache_bench import _Tokenizer
    from vutrain.model import build_model, lock_towers

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", image_size=32, **config)
    model = build_model(cfg, _Tokenizer(), **(build or {}))
    model = (model.double() if fp64 else model).train()
    if lock:
        lock_towers(model, cfg)
    for module in model.modules():  # HF's CLIPAttention keeps its attention dropout as a float
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = dropout
    return model


def tiny_rows(n: int, generator: torch.Generator, dtype: torch.dtype | None = None):
    """n rows of pixels [n, 3, 32, 32] (normal) and token ids [n, 12] (eos last), drawn from `generator`."""
    pixels = torch.randn(n, 3, 32, 32, generator=generator, dtype=dtype)
    ids = torch.randint(4, 1000, (n, 12), generator=generator)
    ids[:, -1] = 1  # eos
    return pixels, ids


def micro_batches(seed: int = 0, sizes=SIZES) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, ids) micro-batches of `sizes` rows, cut from one draw of sum(sizes) rows."""
    pixels, ids = tiny_rows(sum(sizes), torch.Generator().manual_seed(seed))
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    return [(pixels[a:b], ids[a:b]) for a, b in zip(bounds, bounds[1:])]


def whole_step_reference(model: torch.nn.Module, seed: int) -> tuple[torch.Tensor, dict]:
    """What GradCache of `micro_batches()` must give: `model` forwards each micro-batch once (torch
    seed `seed` first, so the dropout masks are the ones GradCache draws after the same seed), one
    ClipLoss over the concatenated whole-step features, autograd. Returns (the loss, detached;
    {name: gradient} of the parameters that got one)."""
    from vutrain.losses import ClipLoss

    torch.manual_seed(seed)
    outputs = [model(*b) for b in micro_batches()]
    img, txt = (torch.cat([o[i] for o in outputs]) for i in (0, 1))
    loss = ClipLoss()(img, txt, outputs[0][2], None)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
