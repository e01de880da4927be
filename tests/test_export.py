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
