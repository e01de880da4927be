"""vutrain.export on a CPU-only machine: an fp16 run's config loads (fp16 validates only with CUDA),
and the exported logit scale is clamped to ln(100) as training's forward clamps it."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from test_param_alignment import _odd_model

from inprocess_trainer import train


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
