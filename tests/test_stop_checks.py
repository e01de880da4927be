"""The stop conditions are checked after every step, whatever train.log_every is (trainer.StopCheck).

Before, a pre-emption signal and the non-finite streak were read only on logging steps: with
train.log_every larger than the run, a SIGUSR1 never stopped it (SLURM's 120 s warning passed), and a
run of non-finite losses that reached train.max_nonfinite_steps was forgotten when a good step
followed before the next logging step. A world-1 Trainer in this process (tests/inprocess_trainer.py).
"""

from __future__ import annotations

import json
import signal

import pytest
import torch
from step_signals import before_steps, signal_before_step

from inprocess_trainer import train

QUIET = dict(eval__every=0, data__val_shards="", train__checkpoint_every=0)


def test_preemption_stops_a_run_whose_log_every_exceeds_its_steps(tiny_shards, tmp_path, single_process):
    from vutrain.trainer import Preempted

    run_dir = tmp_path / "run"

    def hook(trainer):
        signal_before_step(trainer, 2)

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(Preempted) as raised:
        train(tiny_shards, str(run_dir), steps=8, on_trainer=hook, train__log_every=100, **QUIET)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # put back on the way out
    # Signalled before step 2: agreed in step 2's all-reduce, read after step 3.
    assert raised.value.step <= 4, raised.value.step
    marker = json.loads((run_dir / "preempted.json").read_text())
    assert marker == {"step": raised.value.step, "signal": "SIGUSR1"}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{raised.value.step:08d}"
    assert not (run_dir / "done.json").exists()


def test_preemption_in_the_last_step_checkpoints_before_the_final_eval(tiny_shards, tmp_path, single_process):
    """SIGUSR1 during the last step with train.log_every > 1: the stop is first read after the loop,
    where it was dropped: the run went on to the final eval (which may outlast SLURM's 120 s
    warning, and a job killed at its time limit is not requeued) before any checkpoint. Now it
    stops as in the loop (as it did with log_every=1), and the resumed run does the final eval."""
    from vutrain.metrics import read_metrics
    from vutrain.trainer import Preempted

    run_dir = tmp_path / "run"
    kept = dict(train__log_every=100, train__checkpoint_every=0, eval__every=0)

    def hook(trainer):
        signal_before_step(trainer, 4)

    with pytest.raises(Preempted) as raised:
        train(tiny_shards, str(run_dir), steps=4, on_trainer=hook, **kept)
    assert raised.value.step == 4
    assert json.loads((run_dir / "preempted.json").read_text()) == {"step": 4, "signal": "SIGUSR1"}
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    assert not (run_dir / "done.json").exists()
    assert not any("eval/i2t_r1" in row for row in read_metrics(str(run_dir)))

    metrics = train(tiny_shards, str(run_dir), steps=4, **kept)  # the requeued job: the final eval only
    assert "eval/i2t_r1" in metrics and (run_dir / "done.json").exists()
    assert [row["step"] for row in read_metrics(str(run_dir)) if "eval/i2t_r1" in row] == [4]


def _nan_loss(trainer) -> None:
    inner = trainer.loss_fn.forward

    def forward(*args, **kwargs):
        return inner(*args, **kwargs) * torch.tensor(float("nan"))

    trainer.loss_fn.forward = forward


def test_nonfinite_streak_between_logging_steps_stops_the_run(tiny_shards, tmp_path, single_process):
    """Non-finite losses at steps 2 and 3 (the limit is 2), a good step 4: the run stops; before, the
    only read (at step 4, the logging step) found the streak reset to 0 and the run finished."""
    from vutrain.trainer import NonFiniteLossError

    def hook(trainer):
        originals = {"forward": trainer.loss_fn.forward}
        before_steps(trainer, {2}, _nan_loss)
        before_steps(trainer, {4}, lambda t: setattr(t.loss_fn, "forward", originals["forward"]))

    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row"):
        train(
            tiny_shards,
            str(tmp_path / "run"),
            steps=4,
            on_trainer=hook,
            train__log_every=4,
            train__max_nonfinite_steps=2,
            **QUIET,
        )


def test_stop_check_reads_the_previous_steps_values_unless_asked_for_now():
    """The deferred read: each check returns what the step before copied (agreed values on every
    rank, so all ranks decide alike), the worst streak is kept even after a good loss resets it."""
    from vutrain.nonfinite import NonFiniteGuard
    from vutrain.trainer import StopCheck

    guard = NonFiniteGuard(torch.nn.Linear(2, 2), torch.device("cpu"), world_size=1)
    check = StopCheck(guard, torch.device("cpu"))

    def step(loss: float, stop: bool = False) -> None:
        if stop:
            guard.request_stop()
        guard.agree(torch.tensor(loss))
        check.note_agreed()

    step(float("nan"))
    assert check.check() == (0, False)  # nothing copied before the first step
    step(float("nan"))
    assert check.check() == (1, False)  # the first step's copy
    step(1.0, stop=True)  # a good loss resets the guard's streak, not the worst one seen
    assert check.check() == (2, False)
    assert check.check(now=True) == (2, True)
    step(1.0)
    assert check.check() == (2, True)


@pytest.mark.slow
def test_nonfinite_stop_is_one_line_from_the_entry_script(tiny_shards, tmp_path):
    """train.py re-raised NonFiniteLossError once training had started: a traceback from every
    rank around the message that names the last good checkpoint. Now rank 0 prints it, exit 1."""
    import train_runner as tr

    overrides = tr.base_overrides(
        tiny_shards, str(tmp_path / "run"), 8, train__lr=1e30, train__max_nonfinite_steps=2, eval__every=0
    )
    proc = tr.run("python", overrides)
    assert proc.returncode == 1, tr.describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 non-finite losses in a row" in errors[0], tr.describe(proc)
    assert "Last good checkpoint" in errors[0] and "Traceback" not in proc.stderr


def test_logged_step_time_is_the_mean_over_the_logging_interval(tiny_shards, tmp_path, single_process):
    """train/step_time (and samples/s) timed the logging step alone: on a GPU the host runs a step
    ahead, so that step's wait held the step before too, and a slow step between logging steps
    never showed. It is the mean over the interval now: a 3 s step 1 shows in step 2's row."""
    import time

    from vutrain.metrics import read_metrics

    run_dir = tmp_path / "run"

    def hook(trainer):
        before_steps(trainer, {1}, lambda t: time.sleep(3.0))

    train(tiny_shards, str(run_dir), steps=2, on_trainer=hook, train__log_every=2, **QUIET)
    (row,) = [r for r in read_metrics(str(run_dir)) if "train/step_time" in r]
    assert row["step"] == 2 and row["train/step_time"] >= 1.5, row
