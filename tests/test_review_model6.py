"""Sixth review of the model: model.vocab_size beside a pretrained model.name_or_path is named in a
warning (it was unused without a word), all-linear inside a list of LoRA targets is refused saying
it goes alone, and LoRA with a locked tower and gradient checkpointing under real DeepSpeed engines
trains the free tower's adapters with the same gradients and leaves the locked tower unchanged."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from transformers import CLIPModel

from vutrain.config import ConfigError, LoraConfig, ModelConfig, TrainConfig
from vutrain.model import (
    build_model,
    check_model_config,
    preset_clip_config,
    preset_image_processor,
    tokenizer_and_processor,
)

from inprocess_trainer import DIST_ENV


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


@pytest.fixture(scope="module")
def pretrained_dir(tokenizer, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("pretrained")
    CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    preset_image_processor(64).save_pretrained(directory)
    return str(directory)


class _Records(logging.Handler):
    """vutrain's loggers may not propagate to pytest's caplog (logging_setup gives them a handler)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _vocab_warnings(cfg: ModelConfig, run_dir: str, is_main: bool = True) -> list[str]:
    records, logger = _Records(), logging.getLogger("vutrain.model")
    logger.addHandler(records)
    try:
        tokenizer_and_processor(cfg, run_dir, "", "{title}", 1, is_main, lambda: None)
    finally:
        logger.removeHandler(records)
    return [m for m in records.messages if "model.vocab_size" in m]


def test_vocab_size_beside_a_pretrained_model_is_named_in_a_warning(pretrained_dir, tokenizer, tmp_path):
    """`--config tiny model.name_or_path=DIR` (tiny.yaml sets model.vocab_size=1024) trained with the
    model's own tokenizer of 300-odd tokens, and nothing said that the 1024 was unused. Now rank 0
    warns, naming the setting and the tokenizer's size; the default, a value equal to the
    tokenizer's size, and the other ranks say nothing."""
    size = len(tokenizer)
    warnings = _vocab_warnings(ModelConfig(name_or_path=pretrained_dir, vocab_size=1024), str(tmp_path))
    assert len(warnings) == 1, warnings
    assert "model.vocab_size=1024 applies to presets only" in warnings[0]
    assert f"its own tokenizer of {size} tokens" in warnings[0]
    for quiet in (ModelConfig.vocab_size, size):
        assert (
            _vocab_warnings(ModelConfig(name_or_path=pretrained_dir, vocab_size=quiet), str(tmp_path)) == []
        )
    other_rank = _vocab_warnings(
        ModelConfig(name_or_path=pretrained_dir, vocab_size=1024), str(tmp_path), False
    )
    assert other_rank == []


def test_all_linear_inside_a_list_of_targets_says_it_goes_alone():
    """`model.lora.target_modules=all-linear,q_proj` was refused as "all-linear matches no module of
    the model ... (or give all-linear)": it had been given. Now the line says all-linear goes alone."""
    cfg = ModelConfig(lora=LoraConfig(enabled=True, target_modules=["all-linear", "q_proj"]))
    with pytest.raises(ConfigError) as caught:
        check_model_config(cfg)
    message = str(caught.value)
    assert "all-linear adapts every linear layer and must be given alone" in message
    assert "matches no module" not in message and "\n" not in message
    check_model_config(ModelConfig(lora=LoraConfig(enabled=True, target_modules=["all-linear"])))


def _grads(tokenizer, checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    cfg = ModelConfig(lock_image=True, gradient_checkpointing=checkpointing)
    cfg.lora = LoraConfig(enabled=True, r=4)
    module = build_model(cfg, tokenizer).train()
    gen = torch.Generator().manual_seed(0)
    img, txt, scale, _ = module(
        torch.randn(4, 3, 64, 64, generator=gen), torch.randint(3, 50, (4, 32), generator=gen)
    )
    (scale * img @ txt.T).logsumexp(1).mean().backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}


def test_lora_adapter_gradients_are_the_same_with_gradient_checkpointing(tokenizer):
    """Checkpointed layers whose inputs need no gradient (a locked tower's output, frozen base
    weights) give reentrant checkpointing zero adapter gradients; here every adapter of the free
    tower gets the gradient it gets without checkpointing, and nothing of the locked tower trains."""
    plain, checkpointed = _grads(tokenizer, False), _grads(tokenizer, True)
    assert plain.keys() == checkpointed.keys()
    assert not any("vision" in n or "visual" in n for n in plain)
    assert any("text_model" in n and "lora_B" in n and g.abs().sum() > 0 for n, g in plain.items())
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.fixture
def one_rank(single_process):
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env({k: v for k, v in os.environ.items() if k not in DIST_ENV}))
    yield


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_with_a_locked_tower_changes_only_the_free_adapters_and_scale(one_rank, tokenizer, stage):
    """Two optimizer steps of a real DeepSpeed engine (LoRA, lock_image, gradient checkpointing):
    the parameters that changed are the text tower's adapters and the logit scale, nothing else."""
    import deepspeed

    from vutrain.engine import build_engine

    torch.manual_seed(0)
    cfg = ModelConfig(lock_image=True, gradient_checkpointing=True)
    cfg.lora = LoraConfig(enabled=True, r=4)
    module = build_model(cfg, tokenizer)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    train = TrainConfig(micro_batch_size=4, zero_stage=stage, lr=1e-2, warmup_steps=0)
    engine = build_engine(module, train, 1, torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        pixels, ids = torch.randn(4, 3, 64, 64, generator=gen), torch.randint(3, 50, (4, 32), generator=gen)
        img, txt, scale, _ = engine(pixel_values=pixels, input_ids=ids, attention_mask=None)
        engine.backward((scale * img @ txt.T).logsumexp(1).mean())
        engine.step()
    changed = set()
    for name, param in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], enabled=stage == 3):
            if not torch.equal(param.detach().reshape(before[name].shape), before[name]):
                changed.add(name)
    assert all(("text_model" in n and ".lora_" in n) or n.endswith("logit_scale") for n in changed), changed
    assert any(n.endswith("logit_scale") for n in changed)
    assert any("text_model" in n and "lora_B" in n for n in changed)
