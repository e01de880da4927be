"""Review round 5 of the model and its export: behaviour a long-context CLIP needs."""

from __future__ import annotations

import pytest
import torch

from vutrain.config import ModelConfig, load_config
from vutrain.model import build_model, preset_clip_config, preset_image_processor, tokenizer_and_processor

LONG_CONTEXT = 100  # above CLIP's 77


@pytest.fixture(scope="module")
def long_context_model_dir(tmp_path_factory):
    """A CLIPModel directory with a 100-position text tower and a tokenizer limited to 100 tokens:
    what the export of a preset run with model.context_length=100 holds."""
    from transformers import CLIPModel

    from vutrain.data.tokenizer import train_bpe_tokenizer

    root = tmp_path_factory.mktemp("long")
    texts = [f"word{i} thumbnail of a video number {i}" for i in range(50)]
    tokenizer = train_bpe_tokenizer(texts, str(root / "tok"), vocab_size=400, max_length=LONG_CONTEXT)
    model_dir = root / "model"
    config = preset_clip_config(ModelConfig(preset="tiny", context_length=LONG_CONTEXT), tokenizer)
    CLIPModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    preset_image_processor(64).save_pretrained(model_dir)
    return model_dir


def test_fine_tuning_a_long_context_model_keeps_its_caption_length(long_context_model_dir, tmp_path):
    """Fine-tuning a model whose text tower and tokenizer take 100 tokens tokenizes captions to 100
    tokens and the tokens past 77 reach the model (before: cut to 77 without a word)."""
    cfg = ModelConfig(name_or_path=str(long_context_model_dir))
    tok, _, context = tokenizer_and_processor(cfg, str(tmp_path), "", "{title}", 0, True, lambda: None)
    assert context == LONG_CONTEXT
    caption = " ".join(f"word{i}" for i in range(60))
    ids = tok([caption], padding="max_length", truncation=True, max_length=context, return_tensors="pt")
    assert int(ids["attention_mask"].sum()) > 77
    module = build_model(cfg).eval()
    with torch.no_grad():
        _, text, _, _ = module(None, ids["input_ids"], ids["attention_mask"])
    assert text.shape[0] == 1 and torch.isfinite(text).all()


def test_export_of_a_long_context_fine_tune_keeps_the_tokenizer_limit(long_context_model_dir, tmp_path):
    """The export of such a fine-tune writes a tokenizer whose model_max_length is the 100 tokens
    the run trained with (before: 77, so `truncation=True` cut captions the model was trained on)."""
    from vutrain.export import EXPORT_OVERRIDES, load_run_tokenizer_and_processor

    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"model:\n  name_or_path: {long_context_model_dir}\ndata:\n  train_shards: gone/{{0..1}}.tar\n"
    )
    cfg = load_config(str(config_path), EXPORT_OVERRIDES)
    tokenizer, _ = load_run_tokenizer_and_processor(cfg, str(tmp_path))
    assert tokenizer.model_max_length == LONG_CONTEXT
