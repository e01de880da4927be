"""`tools/profile_step.py`: the GPU-busy arithmetic, and one profiled step of the real Trainer on CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

from profile_step import busy_us  # noqa: E402


def test_busy_time_is_the_union_of_kernel_intervals():
    # Overlapping kernels (two streams) count once; a gap is idle; a kernel inside another adds nothing.
    assert busy_us([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert busy_us([(20, 30), (0, 10)]) == 20  # order does not matter
    assert busy_us([]) == 0


@pytest.mark.slow  # a one-rank training run in a subprocess
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_profiles_the_trainer_phases_on_cpu(compiled):
    cmd = [sys.executable, os.path.join(REPO, "tools", "profile_step.py"), "--warmup", "1", "--steps", "2"]
    cmd += ["--batch-size", "8", "--workers", "0"]
    cmd += ["--compile", "--compile-backend", "aot_eager"] if compiled else []
    r = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "VUTRAIN_DEVICE": "cpu"}
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    record = json.loads(r.stdout.strip().splitlines()[-1])
    assert record["gpu_busy_ms"] is None and record["steps"] == 2  # no GPU: nothing made up
    assert record["compiled"] is compiled
    host = record["host_ms"]
    assert set(host) == {"data", "forward", "backward", "optimizer"}
    # every phase was seen inside the profile, and together they fit in the measured wall time
    assert all(ms > 0 for ms in host.values()), host
    assert sum(host.values()) <= record["wall_ms"] * 1.05, record
    assert "aten::" in r.stdout  # the table of the ops with the most host time


@pytest.mark.parametrize("tool", ["profile_step.py", "count_step_ops.py", "host_python_time.py"])
@pytest.mark.parametrize("args", [["--precision", "fp8"], ["--preset", "vit-b32"]])
def test_tools_refuse_a_bad_choice_in_their_usage_line(tool, args):
    """A wrong --precision or --preset got through argparse and ended seconds later in a ConfigError
    traceback from inside the run."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", tool), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"{tool}: error: argument {args[0]}: invalid choice")
    )
