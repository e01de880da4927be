"""SLURM's pre-emption warning (SIGUSR1) sent to this process just before a chosen training step of
an in-process Trainer (tests/inprocess_trainer.py), from an on_trainer hook: the run saves and
raises Preempted at the next step where its ranks agree to stop."""

from __future__ import annotations

import os
import signal


def signal_before_step(trainer, step: int) -> None:
    """Wrap `trainer.train_step` so that SIGUSR1 reaches this process as step `step` (1-based, the
    step about to run) starts, once per Trainer: the signal handler the Trainer installs takes it
    as SLURM's warning would arrive, between two steps."""
    step_fn = trainer.train_step

    def wrapped():
        if trainer.step + 1 == step:
            os.kill(os.getpid(), signal.SIGUSR1)
        return step_fn()

    trainer.train_step = wrapped
