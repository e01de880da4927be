"""`tools/profile_step.py` (review 1): it profiles a GradCache step (`--grad-accum-steps`,
`--accumulation`), and ends what its Trainer started (the data-wait watcher thread, the loader
worker processes) before it returns.

Real components: the tool's own `main` in this process (one rank, gloo), its real Trainer, real
synthetic shards and real DataLoader worker processes, seen through psutil.
"""

from __future__ import annotations

import json
import os
import sys
import threading

import psutil
import pytest

from vutrain.gradcache import GradCache

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import profile_step


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def test_profiles_a_gradcache_step_and_ends_its_watcher_and_loader_workers(
    single_process, monkeypatch, capsys
):
    """--grad-accum-steps was not an option (no GradCache profile at all), and the tool left its
    watcher thread and its loader workers running until the process exited (a wrapper that called
    main() twice had two sets)."""
    monkeypatch.setenv("VUTRAIN_DEVICE", "cpu")
    gradcache_methods = (GradCache.forward, GradCache._replay)
    before = _children()
    argv = ["--warmup", "1", "--steps", "1", "--batch-size", "4", "--workers", "1", "--grad-accum-steps", "2"]
    assert profile_step.main(argv) == 0

    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["grad_accum_steps"] == 2 and record["accumulation"] == "gradcache", record
    # Every phase seen under GradCache too (its forward is GradCache.forward, not forward_loss),
    # and the phases do not nest: together they fit in the wall time.
    host = record["host_ms"]
    assert all(ms > 0 for ms in host.values()), host
    assert sum(host.values()) <= record["wall_ms"] * 1.05, record
    assert "--grad-accum-steps 2 --accumulation gradcache" in record["command"]
    assert (GradCache.forward, GradCache._replay) == gradcache_methods  # labels taken off again

    assert not [t.name for t in threading.enumerate() if t.name.startswith("vutrain-data-wait")]
    # Joined by the time main returns once closed; left open, they lived until the process exited.
    left = [psutil.Process(pid) for pid in _children() - before if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(left, timeout=30)
    assert not alive, f"loader workers still running after main returned: {alive}"


def test_refuses_a_step_of_no_micro_batches(capsys):
    with pytest.raises(SystemExit) as exit_:
        profile_step.main(["--grad-accum-steps", "0"])
    assert exit_.value.code == 2
    assert "--grad-accum-steps must be >= 1, got 0" in capsys.readouterr().err
