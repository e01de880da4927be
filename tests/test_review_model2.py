"""Second review of the model and its export: a checkpoint that no longer fits the run's config is
one `error:` line, and a CLIP-loss fine-tune of a SigLIP export does not carry the old bias along."""

from __future__ import annotations

import math

import pytest
import torch
import yaml

from vutrain.config import ModelConfig
from vutrain.model import preset_clip_config, preset_image_processor

from inprocess_trainer import train


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from vutrain.data.tokenizer import train_bpe_tokenizer

    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    return train_bpe_tokenizer(texts, str(tmp_path_factory.mktemp("tok")), vocab_size=300, max_length=32)


def test_checkpoint_that_does_not_fit_the_config_is_one_line(tiny_shards, tmp_path, capsys, single_process):
    """config.yaml edited after the run (context_length 32 -> 16): the saved position embedding no
    longer fits. Before: load_state_dict's RuntimeError ("size mismatch for ...") as a traceback."""
    from vutrain.export import main

    run_dir = tmp_path / "run"
    train(tiny_shards, str(run_dir), steps=1, train__zero_stage=1, eval__every=0, data__val_shards="")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["model"]["context_length"] = 16
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "hf"
    assert main([str(run_dir), str(out)]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint step_00000001 does not fit the model its run's config builds")
    assert "position_embedding.weight (32, 128) vs (16, 128)" in last
    assert "was config.yaml or model.name_or_path changed since the run?" in last
    assert not out.exists()  # nothing half-written


def test_clip_loss_fine_tune_of_a_siglip_export_drops_its_bias(tokenizer, tmp_path):
    """A vutrain SigLIP export carries its learnt bias in config.logit_bias. Fine-tuned with the CLIP
    loss (no bias) and exported, the old bias stayed in config.json (before), with a scale it was never
    learnt with: a SigLIP fine-tune of that export started from it instead of -10 and ln 10."""
    from transformers import CLIPModel

    from vutrain.export import to_hf_clip
    from vutrain.model import build_model

    siglip = tmp_path / "siglip"
    model = CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tokenizer))
    model.config.logit_bias = -3.25
    model.save_pretrained(siglip)
    tokenizer.save_pretrained(siglip)
    preset_image_processor(64).save_pretrained(siglip)

    clip_run = build_model(ModelConfig(name_or_path=str(siglip)), use_bias=False)
    out = tmp_path / "hf"
    to_hf_clip(clip_run).save_pretrained(out)
    tokenizer.save_pretrained(out)
    preset_image_processor(64).save_pretrained(out)
    assert getattr(CLIPModel.from_pretrained(out).config, "logit_bias", None) is None
    again = build_model(ModelConfig(name_or_path=str(out)), use_bias=True, init_scale=math.log(10.0))
    assert float(again.logit_bias.detach()) == -10.0
    assert float(again.base.logit_scale) == pytest.approx(math.log(10.0))
    # A SigLIP run's own export keeps its bias.
    siglip_run = build_model(ModelConfig(name_or_path=str(siglip)), use_bias=True)
    with torch.no_grad():
        siglip_run.logit_bias.fill_(-2.5)
    assert to_hf_clip(siglip_run).config.logit_bias == -2.5


def test_lora_target_that_matches_nothing_is_refused(tokenizer):
    """peft refuses a target list only when no name matches: `q_proj,vproj` trained q_proj's adapters
    alone and dropped v_proj's silently (before). Now a config error names the unmatched name and
    the layers there are; names that all match, dotted suffixes included, build as before."""
    from vutrain.config import ConfigError
    from vutrain.model import build_model

    cfg = ModelConfig(preset="tiny")
    cfg.lora.enabled = True
    cfg.lora.target_modules = ["q_proj", "vproj"]
    with pytest.raises(ConfigError, match=r"model.lora.target_modules: vproj matches no module .* v_proj"):
        build_model(cfg, tokenizer)
    cfg.lora.target_modules = ["q_proj", "mlp.fc1"]
    adapted = {
        n.split(".lora_A")[0].rsplit(".", 1)[-1]
        for n, _ in build_model(cfg, tokenizer).named_parameters()
        if "lora_A" in n
    }
    assert adapted == {"q_proj", "fc1"}
