"""Load a ZeRO-0 checkpoint written under the other of fp32 and 16-bit training (bf16/fp16).

ZeRO-0 keeps the whole optimizer in ``mp_rank_00_model_states.pt``, in the form of the engine
that wrote it: fp32 runs save the torch optimizer's own state dict, bf16/fp16 runs DeepSpeed's
``FP16_UnfusedOptimizer`` wrapper (loss scale, the inner optimizer's state, fp32 master weights).
An fp16 run whose ds_config names an Adam optimizer on a GPU saves the state of the fused
``FP16_Optimizer`` (flat masters and moments, ``fp32_groups_flat``): it resumes only in that same
form, and any other is refused in one line (that optimizer needs a GPU, so no translation of it
could be tested here).
DeepSpeed loads either only into an engine of the same form, so changing ``train.precision`` on
resume (what the non-finite-loss error suggests) failed with "KeyError: 'param_groups'" or
"'dynamic_loss_scale'". ZeRO-1/2/3 tags take the universal checkpoint instead (checkpoint_reshape).

Here the engine loads the weights and LR schedule itself, then gets the inner optimizer state
(Adam moments and step) and the fp32 master weights, translated: the result is what the saved
run held in fp32, exactly. A 16-bit engine starts with a fresh loss scale. fp16 <-> bf16 takes the
same way: DeepSpeed's own load would carry fp16's dynamic loss scale (2**16) into a bf16 run and
bf16's static scale of 1 into an fp16 one (its gradients underflow, nothing rescales). The
optimizer keeps this run's settings (train.lr's schedule, weight_decay, betas, eps), as
engine.keep_settings_on_load does for a load of the same precision.
"""

from __future__ import annotations

import os

import torch

from vutrain.checkpoint_reshape import ResumeShapeError

MODEL_FILE = "mp_rank_00_model_states.pt"


def _wrapped(optimizer_state) -> bool:
    return isinstance(optimizer_state, dict) and "fp32_groups" in optimizer_state


def _engine_wrapped(engine) -> bool:
    return isinstance(getattr(engine.optimizer, "fp32_groups", None), list)


def _fused(optimizer_state) -> bool:
    """DeepSpeed's fused FP16_Optimizer (around a ds_config's FusedAdam, on a GPU): one flat fp32
    master per group, and an inner optimizer that holds one flat parameter per group."""
    return isinstance(optimizer_state, dict) and "fp32_groups_flat" in optimizer_state


def _engine_fused(engine) -> bool:
    return isinstance(getattr(engine.optimizer, "fp32_groups_flat", None), list)


def load_zero0(engine, ckpt_dir: str, tag: str):
    """``engine.load_checkpoint`` for a ZeRO-0 tag, across a precision change; returns its path."""
    tag_dir = os.path.join(ckpt_dir, tag)
    saved = torch.load(os.path.join(tag_dir, MODEL_FILE), map_location="cpu", weights_only=False)
    saved_optimizer = saved.get("optimizer")
    if saved_optimizer is None or _same_form(engine, saved_optimizer, saved["module"]):
        load_path, _ = engine.load_checkpoint(
            ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        return load_path
    if _fused(saved_optimizer) or _engine_fused(engine):
        # Its flat masters and flat Adam moments were read as a per-parameter state: KeyError
        # 'param_groups' (or 'dynamic_loss_scale') after the whole start-up. Not translated: the
        # fused optimizer needs a GPU, so no CPU test could check a translation bit for bit.
        side = "it was written" if _fused(saved_optimizer) else "this run trains"
        raise ResumeShapeError(
            f"{tag_dir} cannot be resumed under another train.precision or optimizer with ZeRO-0: "
            f"{side} with DeepSpeed's fused fp16 optimizer (a ds_config Adam on a GPU), whose state "
            "vutrain does not translate: resume with the train.precision and train.ds_config that wrote it"
        )
    if not _engine_wrapped(engine) and not isinstance(engine.optimizer, torch.optim.Optimizer):
        raise ResumeShapeError(
            f"{tag_dir} was written under another train.precision with ZeRO-0 and this run's "
            f"optimizer ({type(engine.optimizer).__name__}) cannot take its state: resume with the "
            "precision that wrote it, or with train.zero_stage 1 or 2"
        )
    load_path, _ = engine.load_checkpoint(
        ckpt_dir, tag=tag, load_optimizer_states=False, load_lr_scheduler_states=True
    )
    if load_path is None:
        return None
    if _wrapped(saved_optimizer):
        inner, masters = saved_optimizer["optimizer_state_dict"], saved_optimizer["fp32_groups"]
    else:
        inner, masters = saved_optimizer, _masters_from_module(engine, saved["module"])
    target = engine.optimizer.optimizer if _engine_wrapped(engine) else engine.optimizer
    groups = engine.optimizer.fp32_groups if _engine_wrapped(engine) else _param_groups(engine.optimizer)
    _check_shapes(tag_dir, masters, groups)
    # The load below puts the saved run's param-group settings (lr, weight_decay, betas, eps) in
    # place of this run's, which the engine's load has just set (engine.keep_settings_on_load).
    settings = [{k: v for k, v in group.items() if k != "params"} for group in target.param_groups]
    target.load_state_dict(inner)
    for group, kept in zip(target.param_groups, settings, strict=True):
        group.update(kept)
    if engine.lr_scheduler is not None:  # the LR of the next step, at the restored schedule position
        for group, lr in zip(target.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    with torch.no_grad():
        for group, saved_group in zip(groups, masters, strict=True):
            for param, value in zip(group, saved_group, strict=True):
                param.copy_(value)
        if _engine_wrapped(engine):  # the 16-bit weights the forward uses, from the exact masters
            for group, saved_group in zip(engine.optimizer.fp16_groups, masters, strict=True):
                for param, value in zip(group, saved_group, strict=True):
                    param.copy_(value)
    return load_path


def _same_form(engine, saved_optimizer: dict, module_state: dict) -> bool:
    """Whether DeepSpeed's own load fits: both fp32 (or amp_bf16), or both of one 16-bit dtype
    with one wrapper (unfused, or fused)."""
    if _wrapped(saved_optimizer) != _engine_wrapped(engine):
        return False
    if _fused(saved_optimizer) != _engine_fused(engine):
        return False
    if not _engine_wrapped(engine) and not _engine_fused(engine):
        return True
    names = {id(p): name for name, p in engine.module.named_parameters()}
    first = engine.optimizer.fp16_groups[0][0]
    saved = module_state.get(names[id(first)])
    return saved is None or saved.dtype == first.dtype


def _param_groups(optimizer: torch.optim.Optimizer) -> list[list[torch.Tensor]]:
    return [group["params"] for group in optimizer.param_groups]


def _masters_from_module(engine, module_state: dict) -> list[list[torch.Tensor]]:
    """The fp32 weights an fp32 run saved, in the order of this engine's optimizer groups."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [[module_state[names[id(p)]] for p in group] for group in engine.optimizer.fp16_groups]


def _check_shapes(tag_dir: str, masters, groups) -> None:
    saved = [[tuple(t.shape) for t in group] for group in masters]
    ours = [[tuple(t.shape) for t in group] for group in groups]
    if saved != ours:
        raise ResumeShapeError(
            f"{tag_dir} holds optimizer groups of other shapes than this run's model: resume it "
            "with the model and LoRA settings that wrote it"
        )
