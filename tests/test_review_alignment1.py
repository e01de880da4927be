"""16-byte alignment in the cases a user meets beyond test_param_alignment.py's plain odd model.

On 2 real gloo ranks with engines built by `vutrain.engine.build_engine`: LoRA adapters of rank
1, 3 and 7 (their fc1 `lora_B` has 37 x r elements: odd), a locked tower (frozen parameters
between trainable ones), SigLIP's 1-element bias beside the logit scale, a model whose trainable
total is odd, fp32, bf16 and amp_bf16 at ZeRO-1, 2 and 3, gradient accumulation over 2
micro-batches, two optimizer steps, and a resume from a checkpoint (the same world, and 2 ranks
-> 1). Checked: every trainable parameter right after the build and after each step (ZeRO-1/2:
views of the flat buffer), every parameter as a forward sees it (ZeRO-3 gathers on use), every
gradient DeepSpeed holds when a parameter's gradient is complete, every `param.grad` after each
backward, and ZeRO-1/2's reduced gradients (`averaged_gradients`) before each step, but for a
parameter that a partition boundary splits.
"""

from __future__ import annotations

import os

import pytest
import torch

from helpers_dist import run_distributed

# (name, LoRA rank or 0, lock_image, lock_text, SigLIP bias)
VARIANTS = {
    "lora_r1_bias": (1, False, False, True),
    "lora_r3_lock_text": (3, False, True, False),
    "lora_r7_lock_image": (7, True, False, False),
    "lock_image_bias_odd_total": (0, True, False, True),
}
# (ZeRO stage, precision, variant, grad_accum_steps, resume from a checkpoint of the same world)
CASES = [
    (1, "fp32", "lora_r1_bias", 2, True),
    (1, "bf16", "lora_r3_lock_text", 1, False),
    (1, "amp_bf16", "lora_r7_lock_image", 2, False),
    (2, "fp32", "lock_image_bias_odd_total", 1, False),
    (2, "bf16", "lora_r1_bias", 2, True),
    (2, "amp_bf16", "lora_r3_lock_text", 1, False),
    (3, "fp32", "lora_r7_lock_image", 2, False),
    (3, "bf16", "lock_image_bias_odd_total", 1, True),
    (3, "amp_bf16", "lora_r1_bias", 2, False),
]


def _model(variant: str):
    from transformers import CLIPConfig, CLIPModel

    from vutrain.config import LoraConfig, ModelConfig
    from vutrain.model import ClipTrainModule, apply_lora, lock_towers

    r, lock_image, lock_text, bias = VARIANTS[variant]
    torch.manual_seed(0)
    common = dict(hidden_size=36, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    text = dict(common, vocab_size=101, max_position_embeddings=9, projection_dim=20)
    text.update(eos_token_id=100, bos_token_id=99, pad_token_id=0)
    vision = dict(common, image_size=16, patch_size=8, projection_dim=20)
    clip = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=20))
    cfg = ModelConfig(lock_image=lock_image, lock_text=lock_text)
    if r:
        cfg.lora = LoraConfig(enabled=True, r=r, alpha=2, target_modules=["q_proj", "v_proj", "fc1"])
        clip = apply_lora(clip, cfg)
    lock_towers(clip, cfg)
    return ClipTrainModule(clip, use_bias=bias)


class _Watch:
    """Records the trainable parameters and gradients of an engine that are not 16-byte aligned."""

    def __init__(self, engine, stage: int):
        from vutrain.param_alignment import trainable

        self.engine, self.stage = engine, stage
        self.named = trainable(engine.module)
        self.names = {id(p): n for n, p in self.named}
        self.bad: dict[str, set[str]] = {}
        self.grads_seen: set[str] = set()
        for mod in engine.module.modules():
            mod.register_forward_pre_hook(self._pre_forward)
        for _, p in self.named:
            p.register_post_accumulate_grad_hook(self._grad_done)  # after DeepSpeed's own hook

    def note(self, where: str, names) -> None:
        if names:
            self.bad.setdefault(where, set()).update(names)

    def params(self, where: str) -> None:
        from vutrain.param_alignment import misaligned

        if self.stage in (1, 2):  # ZeRO-3's partitioned parameters are empty until gathered
            self.note(where, misaligned(self.named))

    def _pre_forward(self, mod, _args):
        own = [(self.names[id(p)], p) for p in mod.parameters(recurse=False) if id(p) in self.names]
        self.note("forward", [n for n, p in own if p.numel() and p.data_ptr() % 16])

    def _grad_done(self, p):
        for grad in (p.grad, getattr(p, "grad_accum", None)):
            if grad is not None and grad.numel():
                self.grads_seen.add(self.names[id(p)])
                if grad.data_ptr() % 16:
                    self.note("gradient when complete", [self.names[id(p)]])

    def after_backward(self) -> None:
        from vutrain.param_alignment import misaligned

        self.note("param.grad after backward", misaligned((n, p.grad) for n, p in self.named))
        partitions = getattr(self.engine.optimizer, "averaged_gradients", None)
        if self.stage in (1, 2) and isinstance(partitions, dict):
            for group, grads in partitions.items():
                # A parameter split between ranks starts rank 1's partition mid-parameter, at
                # DeepSpeed's NCCL boundary (a multiple of 2 elements): a slice no matmul reads.
                split = self.engine.optimizer.first_offset[group] > 0
                named = [
                    (f"group {group} gradient {i}", g) for i, g in enumerate(grads or []) if i or not split
                ]
                self.note("reduced gradient partition", misaligned(named))


def _train(engine, watch: _Watch, precision: str, accum: int, steps: int) -> None:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    for _ in range(steps):
        for _ in range(accum):
            img, txt, scale, bias = engine(
                pixel_values=torch.randn(2, 3, 16, 16, dtype=dtype),
                input_ids=torch.randint(1, 99, (2, 9)),
                attention_mask=torch.ones(2, 9, dtype=torch.long),
            )
            loss = (img.float() @ txt.float().T).diagonal().sum() * scale.float()
            engine.backward(loss + bias.float() if bias is not None else loss)
            watch.after_backward()
            engine.step()
        watch.params("after an optimizer step")


def _case(stage, precision, variant, accum, resume, world, run_dir) -> dict:
    from vutrain.checkpoint import checkpoints_dir, load_checkpoint, save_checkpoint, tag_for
    from vutrain.config import TrainConfig
    from vutrain.engine import build_engine

    cfg = TrainConfig(
        micro_batch_size=2, zero_stage=stage, precision=precision, warmup_steps=0, grad_accum_steps=accum
    )
    engine = build_engine(_model(variant), cfg, world, torch.device("cpu"))
    watch = _Watch(engine, stage)
    watch.params("after the build")
    _train(engine, watch, precision, accum, steps=2)
    if resume:
        rank = torch.distributed.get_rank()
        save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=2)
        engine = build_engine(_model(variant), cfg, world, torch.device("cpu"))
        load_checkpoint(engine, checkpoints_dir(run_dir), tag_for(2), rank)
        resumed = _Watch(engine, stage)
        resumed.params("after a checkpoint load")
        _train(engine, resumed, precision, accum, steps=1)
        for where, names in resumed.bad.items():
            watch.note(f"resumed: {where}", names)
    return {
        "trainable": len(watch.named),
        "odd_sized": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for _, p in watch.named) % 2,
        "grads_seen": len(watch.grads_seen),
        "bad": {where: sorted(names) for where, names in watch.bad.items()},
    }


def _all_cases(rank: int, world: int, root: str) -> list[dict]:
    from vutrain.distributed import init_distributed, resolve_dist_env

    init_distributed(resolve_dist_env())
    return [_case(*case, world, os.path.join(root, str(i))) for i, case in enumerate(CASES)]


@pytest.mark.slow  # spawns 2 rank processes
def test_lora_locked_towers_bias_accumulation_and_resume_stay_16_byte_aligned(tmp_path):
    results = run_distributed(_all_cases, 2, str(tmp_path), init_process_group=False, timeout_s=600)
    for rank, per_case in enumerate(results):
        for (stage, precision, variant, accum, resume), res in zip(CASES, per_case):
            where = f"rank {rank}, ZeRO-{stage}, {precision}, {variant}, accum {accum}, resume {resume}"
            assert res["bad"] == {}, f"{where}: misaligned: {res['bad']}"
            assert res["grads_seen"] == res["trainable"] > 0, where
            if variant == "lock_image_bias_odd_total":
                assert res["odd_sized"] == 1, f"{where}: the trainable total should be odd"


def _save_then_load(rank: int, world: int, run_dir: str, save: bool) -> dict:
    from vutrain.checkpoint import checkpoints_dir, load_checkpoint, save_checkpoint, tag_for
    from vutrain.config import TrainConfig
    from vutrain.distributed import init_distributed, resolve_dist_env
    from vutrain.engine import build_engine

    init_distributed(resolve_dist_env())
    # The same global batch of 4 on 2 ranks and on 1, so the resume reshapes without a question.
    cfg = TrainConfig(micro_batch_size=4 // world, zero_stage=2, precision="bf16", warmup_steps=0)
    engine = build_engine(_model("lora_r1_bias"), cfg, world, torch.device("cpu"))
    watch = _Watch(engine, 2)
    if save:
        _train(engine, watch, "bf16", 1, steps=1)
        save_checkpoint(engine, run_dir, 1, {"step": 1, "data": {}}, rank, keep=2)
    else:
        load_checkpoint(engine, checkpoints_dir(run_dir), tag_for(1), rank)
        watch.params("after a checkpoint load from 2 ranks")
        _train(engine, watch, "bf16", 1, steps=1)
    return {"bad": {where: sorted(names) for where, names in watch.bad.items()}}


@pytest.mark.slow  # spawns rank processes
def test_resume_on_another_world_size_stays_16_byte_aligned(tmp_path):
    saved = run_distributed(_save_then_load, 2, str(tmp_path), True, init_process_group=False, timeout_s=300)
    loaded = run_distributed(
        _save_then_load, 1, str(tmp_path), False, init_process_group=False, timeout_s=300
    )
    assert [r["bad"] for r in saved + loaded] == [{}, {}, {}]
