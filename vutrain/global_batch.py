"""``train.global_batch_size``: derive the gradient accumulation from the world size.

A job requeued by SLURM on another number of nodes (``sbatch -N 1-2``) or resumed by hand on
another GPU count keeps its global batch without editing the command: the accumulation steps
follow from ``global_batch_size / (micro_batch_size x world_size)``.
"""

from __future__ import annotations

import dataclasses

from vutrain.config import ConfigError, RunConfig


def with_global_batch(cfg: RunConfig, world_size: int) -> RunConfig:
    """``cfg`` with ``train.grad_accum_steps`` derived from ``train.global_batch_size`` (if set)."""
    t = cfg.train
    if not t.global_batch_size:
        return cfg
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {t.micro_batch_size} x world {world_size}; "
            "change train.micro_batch_size or the number of ranks"
        )
    train = dataclasses.replace(t, grad_accum_steps=t.global_batch_size // per_step)
    return dataclasses.replace(cfg, train=train)
