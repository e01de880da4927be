"""Review of the exported tokenizer's limit: a preset run's export cuts captions at the context length
the run trained with, whatever limit its saved tokenizer carries (a start that died before its first
checkpoint and was restarted with a smaller model.context_length reused the tokenizer saved for the
larger one, and `truncation=True` on the export then ran past the text tower's positions)."""

from __future__ import annotations

import shutil

import torch

from inprocess_trainer import train


def test_export_truncates_at_the_context_length_the_run_trained_with(tiny_shards, tmp_path, single_process):
    from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

    from vutrain.data.tokenizer import tokenize_batch
    from vutrain.export import export

    run_dir = tmp_path / "run"
    common = dict(eval__every=0, data__val_shards="")
    # A first start with 64 tokens per caption that got no checkpoint (e.g. out of memory at step 1):
    # its tokenizer is saved with model_max_length 64 and reused by the restart.
    train(tiny_shards, str(run_dir), steps=1, model__context_length=64, **common)
    shutil.rmtree(run_dir / "checkpoints")
    captured = {}
    train(
        tiny_shards,
        str(run_dir),
        steps=1,
        on_trainer=lambda t: captured.update(trainer=t),
        model__context_length=32,
        **common,
    )
    out = export(str(run_dir), str(tmp_path / "hf"))

    model = CLIPModel.from_pretrained(out).eval()
    assert model.config.text_config.max_position_embeddings == 32
    run_tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    long_caption = "a long caption about music videos " * 20
    for tokenizer in (AutoTokenizer.from_pretrained(out), CLIPProcessor.from_pretrained(out).tokenizer):
        # before: 64, and the 64 tokens below failed in the text tower ("Sequence length must be less
        # than max_position_embeddings")
        assert tokenizer.model_max_length == 32
        assert tokenizer.padding_side == "right"
        enc = tokenizer([long_caption, "a red circle"], padding=True, truncation=True, return_tensors="pt")
        assert enc["input_ids"].shape[1] == 32
        # the ids the run trained on (tokenize_batch at its context length), and the run's text features
        trained_ids = tokenize_batch(run_tokenizer, [long_caption, "a red circle"], 32)["input_ids"]
        assert torch.equal(enc["input_ids"], trained_ids)
        trained = captured["trainer"].engine.module.eval()
        with torch.no_grad():
            _, expected, _, _ = trained(input_ids=trained_ids, attention_mask=enc["attention_mask"])
            got = torch.nn.functional.normalize(model.get_text_features(**enc).pooler_output, dim=-1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
