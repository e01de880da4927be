"""Small real DeepSpeed engines for the checkpoint tests on CPU gloo ranks (`helpers_dist`): a module
wrapped with vutrain's optimizer, scheduler and DeepSpeed config at a ZeRO stage, and the full
state of its parameters gathered back from the ZeRO partitions for exact comparisons."""

from __future__ import annotations


def small_engine(module, stage: int, world: int, micro: int, grad_accum: int = 1, precision: str = "fp32"):
    """`module` as a DeepSpeed engine at ZeRO `stage` and train.precision `precision` for `world`
    ranks: 10 steps, 2 of warm-up, LR 1e-2, `micro` samples a rank a micro-step, `grad_accum`
    micro-steps a step."""
    import deepspeed

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    cfg = TrainConfig(
        max_steps=10,
        micro_batch_size=micro,
        grad_accum_steps=grad_accum,
        zero_stage=stage,
        warmup_steps=2,
        lr=1e-2,
        precision=precision,
    )
    optimizer, scheduler = build_optimizer(module, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=build_ds_config(cfg, world)
    )
    return engine


def full_state(engine) -> dict:
    """Every trainable parameter's full fp32 value and Adam moments, gathered from the ZeRO
    partitions, every frozen parameter's value, and the Adam steps, LR and global step."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19 (ZeRO-1/2) links each parameter to its Adam state after the first
        # param group's first step, before the other groups have any state: relink now.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            out[name] = [safe_get_full_fp32_param(p).clone()] + [
                safe_get_full_optimizer_state(p, key).clone() for key in ("exp_avg", "exp_avg_sq")
            ]
        else:
            with deepspeed.zero.GatheredParameters([p]):
                out[name] = [p.detach().float().clone()]
    out["_adam_steps"] = sorted({float(s["step"]) for s in engine.optimizer.optimizer.state.values()})
    out["_lr"], out["_global_steps"] = engine.get_lr(), engine.global_steps
    return out
