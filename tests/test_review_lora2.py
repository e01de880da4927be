"""Second LoRA review: with gradient checkpointing, a locked tower is no longer recomputed and
back-propagated every step (transformers and peft hook its embeddings to require grad, which only
reentrant checkpointing needs); LoRA's forward is peft's W x + (alpha / r) B A x with dropout in
training only, and the export's merge gives the eval-mode features to fp32 tolerance."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from vutrain.config import LoraConfig, ModelConfig
from vutrain.export import to_hf_clip
from vutrain.model import build_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 64, 64, generator=gen), torch.randint(3, 50, (4, 32), generator=gen)


def _step(tokenizer, locked: str, lora: bool, checkpointing: bool):
    """(trainable gradients, whether the locked tower's features require grad, backward calls of
    one of its layers) after one forward and backward in training mode."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="tiny", gradient_checkpointing=checkpointing, lora=LoraConfig(enabled=lora, r=4, alpha=8)
    )
    setattr(cfg, f"lock_{locked}", True)
    module = build_model(cfg, tokenizer).train()
    tower = module.base.vision_model if locked == "image" else module.base.text_model
    calls = []
    tower.encoder.layers[1].mlp.register_full_backward_hook(lambda *args: calls.append(1))
    img, txt, scale, _ = module(*_batch())
    (scale * img @ txt.T).logsumexp(1).mean().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    return grads, (img if locked == "image" else txt).requires_grad, len(calls)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("locked", ["image", "text"])
def test_locked_tower_is_not_backpropagated_with_gradient_checkpointing(tokenizer, locked, lora):
    """Before: with gradient checkpointing the locked tower's features required grad and its
    layers ran backward every step (a LiT's ViT recomputed and back-propagated for no gradient:
    a ViT-B/32 step on CPU took about 1.7x as long); without checkpointing they never did. The
    trainable gradients are the same either way."""
    plain, plain_requires, plain_calls = _step(tokenizer, locked, lora, checkpointing=False)
    grads, requires, calls = _step(tokenizer, locked, lora, checkpointing=True)
    assert not plain_requires and plain_calls == 0
    assert not requires, "the locked tower's features require grad under checkpointing"
    assert calls == 0, f"the locked tower ran backward {calls} time(s)"
    assert grads.keys() == plain.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_forward_scale_dropout_and_merge(tokenizer):
    """LoRA as peft defines it: q_proj(x) = W x + b + (alpha / r) B A x; dropout on the LoRA
    branch in training only; the export's merged CLIPModel gives the eval-mode features."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        preset="tiny",
        lora=LoraConfig(enabled=True, r=4, alpha=12, dropout=0.5, target_modules=["q_proj", "v_proj"]),
    )
    module = build_model(cfg, tokenizer)
    with torch.no_grad():  # B starts at zero: make the adapters matter
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    adapted = {n.rsplit(".", 1)[0] for n, _ in module.named_modules() if n.endswith("lora_A")}
    assert len(adapted) == 2 * 2 * 3  # q_proj and v_proj in every layer of both towers
    q = module.base.text_model.encoder.layers[0].self_attn.q_proj
    x = torch.randn(5, 128)
    by_hand = F.linear(x, q.base_layer.weight, q.base_layer.bias) + (12 / 4) * (
        x @ q.lora_A["default"].weight.T @ q.lora_B["default"].weight.T
    )
    module.eval()
    torch.testing.assert_close(q(x), by_hand, rtol=0, atol=1e-6)
    with torch.no_grad():
        first, again = module(*_batch()), module(*_batch())
        module.train()
        dropped = module(*_batch())
        module.eval()
        merged = to_hf_clip(copy.deepcopy(module)).eval()
        pixels, ids = _batch()
        image = F.normalize(merged.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(merged.get_text_features(input_ids=ids).pooler_output, dim=-1)
    assert torch.equal(first[0], again[0]) and not torch.allclose(first[0], dropped[0])
    torch.testing.assert_close(image, first[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(text, first[1], rtol=0, atol=1e-6)
