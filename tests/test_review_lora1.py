"""First LoRA review: LoRA targets that adapt no layer of a tower that is not locked are named in
a one-line warning when the model is built (LoRA freezes every base weight, so such a tower never
trained, without a word); saying so with model.lock_image / lock_text silences it."""

from __future__ import annotations

import logging

import pytest

from vutrain.config import LoraConfig, ModelConfig
from vutrain.model import build_model


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


class _Records(logging.Handler):
    """vutrain's loggers may not propagate to pytest's caplog (logging_setup gives them a handler)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _build_warnings(tokenizer, targets: list[str], **model) -> tuple[list[str], object]:
    cfg = ModelConfig(preset="tiny", lora=LoraConfig(enabled=True, r=2, target_modules=targets), **model)
    records, logger = _Records(), logging.getLogger("vutrain.model")
    logger.addHandler(records)
    try:
        module = build_model(cfg, tokenizer)
    finally:
        logger.removeHandler(records)
    return [m for m in records.messages if "model.lora.target_modules" in m], module


@pytest.mark.parametrize(
    "targets,frozen_tower,lock",
    [
        (["token_embedding"], "vision", "lock_image"),
        (["patch_embedding"], "text", "lock_text"),
        (["visual_projection"], "text", "lock_text"),
    ],
)
def test_lora_targets_of_one_tower_alone_are_named_in_a_warning(tokenizer, targets, frozen_tower, lock):
    """`token_embedding` alone adapted the text tower only: the vision tower, base weights frozen by
    LoRA and no adapter, never changed (a LiT the config never asked for), without a word. One
    warning line names the tower, the lock that says it is meant, and the tower's linear layers."""
    warnings, module = _build_warnings(tokenizer, targets)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    message = warnings[0]
    assert f"adapts no layer of the {frozen_tower} tower" in message
    assert f"model.{lock}=true" in message and "q_proj" in message
    prefix = "vision_model" if frozen_tower == "vision" else "text_model"
    assert not any(prefix in n for n, p in module.named_parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "targets,model",
    [
        (["token_embedding"], {"lock_image": True}),
        (["patch_embedding"], {"lock_text": True}),
        (["q_proj", "v_proj"], {}),
        (["token_embedding", "patch_embedding"], {}),
        (["all-linear"], {}),
    ],
)
def test_lora_targets_reaching_every_free_tower_warn_nothing(tokenizer, targets, model):
    """A locked tower is meant to stay frozen; targets in both towers, and all-linear, warn nothing."""
    warnings, module = _build_warnings(tokenizer, targets, **model)
    assert warnings == []
    assert any(".lora_" in n for n, p in module.named_parameters() if p.requires_grad)
