"""Review tests: a stop signal sent to the demo alone while it trains (real demo process, real
deepspeed launcher, real CPU ranks)."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import train_runner as tr


def _training_ranks(demo: psutil.Process) -> list[psutil.Process]:
    """The deepspeed ranks under the demo (train.py with --local_rank), once they run."""
    found = []
    for child in demo.children(recursive=True):
        try:
            cmdline = child.cmdline()
        except psutil.Error:
            continue
        if any(arg.endswith("train.py") for arg in cmdline) and any("--local_rank" in a for a in cmdline):
            found.append(child)
    return found


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_for_ranks(demo: psutil.Process, count: int, timeout: float = 120) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks = _training_ranks(demo)
        if len(ranks) == count:
            return ranks
        time.sleep(0.2)
    raise AssertionError(f"the demo started no {count} training ranks in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_demo_stops_its_ranks_and_is_one_line(tmp_path, sig):
    """SIGTERM to the demo (kill, a scheduler) ended the demo at once and left deepspeed's launch.py
    and both ranks training, orphaned, into the run folder a rerun deletes; SIGINT to the demo alone
    did the same with a KeyboardInterrupt traceback. Now every process under the demo has ended when
    it exits, with one error line and the shell's code for the signal (128 + its number)."""
    cmd = [
        sys.executable,
        "-m",
        "vutrain.demo",
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "out"),
        "--num-samples",
        "64",
        "--val-samples",
        "24",
        "--shard-size",
        "32",
        "--steps",
        "100000",
        "--min-top1",
        "0",
        "train.micro_batch_size=8",
        "data.num_workers=0",
        "eval.every=0",
        "train.checkpoint_every=0",
    ]
    log = tmp_path / "demo.log"  # a file, not a pipe: orphaned ranks would hold a pipe open
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=tr.env(), stdout=sink, stderr=subprocess.STDOUT)
    demo = psutil.Process(proc.pid)
    ranks = []
    try:
        ranks = _wait_for_ranks(demo, 2)
        under_demo = demo.children(recursive=True)
        os.kill(proc.pid, sig)  # the demo alone, as `kill PID` does, not its process group
        proc.wait(timeout=120)
        still_running = [p.pid for p in under_demo if _alive(p)]
        assert still_running == [], f"left running after the demo exited: {still_running}"
        err = log.read_text(errors="replace")
        assert proc.returncode == 128 + sig, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"error: stopped by {signal.Signals(sig).name} during training"), err[-3000:]
        assert "run the same command again" in last
    finally:
        for leftover in [demo, *ranks, *psutil.Process().children(recursive=True)]:
            try:
                leftover.kill()
            except psutil.Error:
                pass
        proc.wait(timeout=30)
