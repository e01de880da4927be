"""The DeepSpeed engines of the resume-with-another-shape tests: one module built by vutrain's
optimizer, scheduler and DeepSpeed config at a ZeRO stage and a train.precision, with the same
global batch on any world size, so a checkpoint written on 2 ranks resumes on 1 as the same run.
(`zero_engines.small_engine` without a train.precision; one function would serve both.)"""

from __future__ import annotations

GLOBAL_BATCH = 4  # micro batch 2: 1 micro-step a step on 2 ranks, 2 on 1


def reshape_engine(make_module, stage: int, precision: str, world: int):
    """`make_module()` (called after torch.manual_seed(0)) as a DeepSpeed engine at ZeRO `stage` and
    train.precision `precision` for `world` ranks: 10 steps, 2 of warm-up, LR 1e-2, micro batch 2,
    global batch GLOBAL_BATCH."""
    import deepspeed
    import torch

    from vutrain.config import TrainConfig
    from vutrain.ds_config import build_ds_config
    from vutrain.optim import build_optimizer

    torch.manual_seed(0)
    module = make_module()
    cfg = TrainConfig(
        max_steps=10,
        micro_batch_size=2,
        grad_accum_steps=GLOBAL_BATCH // (2 * world),
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
