"""Review tests of `vutrain/train.py`'s entry point: a Ctrl-C (SIGINT) to a rank other than 0.

Only rank 0 said "stopped by Ctrl-C": a SIGINT to one other rank alone (`kill -INT PID`, a
scheduler's signal to one task) ended it with exit 130 and an empty log, while rank 0 died of
gloo's "Connection closed by peer ... Check the logs of the remote worker". Seen in a real 2-rank
CPU run on 2026-12-07: rank 1's stderr was empty. Now that rank says one tagged line.
"""

from __future__ import annotations

import subprocess
import sys

from worker_ports import free_port

from vutrain.logging_setup import RANK_VARIABLES

import train_runner

# The entry point, with a pause where the ranks are resolved and the config read (the model check,
# just before the rendezvous): it says so on stdout and waits on stdin, where the SIGINT finds it.
WRAPPER = """
import sys

from vutrain.logging_setup import setup_logging

setup_logging()  # what main() does first: before vutrain.model imports transformers
import vutrain.model


def check_model_config_then_wait(model):
    print("at the model check", flush=True)
    sys.stdin.readline()


vutrain.model.check_model_config = check_model_config_then_wait
from vutrain.train import main

sys.exit(main())
"""


def wait_for_line(stream, wanted: str) -> None:
    """Read `stream` up to the line `wanted` (DeepSpeed prints to stdout before it)."""
    for line in stream:
        if line == wanted:
            return
    raise AssertionError(f"the rank ended before it printed {wanted!r}")


def interrupted_rank(tmp_path, rank: int) -> tuple[int, list[str]]:
    """(exit code, stderr lines) of train.py as rank `rank` of 2 given a SIGINT before training."""
    from vutrain.data.synthetic import write_synthetic

    shards = write_synthetic(str(tmp_path / "data"), 16, 8, image_size=16, val_samples=8, seed=0)
    overrides = train_runner.base_overrides(shards, str(tmp_path / "run"), 2, data__num_workers=0)
    env = {k: v for k, v in train_runner.env().items() if k not in RANK_VARIABLES}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    wrapper = tmp_path / "train_wrapper.py"
    wrapper.write_text(WRAPPER)
    proc = subprocess.Popen(
        [sys.executable, str(wrapper), "--config", train_runner.TINY, *overrides],
        env=env,
        cwd=train_runner.REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # rank 0's info lines before the pause are a few, far from filling the stderr pipe
    try:
        wait_for_line(proc.stdout, "at the model check\n")
        proc.send_signal(2)  # SIGINT, as `kill -INT PID` sends it
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err.splitlines()


def test_a_ctrl_c_to_rank_1_alone_says_so_in_one_tagged_line(tmp_path):
    code, lines = interrupted_rank(tmp_path, 1)
    assert code == 130, lines
    assert lines == ["error: rank 1: stopped by Ctrl-C (SIGINT) before training started"], lines


def test_rank_0_still_says_what_a_rerun_does(tmp_path):
    """Rank 0's line is the full one (its library notices, rank 0's alone, may come before it)."""
    code, lines = interrupted_rank(tmp_path, 0)
    errors = [line for line in lines if line.startswith("error:")]
    assert code == 130, lines
    assert len(errors) == 1, lines
    assert errors[0].startswith("error: stopped by Ctrl-C (SIGINT) before training started: "), lines
    assert "run the same command again" in errors[0] and "send SIGTERM instead" in errors[0], lines
    assert not [line for line in lines if "[rank" in line or line.startswith("error: rank")], lines
