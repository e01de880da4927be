"""Model construction: presets, LoRA, tower locking, gradient checkpointing, parameter groups."""

import math

import pytest
import torch

from vutrain.config import ModelConfig, TrainConfig
from vutrain.model import MAX_LOGIT_SCALE, PRESETS, build_model, preset_clip_config
from vutrain.optim import lr_lambda, no_decay, param_groups


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def batch(n=4, size=64, length=32):
    return (
        torch.randn(n, 3, size, size),
        torch.randint(3, 50, (n, length)),
        torch.ones(n, length, dtype=torch.long),
    )


def test_vit_presets_have_openai_shapes(tokenizer):
    cfg = preset_clip_config(ModelConfig(preset="vit-b-32"), tokenizer)
    assert (
        cfg.vision_config.hidden_size,
        cfg.vision_config.num_hidden_layers,
        cfg.vision_config.patch_size,
    ) == (768, 12, 32)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_attention_heads, cfg.projection_dim) == (
        512,
        8,
        512,
    )
    assert cfg.text_config.eos_token_id == tokenizer.eos_token_id
    assert PRESETS["vit-l-14"].patch_size == 14 and PRESETS["vit-b-16"].patch_size == 16


def test_preset_activation_defaults_to_hf_and_can_be_open_clips(tokenizer):
    """'' keeps HF CLIP's quick_gelu (what earlier runs of a preset trained with); gelu is exact
    GELU in both towers' MLPs (open_clip's models from scratch), one op where quick_gelu is three."""
    default = build_model(ModelConfig(preset="tiny"), tokenizer)
    gelu = build_model(ModelConfig(preset="tiny", hidden_act="gelu"), tokenizer)

    def acts(module):
        return {type(m).__name__ for n, m in module.named_modules() if n.endswith("activation_fn")}

    assert acts(default) == {"QuickGELUActivation"}
    assert acts(gelu) == {"GELUActivation"}
    x = torch.linspace(-3, 3, 7)
    mlp = next(m for n, m in gelu.named_modules() if n.endswith("activation_fn"))
    torch.testing.assert_close(mlp(x), torch.nn.functional.gelu(x))
    assert gelu.base.config.vision_config.hidden_act == gelu.base.config.text_config.hidden_act == "gelu"


def test_forward_returns_normalised_features_and_clamped_scale(tokenizer):
    module = build_model(ModelConfig(preset="tiny"), tokenizer)
    px, ids, mask = batch()
    img, txt, scale, bias = module(px, ids, mask)
    assert img.shape == txt.shape == (4, PRESETS["tiny"].embed_dim)
    assert torch.allclose(img.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-4) and bias is None
    module.base.logit_scale.data.fill_(10.0)
    assert module(px, ids, mask)[2].item() == pytest.approx(math.exp(MAX_LOGIT_SCALE))
    only_text = module(input_ids=ids, attention_mask=mask)
    assert only_text[0] is None and torch.allclose(only_text[1], txt, atol=1e-6)


def test_lora_all_linear_adapts_every_linear_layer(tokenizer):
    """`model.lora.target_modules=all-linear` (peft's special value) adapts every linear layer of
    both towers (it arrives as a one-element list, which peft looked up as a module name: error)."""
    cfg = ModelConfig(preset="tiny")
    cfg.lora.enabled, cfg.lora.target_modules = True, ["all-linear"]
    module = build_model(cfg, tokenizer)
    adapted = {n.split(".lora_A")[0] for n, _ in module.named_parameters() if ".lora_A" in n}
    for kind in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"):
        assert any(n.endswith(kind) and "vision_model" in n for n in adapted), kind
        assert any(n.endswith(kind) and "text_model" in n for n in adapted), kind


def test_lora_trains_adapters_and_logit_scale_only(tokenizer):
    cfg = ModelConfig(preset="tiny")
    cfg.lora.enabled = True
    module = build_model(cfg, tokenizer)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.endswith("logit_scale") for n in trainable)
    assert any("vision_model" in n for n in trainable) and any("text_model" in n for n in trainable)
    assert any(n.endswith("logit_scale") for n in trainable)


def test_lock_image_with_gradient_checkpointing(tokenizer):
    cfg = ModelConfig(preset="tiny", lock_image=True, gradient_checkpointing=True)
    module = build_model(cfg, tokenizer).train()
    assert not any(p.requires_grad for n, p in module.named_parameters() if "vision_model" in n)
    assert any(p.requires_grad for n, p in module.named_parameters() if "text_model" in n)
    img, txt, scale, _ = module(*batch())
    (scale * img @ txt.T).logsumexp(1).mean().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())


@pytest.mark.parametrize("locked,free", [("image", "text"), ("text", "image")])
def test_locked_tower_freezes_its_lora_adapters(tokenizer, locked, free):
    """LoRA + model.lock_<tower>: that tower's adapters are frozen; the other tower's train."""
    cfg = ModelConfig(preset="tiny", **{f"lock_{locked}": True})
    cfg.lora.enabled = True
    module = build_model(cfg, tokenizer)
    tower = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert not any(part in n for n in trainable for part in tower[locked]), trainable  # before: its lora_*
    assert any("lora_" in n and tower[free][0] in n for n in trainable)
    assert any(n.endswith("logit_scale") for n in trainable)


def test_no_weight_decay_on_norms_biases_and_logit_scale(tokenizer):
    module = build_model(ModelConfig(preset="tiny"), tokenizer)
    names = {id(p): n for n, p in module.named_parameters()}
    decay, keep = param_groups(module, 0.1)
    decayed = {names[id(p)] for p in decay["params"]}
    assert not any("norm" in n or n.endswith("bias") or "logit_scale" in n for n in decayed)
    assert any(n.endswith("q_proj.weight") for n in decayed)
    assert keep["weight_decay"] == 0.0 and no_decay("clip.logit_scale", torch.zeros(1))


def test_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_lambda(0, cfg) == pytest.approx(0.1) and lr_lambda(9, cfg) == pytest.approx(1.0)
    assert lr_lambda(10, cfg) == pytest.approx(1.0)
    assert lr_lambda(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_lambda(110, cfg) == pytest.approx(0.1)


def test_text_mask_left_out_only_where_it_changes_nothing(tokenizer):
    """Right-padded batches train without the attention mask (no host sync on a GPU): the pooled
    text features are the same; a batch padded anywhere else keeps its mask, which matters there."""
    from vutrain.data.tokenizer import tokenize_batch
    from vutrain.model import text_attention_mask

    torch.manual_seed(0)
    module = build_model(ModelConfig(preset="tiny"), tokenizer).eval()
    tok = tokenize_batch(tokenizer, ["a red circle video", "blue", "a green square " * 20], 32)
    ids, mask = tok["input_ids"], tok["attention_mask"]
    assert mask[1].sum() < 32 and mask[2].all()  # padded, and truncated
    assert text_attention_mask(mask) is None
    with torch.no_grad():
        masked = module(input_ids=ids, attention_mask=mask)[1]
        unmasked = module(input_ids=ids, attention_mask=None)[1]
    torch.testing.assert_close(unmasked, masked, atol=1e-6, rtol=1e-5)

    left = torch.stack([row.roll(int(32 - row.sum())) for row in mask])  # the same pads, in front
    left_ids = torch.stack([row.roll(int(32 - m.sum())) for row, m in zip(ids, mask)])
    assert text_attention_mask(left) is left
    with torch.no_grad():
        with_mask = module(input_ids=left_ids, attention_mask=left)[1]
        without = module(input_ids=left_ids, attention_mask=None)[1]
    assert (with_mask[:2] - without[:2]).abs().max() > 1e-3  # the mask matters for these rows
    on_device = mask.to("meta")  # already on a device: no host check, the mask stays
    assert text_attention_mask(on_device) is on_device


def test_eval_without_validation_samples_leaves_the_model_training(tokenizer):
    """An eval that finds no held-out sample returns early; training must go on in train mode
    (dropout, and the loss's training-only paths), not in the eval mode the eval switched to."""
    from vutrain.evaluate import evaluate

    class Engine(torch.nn.Module):  # DeepSpeed's engine as evaluate() sees it: `.module`, a forward
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, **inputs):
            return self.module(**inputs)

    engine = Engine(build_model(ModelConfig(preset="tiny"), tokenizer)).train()
    metrics = evaluate(engine, [], ["cat"], ["{}"], None, torch.float32, torch.device("cpu"), dummy_batch={})
    assert metrics == {"eval/num_samples": 0.0}
    assert engine.module.training


def test_pretrained_dir_saved_in_half_precision_loads_in_fp32(tokenizer, tmp_path):
    """transformers 5 loads a checkpoint in the dtype it was saved in: an fp16 CLIP directory
    (a hub model stored in fp16, or one saved with .half()) gave an fp16 module, whose forward
    rejects fp32 pixels and whose weights train without fp32 masters under train.precision=fp32.
    The module is fp32 whatever the files hold; DeepSpeed casts it for bf16/fp16 runs itself."""
    from transformers import CLIPModel

    from vutrain.model import preset_image_processor

    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).half().save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    preset_image_processor(64).save_pretrained(tmp_path)
    module = build_model(ModelConfig(name_or_path=str(tmp_path)))
    assert {p.dtype for p in module.parameters()} == {torch.float32}  # before: float16
    img, txt, scale, _ = module(*batch())
    assert img.dtype == txt.dtype == scale.dtype == torch.float32


def test_pretrained_tokenizer_and_processor_without_the_weights(tokenizer, tmp_path):
    """The tokenizer set-up (every rank) and the export take a pretrained model's tokenizer and
    image processor without reading its weights (they loaded the whole CLIPModel again for them):
    a directory whose weight file is unreadable still gives both."""
    from transformers import CLIPModel

    from vutrain.model import preset_image_processor, tokenizer_and_processor

    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    preset_image_processor(64).save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.write_bytes(b"not weights")
    cfg = ModelConfig(name_or_path=str(tmp_path))
    tok, processor, context = tokenizer_and_processor(
        cfg, str(tmp_path), "", "{title}", 0, True, lambda: None
    )
    assert tok("a thumbnail")["input_ids"] == tokenizer("a thumbnail")["input_ids"]
    assert processor.crop_size["height"] == 64 and context == min(tokenizer.model_max_length, 77)
    with pytest.raises(Exception):  # noqa: B017  (the weights themselves are unreadable)
        build_model(cfg)


def test_pretrained_context_length_stays_within_the_text_positions(tokenizer, tmp_path):
    """A pretrained model whose tokenizer was saved without a length limit (model_max_length 10**30)
    and whose text tower has fewer than 77 positions: captions are cut to its positions (before: 77
    tokens, and the first forward failed in the position embedding)."""
    from transformers import CLIPModel

    from vutrain.model import preset_image_processor, tokenizer_and_processor

    config = preset_clip_config(ModelConfig(preset="tiny"), tokenizer)
    CLIPModel(config).save_pretrained(tmp_path)
    tokenizer.model_max_length = int(1e30)
    tokenizer.save_pretrained(tmp_path)
    preset_image_processor(64).save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path))
    tok, _, context = tokenizer_and_processor(cfg, str(tmp_path), "", "{title}", 0, True, lambda: None)
    assert context == config.text_config.max_position_embeddings == 32
    ids = tok(["word " * 100], padding="max_length", truncation=True, max_length=context, return_tensors="pt")
    module = build_model(cfg)
    with torch.no_grad():
        module(batch()[0][:1], ids["input_ids"], ids["attention_mask"])
