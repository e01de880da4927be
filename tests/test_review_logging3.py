"""Python warnings and late tracebacks on ranks other than 0 name their rank in every line.

Rank 1 keeps the warnings attributed to vutrain code (a library's deprecation notice about a call
vutrain makes, `stacklevel=2`); they print through `warnings.showwarning`, not a log handler, and
until 2026-12-07 carried no `[rank N]`: one untagged copy per rank.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A library function that warns about its caller, as torch's deprecated collectives do.
FAKELIB = """
import warnings


def call():
    warnings.warn("fakelib.call is deprecated", FutureWarning, stacklevel=2)
"""
# vutrain code that calls it: compiled from a real file (so the warning shows its source line) as a
# vutrain module (the module name is what the other ranks' warning filter lets through).
CALLER = """import fakelib


def caller():
    fakelib.call()  # vutrain's call of a deprecated library function
"""
SCRIPT = """
import sys, warnings
from vutrain.logging_setup import setup_logging

plain = warnings.formatwarning
setup_logging()
setup_logging()  # twice (a sweep, a notebook): one tag
import fakelib

fakelib.call()  # the library's own notice about a non-vutrain caller: rank 0's alone
path = sys.argv[1]
namespace = {"__name__": "vutrain.caller"}
exec(compile(open(path).read(), path, "exec"), namespace)
namespace["caller"]()
setup_logging(rank=0)  # the same process as rank 0 again: the plain format, as before
assert warnings.formatwarning is plain, warnings.formatwarning
"""


def warning_lines(tmp_path, **env: str) -> list[str]:
    """stderr lines of a fresh process that set up logging with the launcher's variables `env`
    and made vutrain's deprecated call (and the library's own from outside vutrain)."""
    (tmp_path / "fakelib.py").write_text(FAKELIB)
    caller = tmp_path / "caller.py"
    caller.write_text(CALLER)
    clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(caller)],
        env={**clean, "PYTHONPATH": os.pathsep.join([ROOT, str(tmp_path)]), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.splitlines()


@pytest.mark.slow
def test_other_ranks_tag_each_line_of_a_vutrain_warning(tmp_path):
    """Rank 1's copy of the warning, its source line included, starts with `[rank 1]` (once, after
    two setups); before, it read exactly like rank 0's."""
    caller = tmp_path / "caller.py"
    lines = warning_lines(tmp_path, RANK="1", WORLD_SIZE="2")
    assert lines == [
        f"[rank 1] {caller}:5: FutureWarning: fakelib.call is deprecated",
        "[rank 1]   fakelib.call()  # vutrain's call of a deprecated library function",
    ], lines


@pytest.mark.slow
def test_rank_zero_warnings_keep_their_format(tmp_path):
    """Rank 0 (and a plain `python` run) prints both warnings as Python does, with no tag."""
    for env in ({"RANK": "0", "WORLD_SIZE": "2"}, {}):
        lines = warning_lines(tmp_path, **env)
        assert lines == [
            "<string>:10: FutureWarning: fakelib.call is deprecated",  # the script's own call
            f"{tmp_path / 'caller.py'}:5: FutureWarning: fakelib.call is deprecated",
            "  fakelib.call()  # vutrain's call of a deprecated library function",
        ], lines


# The training entry point on each rank, with a fault hook: the step makes vutrain's deprecated
# call, and from step 2 it raises (a late error: past the first step, so its traceback is kept).
TRAIN_WRAPPER = """
import sys

from vutrain.logging_setup import setup_logging

setup_logging()  # what main() does first: before vutrain.trainer imports transformers
import vutrain.trainer

SOURCE = '''
import fakelib


def train_step(self):
    fakelib.call()
    if self.step >= 2:
        raise RuntimeError(f"injected failure at step {self.step}")
    return train_step_of_vutrain(self)
'''
namespace = {"__name__": "vutrain.trainer", "train_step_of_vutrain": vutrain.trainer.Trainer.train_step}
exec(compile(SOURCE, sys.argv.pop(1), "exec"), namespace)
vutrain.trainer.Trainer.train_step = namespace["train_step"]
from vutrain.train import main

sys.exit(main())
"""


@pytest.mark.slow
def test_two_rank_run_names_the_rank_in_each_warning_and_traceback_line(tmp_path):
    """A real 2-rank CPU run (gloo, ranks started as srun or mpirun start them, each with its own
    stderr) whose steps warn from vutrain code and then fail past the first step: rank 1's warning
    lines carry `[rank 1]` (they did not), rank 0's are unchanged, and every line of each rank's
    traceback names its rank (torch's excepthook, installed with the process group, does that)."""
    from worker_ports import free_port

    from vutrain.data.synthetic import write_synthetic

    import train_runner

    shards = write_synthetic(str(tmp_path / "data"), 32, 8, image_size=16, val_samples=8, seed=0)
    (tmp_path / "fakelib.py").write_text(FAKELIB)
    wrapper, step_source = tmp_path / "train_wrapper.py", tmp_path / "train_step.py"
    wrapper.write_text(TRAIN_WRAPPER)
    step_source.write_text(TRAIN_WRAPPER.split("'''")[1])  # the warning's source line
    overrides = train_runner.base_overrides(
        shards, str(tmp_path / "run"), 5, data__num_workers=0, train__micro_batch_size=4
    )
    env = train_runner.env()
    env.update(
        PYTHONPATH=os.pathsep.join([env["PYTHONPATH"], str(tmp_path)]),
        WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
    )  # fmt: skip
    for name in ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        env.pop(name, None)
    command = [sys.executable, str(wrapper), str(step_source), "--config", train_runner.TINY, *overrides]
    logs = [tmp_path / f"stderr_rank{rank}.txt" for rank in (0, 1)]  # files: no pipe fills up
    procs = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as err:
                env_rank = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}
                procs.append(
                    subprocess.Popen(command, env=env_rank, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
                )
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    stderr = [log.read_text() for log in logs]
    assert [proc.returncode for proc in procs] == [1, 1], stderr
    warning = "FutureWarning: fakelib.call is deprecated"
    source = "  fakelib.call()"
    rank0, rank1 = (text.splitlines() for text in stderr)
    assert f"{step_source}:6: {warning}" in rank0 and source in rank0, stderr[0]
    assert f"[rank 1] {step_source}:6: {warning}" in rank1, stderr[1]
    assert f"[rank 1] {source}" in rank1, stderr[1]
    assert not [line for line in rank1 if warning in line and not line.startswith("[rank 1] ")], stderr[1]
    for rank, lines in enumerate((rank0, rank1)):
        traceback = [line for line in lines if "Traceback" in line or "injected failure at step 2" in line]
        assert len(traceback) == 2, stderr[rank]
        start, end = lines.index(traceback[0]), lines.index(traceback[1])
        assert all(line.startswith(f"[rank{rank}]: ") for line in lines[start : end + 1]), stderr[rank]
