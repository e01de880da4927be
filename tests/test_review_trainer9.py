"""Review of the training loop's signal handling (world-1 Trainer in this process)."""

from __future__ import annotations

import logging
import os
import signal
import threading

from inprocess_trainer import train


def test_a_run_in_another_thread_trains_and_warns_that_signals_are_not_caught(
    tiny_shards, tmp_path, single_process, caplog
):
    """Trainer.train() from a thread other than the main one (a tuner's trial, an app's worker
    thread) failed after the whole build with "signal only works in main thread": signal handlers
    can be installed from the main thread alone. It trains now, warns that a pre-emption signal
    will not save a checkpoint there, and leaves the process's handlers as they were."""
    run_dir = str(tmp_path / "run")
    outcome: dict = {}
    before = signal.getsignal(signal.SIGTERM)

    def run() -> None:
        try:
            outcome["metrics"] = train(tiny_shards, run_dir, steps=2, eval__every=0)
        except Exception as exc:  # re-raised below, in the test's thread
            outcome["error"] = exc

    with caplog.at_level(logging.WARNING, logger="vutrain"):
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    assert "error" not in outcome, outcome.get("error")
    assert "eval/i2t_r1" in outcome["metrics"]
    assert os.path.exists(os.path.join(run_dir, "done.json"))
    assert "outside the main thread" in caplog.text
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_trainer_built_directly_trains_the_global_batch(tiny_shards, tmp_path, single_process):
    """`train.global_batch_size` was derived by `vutrain/train.py` alone: a Trainer built directly
    (a notebook, a benchmark, a tuner) trained micro x world samples per step, half the 32 asked
    for here, while config.yaml said 32. Now the engine accumulates 2 micro-batches of 16."""
    seen: dict = {}

    def engine_batch(trainer) -> None:
        seen["accum"] = trainer.engine.gradient_accumulation_steps()
        seen["batch"] = trainer.engine.train_batch_size()

    train(
        tiny_shards,
        str(tmp_path / "run"),
        steps=1,
        on_trainer=engine_batch,
        eval__every=0,
        train__global_batch_size=32,
        data__val_shards="",
    )
    assert seen == {"accum": 2, "batch": 32}
