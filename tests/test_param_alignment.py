"""Every trainable parameter and its gradient starts 16-byte aligned under ZeRO-1, 2 and 3, fp32 and
bf16, on 2 real CPU ranks (gloo) with real DeepSpeed engines built by `vutrain.engine.build_engine`.

The model has deliberately odd sizes (widths 36, MLP 37, vocabulary 101, the 1-element logit
scale), so packed back to back most parameters would be misaligned (DeepSpeed's default layout).
Checked: ZeRO-1/2 parameters right after the engine is built (views of the flat buffer); at every
stage the parameters as a forward sees them (ZeRO-3 gathers them on use); and every gradient that
DeepSpeed holds for a parameter when the parameter's gradient is complete (a post-accumulate hook
registered after DeepSpeed's own).
"""

from __future__ import annotations

import pytest
import torch

from helpers_dist import run_distributed

STAGES, PRECISIONS = (1, 2, 3), ("fp32", "bf16")


def _odd_model():
    from transformers import CLIPConfig, CLIPModel

    from vutrain.model import ClipTrainModule

    text = dict(
        vocab_size=101,
        hidden_size=36,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=9,
        projection_dim=20,
        eos_token_id=100,
        bos_token_id=99,
        pad_token_id=0,
    )
    vision = dict(
        hidden_size=36,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=16,
        patch_size=8,
        projection_dim=20,
    )
    return ClipTrainModule(CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=20)))


def _check(stage: int, precision: str, world: int) -> dict:
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine
    from vutrain.param_alignment import misaligned, trainable

    torch.manual_seed(0)
    cfg = TrainConfig(micro_batch_size=2, zero_stage=stage, precision=precision, warmup_steps=0)
    engine = build_engine(_odd_model(), cfg, world, torch.device("cpu"))
    named = trainable(engine.module)
    built = misaligned(named) if stage in (1, 2) else []
    in_forward: set[str] = set()
    in_grad: set[str] = set()
    grads_seen: set[str] = set()
    names = {id(p): n for n, p in named}

    def pre_forward(mod, _args):
        for p in mod.parameters(recurse=False):
            if id(p) in names and p.numel() and p.data_ptr() % 16:
                in_forward.add(names[id(p)])

    def grad_done(p):
        for grad in (p.grad, getattr(p, "grad_accum", None)):
            if grad is not None and grad.numel():
                grads_seen.add(names[id(p)])
                if grad.data_ptr() % 16:
                    in_grad.add(names[id(p)])

    for mod in engine.module.modules():
        mod.register_forward_pre_hook(pre_forward)
    for _, p in named:
        p.register_post_accumulate_grad_hook(grad_done)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    img, txt, scale, _ = engine(
        pixel_values=torch.randn(2, 3, 16, 16, dtype=dtype),
        input_ids=torch.randint(1, 99, (2, 9)),
        attention_mask=torch.ones(2, 9, dtype=torch.long),
    )
    engine.backward((img.float() @ txt.float().T).diagonal().sum() * scale.float())
    engine.step()
    return {
        "params": len(named),
        "built": built,
        "forward": sorted(in_forward),
        "grad": sorted(in_grad),
        "grads_seen": len(grads_seen),
    }


def _all_configs(rank: int, world: int) -> dict:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return {
        (stage, precision): _check(stage, precision, world) for stage in STAGES for precision in PRECISIONS
    }


@pytest.mark.slow  # spawns 2 rank processes
def test_every_trainable_parameter_and_gradient_is_16_byte_aligned():
    results = run_distributed(_all_configs, 2, init_process_group=False, timeout_s=600)
    for rank, by_config in enumerate(results):
        for (stage, precision), res in by_config.items():
            where = f"rank {rank}, ZeRO-{stage}, {precision}"
            assert res["params"] > 40, where
            assert res["built"] == [], f"{where}: misaligned after build: {res['built']}"
            assert res["forward"] == [], f"{where}: misaligned in forward: {res['forward']}"
            assert res["grads_seen"] > 0, f"{where}: no gradient observed"
            assert res["grad"] == [], f"{where}: misaligned gradients: {res['grad']}"
