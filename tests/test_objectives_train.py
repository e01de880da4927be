"""The objectives through the real trainer (deepspeed launcher, 2 CPU ranks, tiny preset):
SigLIP with neighbour exchange and tag positives (then export keeps its logit_bias), and the
seed objective align_uniform with its weights and temperature from the config, both terms logged."""

from __future__ import annotations

import math
import os

import pytest
import torch

import train_runner as tr


@pytest.mark.slow
def test_siglip_bidir_with_tag_positives_trains_and_export_keeps_logit_bias(synthetic_shards, tmp_path):
    from transformers import CLIPModel

    from vutrain.export import export, load_trained_module

    run_dir = str(tmp_path / "run")
    proc = tr.run(
        "deepspeed",
        tr.base_overrides(
            synthetic_shards,
            run_dir,
            3,
            loss__name="siglip",
            loss__bidir="true",
            loss__positives="tags",
            data__val_shards="",
            train__zero_stage=1,
        ),
    )
    assert proc.returncode == 0, tr.describe(proc)
    assert "world_size=2" in proc.stdout + proc.stderr
    losses = tr.losses(run_dir)
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())

    module, _, _, _ = load_trained_module(run_dir)
    bias = float(module.logit_bias.detach().reshape(()))
    assert bias != -10.0  # learnt: it moved away from SigLIP's initial value
    out = str(tmp_path / "hf")
    export(run_dir, out)
    exported = CLIPModel.from_pretrained(out)
    assert exported.config.logit_bias == pytest.approx(bias, abs=1e-6)
    scale = float(module.clip.logit_scale.detach().reshape(()))
    assert exported.logit_scale.item() == pytest.approx(scale, abs=1e-6)


@pytest.mark.slow
def test_align_uniform_trains_with_config_weights_and_logs_both_terms(synthetic_shards, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = tr.run(
        "deepspeed",
        tr.base_overrides(
            synthetic_shards,
            run_dir,
            3,
            loss__name="align_uniform",
            loss__align_weight=0.5,
            loss__uniform_weight=2.0,
            loss__uniform_t=3.0,
            data__val_shards="",
        ),
    )
    assert proc.returncode == 0, tr.describe(proc)
    rows = [r for r in tr.metrics(run_dir) if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        # global terms (identical on every rank); the logged loss is the weighted sum of them
        assert r["train/loss"] == pytest.approx(0.5 * r["train/align"] + 2.0 * r["train/uniform"], rel=1e-5)
        assert 0.0 <= r["train/align"] <= 4.0 and r["train/uniform"] <= 0.0
    assert torch.tensor([r["train/loss"] for r in rows]).isfinite().all()
    assert os.path.exists(os.path.join(run_dir, "done.json"))
