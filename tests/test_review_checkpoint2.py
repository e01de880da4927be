"""Checkpoint review 2: a resume under another model (LoRA on/off, another shape, a locked part)
stops with one line that says what to do, on the same and on another world size (real DeepSpeed
engines on gloo, real peft LoRA, real checkpoint files)."""

from __future__ import annotations

import os

import torch
from tiny_modules import TwoLayer
from torch import nn

from helpers_dist import run_distributed


def _module(hidden: int = 12, lora: bool = False, frozen: bool = False) -> nn.Module:
    torch.manual_seed(0)
    module = TwoLayer(hidden)
    if lora:  # as model.lora.enabled: adapters on `a`, the base weights frozen
        from peft import LoraConfig, inject_adapter_in_model

        module = inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["a"]), module)
        for name, param in module.named_parameters():
            param.requires_grad = "lora_" in name
    if frozen:  # as model.lock_image: one part no longer trains
        module.a.requires_grad_(False)
    return module


def _engine(module: nn.Module, stage: int, micro: int = 2):
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    world = torch.distributed.get_world_size()
    cfg = TrainConfig(max_steps=10, micro_batch_size=micro, zero_stage=stage, warmup_steps=2, lr=1e-2)
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, world)
    )
    return engine


def _save(rank, run_dir, stage):
    from vutrain import checkpoint as ckpt

    engine = _engine(_module(), stage)
    for _ in range(2):
        engine.backward(engine(torch.randn(2, 8)))
        engine.step()
    ckpt.save_checkpoint(engine, run_dir, 2, {"step": 2, "data": {}}, rank, keep=1)


def _resume(rank, run_dir, stage, micro=2, **model):
    """The step resumed at, or the one-line ResumeShapeError."""
    from vutrain import checkpoint as ckpt
    from vutrain.checkpoint_reshape import ResumeShapeError

    engine = _engine(_module(**model), stage, micro)
    try:
        target = ckpt.resolve_resume("auto", run_dir, verbose=False)
        return f"step {ckpt.load_checkpoint(engine, *target, rank=rank)['step']}"
    except ResumeShapeError as exc:
        return str(exc)


def _save_then_resume_with_other_models(rank, world, root):
    import deepspeed

    deepspeed.init_distributed("gloo")
    outcomes = {}
    for stage in (2, 3):
        run_dir = os.path.join(root, f"z{stage}")
        _save(rank, run_dir, stage)
        for name, model in {
            "same": {},
            "lora": {"lora": True},
            "wider": {"hidden": 16},
            "frozen": {"frozen": True},
        }.items():
            outcomes[stage, name] = _resume(rank, run_dir, stage, **model)
    return outcomes


def test_a_resume_with_another_model_says_which_setting_to_restore(tmp_path):
    """model.lora.enabled turned on, another shape (model.image_size, a preset), a locked tower:
    before, "DeepSpeed could not load ...: RuntimeError: Error(s) in loading state_dict for
    ClipTrainModule:; point train.resume at an older checkpoint" (or "KeyError: 'clip.vision_model...'",
    or at ZeRO-3 "The size of tensor a (1297408) must match ..."), advice that fails the same way.
    Now one line naming what differs, with an example, and the two ways out; the same model resumes."""
    outcomes = run_distributed(
        _save_then_resume_with_other_models, 1, str(tmp_path), init_process_group=False
    )[0]
    for stage in (2, 3):
        tag_dir = os.path.join(str(tmp_path), f"z{stage}", "checkpoints", "step_00000002")
        assert outcomes[stage, "same"] == "step 2"
        for name in ("lora", "wider", "frozen"):
            message = outcomes[stage, name]
            assert message.startswith(f"{tag_dir} holds another model than this run builds ("), message
            assert "\n" not in message and "older checkpoint" not in message
            assert message.endswith(
                "resume with the settings that wrote it (in that run's config.yaml: model.preset, "
                "model.name_or_path, model.image_size, model.context_length, model.vocab_size, "
                "model.lora.*, model.lock_image, model.lock_text, loss.name), or start afresh with "
                "train.resume=never or another output_dir"
            ), message
        lora = outcomes[stage, "lora"]
        assert "2 parameters of the checkpoint are not in this model, e.g. a.weight" in lora, lora
        assert "4 parameters of this model are not in the checkpoint, e.g. a.base_layer.weight" in lora
        wider = outcomes[stage, "wider"]
        assert "3 of another shape, e.g. a.weight [12, 8] there, [16, 8] here" in wider, wider
        assert (
            "2 trained there and frozen here or the reverse, e.g. a.weight trained there"
            in (outcomes[stage, "frozen"])
        )


def _save_on_one_rank(rank, world, run_dir):
    import deepspeed

    deepspeed.init_distributed("gloo")
    _save(rank, run_dir, 2)


def _resume_wider_on_two_ranks(rank, world, run_dir):
    import deepspeed

    deepspeed.init_distributed("gloo")
    message = _resume(rank, run_dir, 2, micro=1, hidden=16)
    tag_dir = os.path.join(run_dir, "checkpoints", "step_00000002")
    return message, sorted(os.listdir(tag_dir))


def test_a_resume_with_another_model_on_another_world_size_stops_before_converting(tmp_path):
    """World 1 -> 2 (same global batch) with another model: before, rank 0 first wrote the universal
    copy (a second copy of the weights and moments on disk) and then every rank failed inside
    DeepSpeed's universal loader with a traceback. Now every rank stops with the same one line
    before anything is converted."""
    run_dir = str(tmp_path / "run")
    run_distributed(_save_on_one_rank, 1, run_dir, init_process_group=False)
    results = run_distributed(_resume_wider_on_two_ranks, 2, run_dir, init_process_group=False)
    messages = [message for message, _ in results]
    assert messages[0] == messages[1], messages
    assert (
        "holds another model than this run builds (3 of another shape, e.g. a.weight [12, 8] there"
        in (messages[0])
    )
    assert not any(f.startswith("universal") for f in results[0][1]), results[0][1]
