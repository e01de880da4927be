"""``train.global_batch_size``: derive the gradient accumulation from the world size.

A job requeued by SLURM on another number of nodes (``sbatch -N 1-2``) or resumed by hand on
another GPU count keeps its global batch without editing the command: the accumulation steps
follow from ``global_batch_size / (micro_batch_size x world_size)``.
"""

from __future__ import annotations

import dataclasses

from vutrain.config import ConfigError, RunConfig, TrainConfig


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
    derived = t.global_batch_size // per_step
    check_explicit_accumulation(t, derived, world_size)
    train = dataclasses.replace(t, grad_accum_steps=derived)
    return dataclasses.replace(cfg, train=train)


def check_explicit_accumulation(t: TrainConfig, derived: int, world_size: int) -> None:
    """ConfigError where train.grad_accum_steps was set to another value than the derived one.

    Replacing it silently trained another accumulation (and negatives per GradCache step) than
    the user asked for. The default (1) cannot be told from a 1 typed by the user, so 1 yields.
    """
    if t.grad_accum_steps in (1, derived):
        return
    raise ConfigError(
        f"train.grad_accum_steps={t.grad_accum_steps} conflicts with train.global_batch_size="
        f"{t.global_batch_size}, which gives {derived} on {world_size} ranks (train.micro_batch_size "
        f"{t.micro_batch_size} x world {world_size} x {derived}); drop train.grad_accum_steps "
        "(it is derived) or train.global_batch_size"
    )


def as_given(cfg: RunConfig) -> RunConfig:
    """``cfg`` as the run's config.yaml keeps it: with ``train.global_batch_size`` set, the
    accumulation it derived for this world size stays out (the start-up log names it). Saved, a
    derived 2 conflicted with the derivation on another world size when the file was reused as
    ``--config`` (a requeue on fewer nodes)."""
    if not cfg.train.global_batch_size:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum_steps=1))
