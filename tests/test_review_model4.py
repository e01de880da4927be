"""Fourth review of the model: a LoRA target naming a block LoRA cannot adapt (`mlp`), a model
directory of another kind than CLIP (a SigLIP, a vision tower alone) and a directory missing
weights are each refused in one line, the first two from the config files alone."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModelWithProjection, SiglipConfig, SiglipModel

from vutrain.config import ConfigError, LoraConfig, ModelConfig
from vutrain.model import build_model, check_model_config, preset_clip_config, preset_image_processor


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def _save_with_preprocessing(model, directory, tokenizer) -> str:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    preset_image_processor(64).save_pretrained(directory)
    return str(directory)


def _tiny_clip(tokenizer) -> CLIPModel:
    return CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer))


def test_lora_target_naming_a_block_is_refused_from_the_config_alone(tokenizer):
    """`mlp` and `self_attn` name modules (so the old check passed) that peft cannot adapt: it
    failed in build_model, after the process group, with the block's repr. Now check_model_config
    refuses them in one line that names the type and the linear layers; layers peft adapts pass."""
    for target, kind in (("mlp", "CLIPMLP"), ("self_attn", "CLIPAttention"), ("layer_norm1", "LayerNorm")):
        cfg = ModelConfig(preset="tiny", lora=LoraConfig(enabled=True, target_modules=["q_proj", target]))
        with pytest.raises(ConfigError) as err:
            check_model_config(cfg)
        message = str(err.value)
        assert f"{target} ({kind})" in message and "fc1" in message and "\n" not in message
    for target in ("q_proj", "patch_embedding", "token_embedding"):
        cfg = ModelConfig(preset="tiny", lora=LoraConfig(enabled=True, target_modules=[target]))
        check_model_config(cfg)
        build_model(cfg, tokenizer)


def test_a_model_directory_of_another_kind_is_refused_before_loading(tokenizer, tmp_path):
    """transformers builds a CLIPConfig from any config.json with a warning: a SigLIP directory
    passed the config check and then loaded in part or failed on a size mismatch after the process
    group. Now its model_type is one line, from config.json alone."""
    siglip = SiglipModel(
        SiglipConfig(
            text_config=dict(
                vocab_size=len(tokenizer),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                max_position_embeddings=32,
            ),
            vision_config=dict(
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=64,
                image_size=64,
                patch_size=16,
            ),
        )
    )
    vision = CLIPVisionModelWithProjection(_tiny_clip(tokenizer).config.vision_config)
    for model, kind in ((siglip, "siglip"), (vision, "clip_vision_model")):
        directory = _save_with_preprocessing(model, tmp_path / kind, tokenizer)
        with pytest.raises(ConfigError, match=f"holds a '{kind}' model") as err:
            check_model_config(ModelConfig(name_or_path=directory))
        assert "\n" not in str(err.value)
        with pytest.raises(OSError, match=f"holds a '{kind}' model"):
            build_model(ModelConfig(name_or_path=directory))


def test_a_model_directory_missing_weights_is_refused(tokenizer, tmp_path):
    """A weights file without some of the CLIPModel's tensors loaded with those tensors at random
    (a warning only) and was fine-tuned as if pretrained; now it is one line naming them. A complete
    directory still loads its own weights."""
    clip = _tiny_clip(tokenizer)
    directory = _save_with_preprocessing(clip, tmp_path / "clip", tokenizer)
    loaded = build_model(ModelConfig(name_or_path=directory)).base
    assert torch.equal(
        loaded.vision_model.encoder.layers[0].mlp.fc1.weight,
        clip.vision_model.encoder.layers[0].mlp.fc1.weight,
    )

    weights = f"{directory}/model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if not k.startswith("vision_model.encoder.layers.0.")}
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(
        OSError, match=r"lacks 16 weights of a CLIPModel \(first: vision_model.encoder.layers.0"
    ) as err:
        build_model(ModelConfig(name_or_path=directory))
    assert "\n" not in str(err.value)
