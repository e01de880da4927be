"""Review tests of `vutrain/train.py`'s entry point: a Ctrl-C while it trains (the real Trainer in
this process, a real SIGINT)."""

import json
import os
import signal
import threading
import time

import pytest

from inprocess_trainer import overrides


def _first_step_logged(metrics: str, deadline_s: float, stop: threading.Event) -> None:
    """Return once ``metrics`` holds a row (or main() has returned, or the deadline passed)."""
    deadline = time.monotonic() + deadline_s
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            with open(metrics, encoding="utf-8") as fh:
                if any("train/loss" in json.loads(line) for line in fh if line.strip()):
                    return
        except (OSError, ValueError):  # not there yet, or a row half written
            pass
        stop.wait(0.2)


def test_ctrl_c_while_training_is_one_line_and_exit_130(tiny_shards, tmp_path, single_process, capsys):
    """A Ctrl-C while training was a page of `[rank0]:` traceback ending in KeyboardInterrupt. Now
    main() returns 130 (the shell's code for SIGINT) with one line naming the step reached and what
    the same command does next (it writes no checkpoint, unlike SIGTERM)."""
    from vutrain.train import main

    run_dir = str(tmp_path / "run")
    args = overrides(tiny_shards, run_dir, 100000, eval__every=0, train__checkpoint_every=0)
    stop = threading.Event()

    def press_ctrl_c() -> None:
        _first_step_logged(os.path.join(run_dir, "metrics.jsonl"), 240, stop)
        if not stop.is_set():
            os.kill(os.getpid(), signal.SIGINT)  # Python delivers it to the main thread: main()

    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    try:
        code = main(["--config", "tiny", *args])
    except KeyboardInterrupt:
        pytest.fail("the Ctrl-C left main() as a KeyboardInterrupt traceback")
    finally:
        stop.set()
        presser.join(timeout=60)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 130, err[-2000:]
    assert "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert errors[0].startswith("error: stopped by Ctrl-C (SIGINT) at step "), errors
    assert f"resumes from the newest checkpoint in {run_dir}/checkpoints" in errors[0]
    assert "send SIGTERM instead" in errors[0]
