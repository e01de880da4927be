"""Something done to an in-process Trainer (tests/inprocess_trainer.py) just before chosen training
steps, from an on_trainer hook: most often SLURM's pre-emption warning (SIGUSR1) sent to this
process, after which the run saves and raises Preempted at the next step where its ranks agree to
stop; or a fault (a NaN loss, a crash, a slow step) put in before a step."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection


def before_steps(trainer, steps: int | Collection[int] | None, action: Callable) -> None:
    """Wrap `trainer.train_step` so that `action(trainer)` runs as each 1-based step in `steps`
    (one step, a collection of them, or None for every step) is about to run. Wrapping again adds
    to what is there: the last wrap runs first."""
    at = {steps} if isinstance(steps, int) else steps
    step_fn = trainer.train_step

    def wrapped():
        if at is None or trainer.step + 1 in at:
            action(trainer)
        return step_fn()

    trainer.train_step = wrapped


def send_preemption_warning(_trainer=None) -> None:
    """SIGUSR1 to this process, as SLURM's warning arrives: the signal handler the Trainer installs
    takes it between two steps."""
    os.kill(os.getpid(), signal.SIGUSR1)


def signal_before_step(trainer, step: int) -> None:
    """SIGUSR1 to this process as step `step` (1-based, the step about to run) starts."""
    before_steps(trainer, step, send_preemption_warning)
