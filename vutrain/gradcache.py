"""GradCache: gradient accumulation that keeps every negative of the whole step.

Plain accumulation over k micro-batches computes k separate contrastive losses, each seeing
only one micro-batch (x world) of negatives. GradCache (Gao et al., 2021) gets the loss of the
whole step - k x micro-batch x world samples - at the memory of one micro-batch:

1. forward every micro-batch without autograd, keep only the features (and the RNG state
   before each forward);
2. concatenate the features, compute the loss of the whole step (gathered across ranks as
   usual) and its gradient with respect to the features ("the cache");
3. forward each micro-batch again with autograd, replaying its RNG state so dropout draws the
   same masks, and backpropagate `sum(features * cached_gradient)`; parameter gradients
   accumulate to exactly those of the whole-step loss.

DeepSpeed: the engine is configured with `gradient_accumulation_steps = k` (the trainer's
`train.grad_accum_steps`) and every micro-batch goes through `engine.backward(...,
scale_wrt_gas=False)` (the cached gradients already belong to one loss, so no 1/k) and
`engine.step()`, so the engine's own micro-step counter places the accumulation boundary: ZeRO-1
reduces there, ZeRO-2/3 reduce-scatter each backward and the optimizer steps once, at the k-th
micro-batch. Gradient clipping and loss scaling apply to the whole step as usual; under fp16
phase 2 also scales its loss by the engine's loss scale, so that the cached feature gradients do
not underflow before phase 3 hands them (unscaled, in fp32) to the engine's scaled backward.

The logit scale (and bias) are outputs of every forward but one quantity of the step: their
cached gradient is applied once, in the first micro-batch's backward.

A locked tower (`locked="image"|"text"`: model.lock_image / lock_text, weights without gradient)
is forwarded once per micro-batch, not twice: phase 1 runs the towers in separate calls, in the
order the model's forward runs them (TOWERS), keeping the RNG state before the trainable one;
phase 3 replays only the trainable tower from that state and reuses the locked tower's phase-1
features, which are what its replay would compute. The gradients are bit-identical to replaying
both towers (the trainable tower draws the same dropout masks either way).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Outputs = tuple  # (image_features [b, E], text_features [b, E], logit_scale [], logit_bias [] | None)
TOWERS = ("image", "text")
"""The towers in the order the model's forward runs them (ClipTrainModule.forward: image, then text)."""


@dataclass
class RngState:
    """The RNG state dropout reads: torch's CPU generator and, when initialised, every CUDA device's."""

    cpu: torch.Tensor
    cuda: list[torch.Tensor] | None

    @classmethod
    def capture(cls) -> RngState:
        """Snapshot of the current RNG state."""
        cuda_live = torch.cuda.is_available() and torch.cuda.is_initialized()
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda_live else None)

    def restore(self) -> None:
        """Put the generators back to this snapshot."""
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class GradCache:
    """One GradCache step in two phases, so a caller can look at the loss before any backward.

        gc = GradCache(engine, forward_fn, loss_fn)
        loss = gc.forward(micro_batches)      # no autograd through the model; the loss of the step
        if finite(loss): gc.backward()        # k forwards with autograd, k engine.backward + step

    Args:
        engine: a DeepSpeed engine with `gradient_accumulation_steps() == len(micro_batches)`
            (anything with backward(loss, scale_wrt_gas=...) and step() also works).
        forward_fn: micro-batch -> (image_features [b, E], text_features [b, E], logit_scale,
            logit_bias or None), with autograd as the caller set it (the model's forward).
        loss_fn: (image_features [k*b, E], text_features [k*b, E], logit_scale, logit_bias) ->
            scalar loss of this rank on the whole step (e.g. a ClipLoss; close over the labels).
        locked: "image" or "text", a tower that gets no gradient (its weights frozen), or None.
            With it, forward_fn must also take `towers=(name,)`, run only that tower and return
            None for the other's features; the locked tower then runs once per micro-batch.
            Naming a tower whose parameters still train is a ValueError here (it would get no
            gradient); a frozen tower left unnamed is correct, only forwarded twice per micro-batch.
    """

    def __init__(
        self,
        engine: Any,
        forward_fn: Callable[..., Outputs],
        loss_fn: Callable[..., torch.Tensor],
        locked: str | None = None,
    ) -> None:
        if locked not in (None, *TOWERS):
            raise ValueError(f"GradCache(locked={locked!r}): use None, 'image' or 'text'")
        refuse_trainable_locked_tower(engine, locked)
        self.engine, self.forward_fn, self.loss_fn, self.locked = engine, forward_fn, loss_fn, locked
        self._batches: Sequence[Any] = ()
        self._rng: list[RngState] = []
        self._locked_features: list[torch.Tensor] = []
        self._grads: list[torch.Tensor | None] = []
        self._sizes: list[int] = []

    def forward(self, micro_batches: Iterable[Any]) -> torch.Tensor:
        """Phases 1 and 2: features without autograd, the step's loss and its feature gradients."""
        # A generator or zip() would be spent by phase 1: phase 3 then replayed nothing, and the
        # step ran no backward and no engine.step() without a word (or len() raised a TypeError).
        micro_batches = list(micro_batches)
        if not micro_batches:
            raise ValueError("GradCache.forward got no micro-batches; pass a list of at least one")
        gas = getattr(self.engine, "gradient_accumulation_steps", None)
        if callable(gas) and gas() != len(micro_batches):
            raise ValueError(
                f"GradCache got {len(micro_batches)} micro-batches but the engine accumulates "
                f"{gas()} per step; set gradient_accumulation_steps to the micro-batch count"
            )
        self._batches, self._rng = micro_batches, []
        images, texts, scale, bias = [], [], None, None
        with torch.no_grad():
            for batch in micro_batches:
                img, txt, scale, bias = self._first_pass(batch)
                # Copies: a model under CUDA graphs (train.compile_mode=reduce-overhead) replays
                # each no-grad call into the same static outputs; kept as they are, every entry
                # would hold the last micro-batch's features. scale/bias: only the last is used.
                images.append(img.clone())
                texts.append(txt.clone())
        self._rng_after = RngState.capture()
        self._locked_features = {"image": images, "text": texts}.get(self.locked, [])
        self._sizes = [x.shape[0] for x in images]
        leaves = [torch.cat(images), torch.cat(texts), scale, bias]
        leaves = [None if x is None else x.detach().requires_grad_(True) for x in leaves]
        loss_scale = engine_loss_scale(self.engine)
        with torch.enable_grad():
            loss = self.loss_fn(*leaves)
            # fp16 features (the loss kernels take them as they are): their gradient, ~1/(k*b*world)
            # per element, is fp16 too and flushed to 0 below 6e-8 when taken unscaled; plain
            # accumulation's engine.backward scales the loss first. Scaled here the same way, then
            # kept unscaled in fp32, which phase 3 feeds to the engine's own scaled backward.
            (loss if _is_one(loss_scale) else loss * loss_scale).backward()
        self._grads = [
            None if x is None or x.grad is None else _at_least_fp32(x.grad) / loss_scale for x in leaves
        ]
        return loss.detach()

    def _first_pass(self, batch: Any) -> Outputs:
        """One micro-batch's no-grad outputs; keeps the RNG state its replay must start from."""
        if self.locked is None:
            self._rng.append(RngState.capture())
            return self.forward_fn(batch)
        # One call per tower, in the model's order, so that each draws the dropout masks it draws
        # in one call; the state kept is the one before the trainable tower (after the locked one
        # when that runs first), the only tower phase 3 runs again.
        outputs = {}
        for tower in TOWERS:
            if tower != self.locked:
                self._rng.append(RngState.capture())
            outputs[tower] = self.forward_fn(batch, towers=(tower,))
        scale, bias = outputs[self._trainable()][2:]
        return outputs["image"][0], outputs["text"][1], scale, bias

    def _trainable(self) -> str:
        return next(tower for tower in TOWERS if tower != self.locked)

    def _replay(self, i: int, batch: Any) -> Outputs:
        """Micro-batch i with autograd: both towers, or the trainable one beside the locked one's cache."""
        self._rng[i].restore()
        if self.locked is None:
            return self.forward_fn(batch)
        img, txt, scale, bias = self.forward_fn(batch, towers=(self._trainable(),))
        cached = self._locked_features[i]
        return (cached, txt, scale, bias) if self.locked == "image" else (img, cached, scale, bias)

    def backward(self) -> None:
        """Phase 3: each micro-batch again with autograd and its RNG replayed; engine backward + step."""
        if not self._grads:  # said plainly, not "not enough values to unpack (expected 4, got 0)"
            raise RuntimeError(
                "GradCache.backward() needs a forward(micro_batches) first, and each forward allows "
                "one backward: call forward, then backward, once per step"
            )
        g_img, g_txt, g_scale, g_bias = self._grads
        start = 0
        for i, (batch, size) in enumerate(zip(self._batches, self._sizes)):
            img, txt, scale, bias = self._replay(i, batch)
            rows = slice(start, start + size)
            start += size
            # In fp32 (or wider): the unscaled cached gradient in fp16 would underflow again; the engine's
            # loss scale multiplies it before the backward casts it to the features' dtype. A locked
            # tower's cached features (no autograd) add a constant, which changes no gradient.
            surrogate = (_at_least_fp32(img) * g_img[rows]).sum() + (_at_least_fp32(txt) * g_txt[rows]).sum()
            if i == 0:  # the scale and bias are one quantity of the step: their gradient once
                # None when the loss ignores the scale (align_uniform): nothing to replay.
                if g_scale is not None:
                    surrogate = surrogate + (_at_least_fp32(scale) * g_scale).sum()
                if bias is not None and g_bias is not None:
                    surrogate = surrogate + (_at_least_fp32(bias) * g_bias).sum()
            self.engine.backward(surrogate, scale_wrt_gas=False)
            self.engine.step()
        self._rng_after.restore()  # the RNG advances as if each micro-batch ran forward once
        self._batches, self._grads, self._rng, self._locked_features = (), [], [], []


LOCK_SETTING = {"image": "model.lock_image", "text": "model.lock_text"}
MODEL_TOWER = {"image": "vision", "text": "text"}  # GradCache's tower names -> vutrain.model's


def refuse_trainable_locked_tower(engine: Any, locked: str | None) -> None:
    """Raise a one-line ValueError when `locked` names a tower of the engine's model that still has
    trainable parameters: phase 3 reuses that tower's no-grad features, so it would silently get no
    gradient while the optimizer still steps it (weight decay). Checked where the model is known
    (a DeepSpeed engine's `module`, or the engine itself as an nn.Module) and its towers carry
    CLIP's module names (vutrain.model.TOWER_PREFIXES); any other model is taken as given."""
    model = getattr(engine, "module", engine)
    if locked is None or not isinstance(model, torch.nn.Module):
        return
    from vutrain.model import TOWER_PREFIXES

    # Anywhere in the name: the CLIPModel sits inside ClipTrainModule ("clip.") and peft's wrapper.
    marks = tuple("." + prefix for prefix in TOWER_PREFIXES[MODEL_TOWER[locked]])
    in_tower = (n for n, p in model.named_parameters() if p.requires_grad)
    trainable = [n for n in in_tower if any(m in "." + n for m in marks)]
    if trainable:
        raise ValueError(
            f"GradCache(locked={locked!r}): the {locked} tower has {len(trainable)} trainable parameter "
            f"tensor(s) (first: {trainable[0]}) that would get no gradient; freeze the tower "
            f"({LOCK_SETTING[locked]}=true, or requires_grad_(False) on its parameters) or pass locked=None"
        )


def engine_loss_scale(engine: Any) -> float | torch.Tensor:
    """The loss scale the engine's backward multiplies the loss by: DeepSpeed's fp16 optimizers
    (ZeRO-0 to 3) expose it as `optimizer.loss_scale`; 1 without one (fp32, bf16, a plain engine)."""
    scale = getattr(getattr(engine, "optimizer", None), "loss_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.detach().float()
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and 0 < scale < float("inf"):
        return float(scale)
    return 1.0


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """16-bit tensors as fp32; fp32 and fp64 as they are (an fp64 model keeps its precision)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _is_one(scale: float | torch.Tensor) -> bool:
    return isinstance(scale, float) and scale == 1.0


def gradcache_step(
    engine: Any,
    micro_batches: Iterable[Any],
    forward_fn: Callable[..., Outputs],
    loss_fn: Callable[..., torch.Tensor],
    locked: str | None = None,
) -> torch.Tensor:
    """One optimizer step over `micro_batches` whose loss sees all of their samples as negatives.

    Returns this rank's (detached) loss of the whole step. See `GradCache` for the arguments;
    the engine must accumulate `len(micro_batches)` micro-batches per step.
    """
    cache = GradCache(engine, forward_fn, loss_fn, locked)
    loss = cache.forward(micro_batches)
    cache.backward()
    return loss
