"""Start-up review 8: a rank that fails after the rendezvous, while the process group and
DeepSpeed's start run (init_process_group, DeepSpeed's shared-memory op), tells the other ranks its
cause: they waited in torch's connection to it until the group's timeout and said "wait timeout",
or, when rank 0 failed, only that the store's connection closed."""

from __future__ import annotations

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import error_lines, rank_script, run_ranks
from worker_ports import free_port

# A rank as train.py starts it, with the module's own waits.
RANK_SCRIPT = rank_script()


def _run_two_ranks(extra: dict[int, dict[str, str]]) -> list[tuple[int | None, str]]:
    """Two ranks at one rendezvous, `extra[rank]` added to that rank's environment; a group timeout
    of 2 minutes, beyond the 60 s each rank is given to stop."""
    port = free_port()
    envs = [rank_env(rank, 2, port, VUTRAIN_DIST_TIMEOUT_MIN="2", **extra.get(rank, {})) for rank in (0, 1)]
    return run_ranks(RANK_SCRIPT, envs, wait_s=60)


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_backend_only_rank_1_cannot_start_stops_rank_0_with_its_cause():
    """Rank 1's node sets a backend torch does not know, so init_process_group fails there after
    the rendezvous; rank 0 waited for rank 1's connection until the group's timeout (2 minutes
    here, 30 by default) and then said only "wait timeout"."""
    (code0, out0), (code1, out1) = _run_two_ranks({1: {"VUTRAIN_DIST_BACKEND": "nosuchbackend"}})
    assert code0 == 1, f"rank 0 still waiting (exit {code0}):\n{out0[-3000:]}"
    [line0] = error_lines(out0)
    assert "rank 1 failed while starting it" in line0 and "nosuchbackend" in line0, line0
    assert code1 == 1, out1[-3000:]
    [line1] = error_lines(out1)
    assert "nosuchbackend" in line1, line1


@pytest.mark.slow
def test_deepspeed_op_failing_to_build_on_rank_0_only_stops_rank_1_with_its_cause(tmp_path):
    """Rank 0 builds DeepSpeed's shared-memory op afresh (its own extensions folder) with a compiler
    that fails, after the process group started; rank 1 heard only that the connection closed."""
    rank0 = {"TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), "CXX": "/bin/false"}
    (code0, out0), (code1, out1) = _run_two_ranks({0: rank0})
    assert code1 == 1, f"rank 1 still waiting (exit {code1}):\n{out1[-3000:]}"
    [line1] = error_lines(out1)
    assert "rank 0 failed while starting it" in line1 and "/bin/false" in line1, line1
    assert "Connection" not in out1 and "frame #" not in out1, out1[-3000:]
    assert code0 == 1, out0[-3000:]
    [line0] = error_lines(out0)
    assert "/bin/false" in line0, line0
