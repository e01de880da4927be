"""vutrain.export on a CPU-only machine: an fp16 run's config loads (fp16 validates only with CUDA),
the exported logit scale is clamped to ln(100) as training's forward clamps it, ZeRO-0 and ZeRO-1 +
LoRA runs export the trained model's logits, and bad input is a one-line error."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from test_param_alignment import _odd_model

from inprocess_trainer import train

REPO = Path(__file__).resolve().parents[1]


def test_exported_logit_scale_is_clamped_to_ln100():
    from vutrain.export import to_hf_clip

    module = _odd_model()
    module.base.logit_scale.data.fill_(4.7)  # past the bound: training used exp(ln 100) = 100
    clip = to_hf_clip(module)
    assert clip.logit_scale.dim() == 0
    assert float(clip.logit_scale.exp()) == pytest.approx(100.0, rel=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="covers a machine without CUDA")
def test_fp16_run_exports_without_a_gpu(tiny_shards, tmp_path, single_process):
    """The run trains in fp32 here (fp16 needs CUDA); its config.yaml then says fp16, as a GPU
    run's does: export reads the checkpoint as fp32 either way."""
    from transformers import CLIPModel

    from vutrain.export import export

    run_dir = tmp_path / "run"
    train(tiny_shards, str(run_dir), steps=1, eval__every=0, data__val_shards="")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["train"]["precision"] = "fp16"
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    out = export(str(run_dir), str(tmp_path / "hf"))  # before: "train.precision=fp16 needs a CUDA GPU"
    exported = CLIPModel.from_pretrained(out)
    assert 0 < float(exported.logit_scale) <= math.log(100.0) + 1e-6


@pytest.mark.parametrize(
    "stage,extra",
    [(0, {}), (1, {"model__lora__enabled": "true"})],
    ids=["zero0", "zero1-lora"],
)
def test_export_embeds_like_the_trained_model(tiny_shards, tmp_path, single_process, stage, extra):
    """ZeRO-0 writes no optimizer partitions and ZeRO-1 no frozen weights (LoRA's base layers), so
    DeepSpeed's zero_to_fp32 alone cannot rebuild either (before: a TypeError, and "checkpoint
    step_00000001 does not match the run's model: missing [...]"). The exported model, re-loaded
    with CLIPModel.from_pretrained, gives the trained module's logits."""
    from transformers import AutoTokenizer, CLIPModel

    from vutrain.export import export

    captured = {}
    run_dir = str(tmp_path / "run")
    train(
        tiny_shards,
        run_dir,
        steps=1,
        on_trainer=lambda t: captured.update(trainer=t),
        train__zero_stage=stage,
        train__lr=0.01,
        eval__every=0,
        data__val_shards="",
        **extra,
    )
    trained = captured["trainer"].engine.module.eval()
    out = export(run_dir, str(tmp_path / "hf"))
    exported = CLIPModel.from_pretrained(out).eval()
    tokens = AutoTokenizer.from_pretrained(out)(
        ["a red circle", "a blue square video"], padding="max_length", max_length=32, return_tensors="pt"
    )
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        img, txt, scale, _ = trained(pixels, tokens["input_ids"], tokens["attention_mask"])
        got = exported(pixel_values=pixels, **tokens).logits_per_image
    torch.testing.assert_close(got, scale * img @ txt.T, atol=1e-4, rtol=1e-4)


def test_zero0_bf16_export_carries_the_fp32_masters(tiny_shards, tmp_path, single_process):
    """ZeRO-0 in bf16 saves the whole module in bf16 and the optimizer's fp32 masters unnamed, per
    group. The export takes the masters (before: the bf16 weights, up to 0.4% off each value)."""
    from vutrain.export import load_trained_module
    from vutrain.optim import param_groups

    captured = {}
    run_dir = str(tmp_path / "run")
    common = dict(train__lr=0.01, eval__every=0, data__val_shards="", model__lora__enabled="true")
    train(
        tiny_shards,
        run_dir,
        steps=1,
        on_trainer=lambda t: captured.update(trainer=t),
        train__zero_stage=0,
        train__precision="bf16",
        **common,
    )
    engine = captured["trainer"].engine
    names = {id(p): n for n, p in engine.module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in param_groups(engine.module, 0.0)]
    masters = {n: m for ns, ms in zip(groups, engine.optimizer.fp32_groups) for n, m in zip(ns, ms)}
    assert masters and all(m.dtype == torch.float32 for m in masters.values())
    exported = dict(load_trained_module(run_dir)[0].named_parameters())
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())  # not bf16 values
    for name, master in masters.items():
        assert torch.equal(exported[name], master), name
    # The frozen weights (LoRA's base layers) come from the saved module, as before.
    frozen = [n for n, p in engine.module.named_parameters() if not p.requires_grad]
    assert frozen and all(torch.equal(exported[n], engine.module.get_parameter(n).float()) for n in frozen)


def test_zero0_flat_fp32_masters_are_split_by_parameter():
    """The fused FP16 optimizer (a ds_config's Adam on a GPU) saves one flat fp32 tensor per group."""
    from vutrain.export import ExportError, zero0_fp32_masters
    from vutrain.optim import param_groups

    module = _odd_model()  # odd sizes: a split off by one element would shift every later weight
    flat = [torch.cat([p.detach().flatten() * 2 for p in g["params"]]) for g in param_groups(module, 0.1)]
    masters = zero0_fp32_masters({"fp32_groups_flat": flat}, module)
    named = dict(module.named_parameters())
    assert masters.keys() == {n for n, p in named.items() if p.requires_grad}
    assert all(torch.equal(m, named[n].detach() * 2) for n, m in masters.items())
    assert zero0_fp32_masters({"state": {}, "param_groups": []}, module) == {}  # fp32: no masters
    with pytest.raises(ExportError, match="do not fit the model"):
        zero0_fp32_masters({"fp32_groups_flat": [flat[0][1:], flat[1]]}, module)


@pytest.mark.parametrize("stage", [1, 2])
def test_bf16_lora_export_keeps_the_pretrained_base_in_fp32(tiny_shards, tmp_path, single_process, stage):
    """LoRA on a pretrained model, trained in bf16: DeepSpeed saves the frozen base weights in bf16.
    The export takes them from the pretrained model itself (before: rounded, up to 0.4% off each;
    the merged q/v projections on top of the rounded base)."""
    from transformers import CLIPModel

    from vutrain.data.tokenizer import train_bpe_tokenizer
    from vutrain.export import export
    from vutrain.model import ModelConfig, preset_clip_config, preset_image_processor

    pretrained = tmp_path / "pretrained"
    texts = [f"a {c} {s} video" for c in ("red", "green", "blue") for s in ("circle", "square")] * 20
    tok = train_bpe_tokenizer(texts, str(tmp_path / "tok"), vocab_size=300, max_length=32)
    original = CLIPModel(preset_clip_config(ModelConfig(preset="tiny"), tok))
    original.save_pretrained(pretrained)
    tok.save_pretrained(pretrained)
    preset_image_processor(64).save_pretrained(pretrained)
    run_dir = str(tmp_path / "run")
    train(
        tiny_shards,
        run_dir,
        steps=1,
        train__zero_stage=stage,
        train__precision="bf16",
        train__lr=0.01,
        eval__every=0,
        data__val_shards="",
        model__name_or_path=str(pretrained),
        model__lora__enabled="true",
    )
    exported = CLIPModel.from_pretrained(export(run_dir, str(tmp_path / "hf"))).state_dict()
    before = original.state_dict()
    frozen = [n for n in before if "k_proj" in n or "layer_norm" in n or "patch_embedding" in n]
    assert frozen and any(not torch.equal(before[n], before[n].bfloat16().float()) for n in frozen)
    for name in frozen:
        assert torch.equal(exported[name], before[name]), name
    trained = [n for n in before if "q_proj.weight" in n]  # base + LoRA's update
    assert trained and all(not torch.equal(exported[n], before[n]) for n in trained)


@pytest.mark.parametrize(
    "make_run,tag,message",
    [
        (False, None, "config.yaml not found: RUN_DIR must be a training output_dir"),
        (True, None, "no checkpoint in"),
        (True, "step_00000099", "--tag step_00000099 cannot be exported: step_00000099/COMPLETE.json"),
    ],
    ids=["no-run", "no-checkpoint", "bad-tag"],
)
def test_export_cli_bad_input_is_one_line(tmp_path, capsys, make_run, tag, message):
    """`python -m vutrain.export` on bad input prints one `error:` line and exits 2 (before: a
    traceback, and for an unknown --tag DeepSpeed's own error from inside zero_to_fp32)."""
    import shutil

    from vutrain.export import main

    run_dir = tmp_path / "run"
    if make_run:
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copy(REPO / "vutrain" / "configs" / "tiny.yaml", run_dir / "config.yaml")
    argv = [str(run_dir), str(tmp_path / "hf"), *(["--tag", tag] if tag else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after any warning transformers prints on import)
    assert "Traceback" not in err and last.startswith("error: ") and message in last, err
    assert not (tmp_path / "hf").exists()
