"""Start-up review 4: ranks started with different world sizes, or fewer ranks than the world size,
stop in one line that names the world size, not after the group's timeout with "wait timeout"."""

from __future__ import annotations

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import error_lines, rank_script, run_ranks
from worker_ports import free_port

# A rank as train.py starts it, which takes the group's timeout from VUTRAIN_DIST_TIMEOUT_MIN.
RANK_SCRIPT = rank_script(LINGER_S=2.0)


def _run_ranks(world_sizes: list[int], timeout_minutes: float, wait_s: float) -> list[tuple[int | None, str]]:
    """(exit code, or None when still running after `wait_s`; output) of real CPU ranks 0, 1, ...
    started with the given WORLD_SIZEs at one rendezvous on 127.0.0.1."""
    port = free_port()
    timeout = {"VUTRAIN_DIST_TIMEOUT_MIN": str(timeout_minutes)}
    envs = [rank_env(rank, world, port, **timeout) for rank, world in enumerate(world_sizes)]
    return run_ranks(RANK_SCRIPT, envs, wait_s)


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_ranks_with_different_world_sizes_stop_at_once_naming_both():
    """Rank 0 told WORLD_SIZE=2, ranks 1 and 2 told 3 (a group timeout of 1 minute): every rank
    exits 1 within 40 s with one line naming both world sizes and WORLD_SIZE (before: all waited
    out the timeout, then "wait timeout")."""
    results = _run_ranks([2, 3, 3], timeout_minutes=1.0, wait_s=40)
    for rank, (code, out) in enumerate(results):
        assert code == 1, f"rank {rank} did not stop in time (exit {code}):\n{out[-2000:]}"
        lines = error_lines(out)
        assert len(lines) == 1, out[-2000:]
        assert "with world size 3 but rank 0 with 2" in lines[0], lines[0]
        assert "WORLD_SIZE" in lines[0], lines[0]


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_rank_that_never_comes_is_named_by_the_world_size():
    """WORLD_SIZE=3 but only ranks 0 and 1 start (a group timeout of 6 s): both exit 1 with one line
    saying 2 of the 3 ranks of WORLD_SIZE arrived (before: "DistStoreError: wait timeout")."""
    results = _run_ranks([3, 3], timeout_minutes=0.1, wait_s=40)
    for rank, (code, out) in enumerate(results):
        assert code == 1, f"rank {rank}: exit {code}:\n{out[-2000:]}"
        lines = error_lines(out)
        assert len(lines) == 1, out[-2000:]
        assert "only 2 of the 3 ranks of WORLD_SIZE" in lines[0], lines[0]
