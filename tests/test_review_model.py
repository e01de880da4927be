"""Review of the model and its export: a pretrained directory without its tokenizer is refused, and
the exported tokenizer cuts captions where training cut them."""

from __future__ import annotations

import copy

import pytest
import torch

from vutrain.config import ModelConfig
from vutrain.model import preset_clip_config, preset_image_processor, tokenizer_and_processor

from inprocess_trainer import train


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def _pretrained_dir(path, tokenizer, save_tokenizer: bool = True) -> str:
    from transformers import CLIPModel

    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).save_pretrained(path)
    if save_tokenizer:
        tokenizer.save_pretrained(path)
    preset_image_processor(64).save_pretrained(path)
    return str(path)


def test_pretrained_directory_without_a_tokenizer_is_refused(tokenizer, tmp_path):
    """transformers 5 gives a directory with no tokenizer files a CLIP tokenizer of its special
    tokens alone (2 tokens): every caption became the same ids and training ran on them silently."""
    path = _pretrained_dir(tmp_path, tokenizer, save_tokenizer=False)
    with pytest.raises(OSError, match=r"its tokenizer has no vocabulary \(2 tokens\): save the tokenizer"):
        tokenizer_and_processor(ModelConfig(name_or_path=path), path, "", "{title}", 0, True, lambda: None)


def test_exported_tokenizer_truncates_to_the_trained_context(
    tokenizer, tiny_shards, tmp_path, single_process
):
    """A pretrained tokenizer saved without a length limit (10**30) over a text tower of 32 positions:
    training cuts captions to 32 tokens, and so does the exported tokenizer with truncation=True
    (before: it kept 10**30, and a long text failed in the exported model's position embedding)."""
    from transformers import AutoTokenizer, CLIPModel

    from vutrain.export import export

    tokenizer = copy.deepcopy(tokenizer)  # the fixture is shared
    tokenizer.model_max_length = int(1e30)
    pretrained = _pretrained_dir(tmp_path / "pretrained", tokenizer)
    run_dir = str(tmp_path / "run")
    common = dict(train__zero_stage=0, eval__every=0, data__val_shards="")
    train(tiny_shards, run_dir, steps=1, model__name_or_path=pretrained, **common)
    out = export(run_dir, str(tmp_path / "hf"))
    exported = CLIPModel.from_pretrained(out).eval()
    assert exported.config.text_config.max_position_embeddings == 32
    labels = ["a red circle video " * 20, "a blue square"]
    tokens = AutoTokenizer.from_pretrained(out)(labels, padding=True, truncation=True, return_tensors="pt")
    assert tokens["input_ids"].shape == torch.Size([2, 32])
    with torch.no_grad():  # before: 102 tokens, "Sequence length must be less than max_position_embeddings"
        exported(pixel_values=torch.zeros(1, 3, 64, 64), **tokens)


def test_fine_tuning_a_siglip_export_keeps_its_learnt_scale_and_bias(tokenizer, tmp_path):
    """A vutrain SigLIP export carries its bias in config.logit_bias; fine-tuning it with SigLIP
    reset the scale to ln 10 and the bias to -10. A CLIP model without a bias still starts there."""
    import math

    from transformers import CLIPModel

    from vutrain.model import build_model

    plain = _pretrained_dir(tmp_path / "clip", tokenizer)
    siglip = _pretrained_dir(tmp_path / "siglip", tokenizer)
    model = CLIPModel.from_pretrained(siglip)
    model.logit_scale.data.fill_(2.5)
    model.config.logit_bias = -3.25
    model.save_pretrained(siglip)
    kept = build_model(ModelConfig(name_or_path=siglip), use_bias=True, init_scale=math.log(10.0))
    assert float(kept.logit_bias) == -3.25 and float(kept.base.logit_scale) == pytest.approx(2.5)
    fresh = build_model(ModelConfig(name_or_path=plain), use_bias=True, init_scale=math.log(10.0))
    assert float(fresh.logit_bias) == -10.0 and float(fresh.base.logit_scale) == pytest.approx(math.log(10.0))
