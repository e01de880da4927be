"""Review of the tokenizer a pretrained run uses: it must fit the text tower (every id a row of its
embedding, captions pooled at their own eos), and captions reach the tower right-padded whatever
padding side the tokenizer was saved with."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPModel

from vutrain.config import ConfigError, ModelConfig
from vutrain.data.tokenizer import EOS, make_tokenize, train_bpe_tokenizer
from vutrain.model import (
    TokenizerMismatchError,
    check_model_config,
    load_pretrained_preprocessing,
    preset_clip_config,
    preset_image_processor,
    tokenizer_and_processor,
)

CAPTIONS = [
    "Cutest Cats Compilation 2017 | Best Cute Cat Videos Ever",
    "猫の動画 まとめ",
    "قطط لطيفة جدا",
    "😺😺 cats!!",
    "a",
    "a red circle video " * 20,  # longer than the context: truncated
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=16)


def _pretrained_dir(path, tokenizer, **text_config) -> str:
    config = preset_clip_config(ModelConfig(preset="tiny"), tokenizer)
    for key, value in text_config.items():
        setattr(config.text_config, key, value)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    preset_image_processor(64).save_pretrained(path)
    return str(path)


def test_a_tokenizer_larger_than_the_text_tower_stops_training_before_the_process_group(
    tokenizer, tiny_shards, tmp_path, capsys
):
    """A model directory whose tokenizer has added tokens beyond the text tower's vocab_size failed
    with `IndexError: index out of range in self` in the token embedding at the first step, after
    the process group and the engine: now a config error before any process group names both sizes
    (exit 2, no run directory), and loading its tokenizer (trainer, export) refuses it alike."""
    import copy

    import torch.distributed as dist

    from vutrain import train

    from inprocess_trainer import overrides

    extended = copy.deepcopy(tokenizer)
    extended.add_tokens(["<extra_a>", "<extra_b>"])
    model_dir = _pretrained_dir(tmp_path / "model", tokenizer)
    extended.save_pretrained(model_dir)
    size = len(tokenizer)
    words = f"its tokenizer has {size + 2} tokens but its text tower's vocab_size is {size}"

    with pytest.raises(TokenizerMismatchError, match=words):
        load_pretrained_preprocessing(model_dir)
    run_dir = tmp_path / "run"
    args = overrides(tiny_shards, str(run_dir), steps=1, **{"model.name_or_path": model_dir, "eval.every": 0})
    assert train.main(["--config", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert f"config error: model.name_or_path={model_dir!r}: {words}" in err, err
    assert "Traceback" not in err and not dist.is_initialized() and not run_dir.exists()


def test_a_text_tower_that_pools_at_another_eos_is_refused(tokenizer, tmp_path):
    """HF CLIP pools each caption at the first `text_config.eos_token_id`: an id the tokenizer never
    writes pooled every caption at its first token (argmax of all zeros), training on nothing but
    the start token without an error. Refused in one line naming the id to set; the matching
    directory passes."""
    check_model_config(ModelConfig(name_or_path=_pretrained_dir(tmp_path / "ok", tokenizer)))
    other = _pretrained_dir(tmp_path / "other_eos", tokenizer, eos_token_id=5)
    with pytest.raises(
        ConfigError,
        match=rf"pools at eos_token_id 5 but its tokenizer ends captions with '{EOS}' \(id 1\).*"
        "set text_config.eos_token_id to 1 in its config.json",
    ):
        check_model_config(ModelConfig(name_or_path=other))


def _first_eos(ids: torch.Tensor, eos: int) -> torch.Tensor:
    return (ids == eos).int().argmax(dim=-1)


def test_captions_are_pooled_at_their_own_end_whatever_the_saved_padding_side(tokenizer, tmp_path):
    """A pretrained tokenizer saved with `padding_side="left"` padded captions with eos before the
    text, and HF CLIP, which pools at the first eos, pooled every padded caption at a pad token
    (other features than the caption alone, no error). Now each row holds bos, the caption, eos
    and eos padding after it, so the first eos is the real end of text (kept last when truncated,
    for every script), and the text features equal those of each caption encoded alone."""
    model_dir = _pretrained_dir(tmp_path / "model", tokenizer)
    config_file = tmp_path / "model" / "tokenizer_config.json"
    saved = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**saved, "padding_side": "left"}))

    tok, _, context = tokenizer_and_processor(
        ModelConfig(name_or_path=model_dir), str(tmp_path / "run"), "", "{title}", 1, True, lambda: None
    )
    assert tok.padding_side == "left" and context == 16
    batch = make_tokenize(tok, context)(CAPTIONS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    alone = [tok(c, truncation=True, max_length=context)["input_ids"] for c in CAPTIONS]
    assert len(alone[-1]) == context and alone[-1][-1] == tok.eos_token_id  # truncated, eos kept
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert _first_eos(ids, tok.eos_token_id).tolist() == [len(a) - 1 for a in alone]
    assert mask.sum(dim=1).tolist() == [len(a) for a in alone]

    model = CLIPModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        padded = model.get_text_features(input_ids=ids, attention_mask=mask)
        one_by_one = [model.get_text_features(input_ids=torch.tensor([a])) for a in alone]
    padded = getattr(padded, "pooler_output", padded)
    one_by_one = torch.cat([getattr(f, "pooler_output", f) for f in one_by_one])
    torch.testing.assert_close(padded, one_by_one, atol=1e-5, rtol=1e-5)


def test_an_export_of_a_left_padding_tokenizer_pads_on_the_right(tokenizer, tmp_path):
    """The export saved a pretrained tokenizer's `padding_side="left"` as it was: the run had padded
    on the right, and a batched pipeline of the export pooled every padded caption at a pad token."""
    from vutrain.config import RunConfig
    from vutrain.export import load_run_tokenizer_and_processor

    model_dir = _pretrained_dir(tmp_path / "model", tokenizer)
    config_file = tmp_path / "model" / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "padding_side": "left"}))
    cfg = RunConfig(model=ModelConfig(name_or_path=model_dir))
    exported, _ = load_run_tokenizer_and_processor(cfg, str(tmp_path / "run"))
    exported.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["padding_side"] == "right"
