"""GradCache's `locked` argument against the model's own frozen towers (the public class, as a
script with its own loop uses it), on the real tiny HF CLIP.

- `locked="image"` (or "text") on a model whose tower still has trainable parameters (no
  `model.lock_image`, or LoRA adapters in it) is one ValueError at construction that names the
  tower, its trainable tensors and the fix. Before: the step ran, that tower got no gradient and
  nothing said so.
- A tower that is frozen as `locked` says constructs and steps as before (the text tower trains).
- The engine's model is read from `engine.module` (a DeepSpeed engine's); an engine without one
  (tests/gradcache_models.py's GradsOnly) is taken as given.
"""

from __future__ import annotations

import pytest
import torch
from gradcache_models import SIZES, GradsOnly, micro_batches, tiny_clip

LOCK = {"image": "lock_image", "text": "lock_text"}


class EngineOf(GradsOnly):
    """GradsOnly with the `module` attribute a DeepSpeed engine has."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(len(SIZES))
        self.module = model


def _forward(model):
    """forward_fn as the trainer's: both towers, or those named in `towers` (the other is None)."""

    def forward(batch, towers=("image", "text")):
        pixels, ids = batch
        return model(pixels if "image" in towers else None, ids if "text" in towers else None)

    return forward


def _gradcache(model, locked):
    from vutrain.gradcache import GradCache
    from vutrain.losses import ClipLoss

    return GradCache(EngineOf(model), _forward(model), ClipLoss(), locked)


@pytest.mark.parametrize("locked", ["image", "text"])
def test_locking_a_trainable_tower_is_refused_in_one_line(locked):
    model = tiny_clip(dropout=0.0)  # both towers trainable
    with pytest.raises(ValueError) as raised:
        _gradcache(model, locked)
    message = str(raised.value)
    assert "\n" not in message
    assert f"the {locked} tower has" in message and "trainable" in message
    assert f"model.{LOCK[locked]}=true" in message and "locked=None" in message


def test_lora_adapters_in_the_locked_tower_are_refused():
    """LoRA freezes the base weights; its adapters in the image tower would still get no gradient."""
    from vutrain.config import LoraConfig

    model = tiny_clip(dropout=0.0, lora=LoraConfig(enabled=True, r=2))
    with pytest.raises(ValueError, match=r"the image tower has \d+ trainable .*lora"):
        _gradcache(model, "image")


@pytest.mark.parametrize("locked", ["image", "text"])
def test_a_frozen_locked_tower_steps_and_the_other_tower_trains(locked):
    model = tiny_clip(dropout=0.0, **{LOCK[locked]: True})  # build_model locks it
    cache = _gradcache(model, locked)
    assert torch.isfinite(cache.forward(micro_batches()))
    cache.backward()
    trained = {"image": "text_model.", "text": "vision_model."}[locked]
    got = [n for n, p in model.named_parameters() if p.grad is not None]
    assert any(trained in n for n in got)
    assert not any({"image": "vision_model.", "text": "text_model."}[locked] in n for n in got)


def test_an_engine_without_a_module_is_taken_as_given():
    from vutrain.gradcache import GradCache
    from vutrain.losses import ClipLoss

    model = tiny_clip(dropout=0.0)
    GradCache(GradsOnly(len(SIZES)), _forward(model), ClipLoss(), "image")  # no model to check
