"""Start-up review 7: a rank 0 whose node cannot resolve MASTER_ADDR tells the ranks whose nodes can
(they found nothing listening and waited out the group's timeout, then never heard rank 0's cause)."""

from __future__ import annotations

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import error_lines, rank_script, run_ranks
from worker_ports import free_port

# A rank as train.py starts it, with the module's own waits.
RANK_SCRIPT = rank_script()


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_rank_0_that_cannot_resolve_master_addr_tells_the_other_ranks():
    """Rank 0's node cannot resolve MASTER_ADDR (RFC 6761: .invalid never resolves), rank 1's can
    (127.0.0.1 here). Rank 1 stops within seconds with rank 0's cause and host; before, it found
    nothing listening and waited out the group's timeout (here 2 minutes, by default 30)."""
    port = free_port()
    envs = [
        rank_env(rank, 2, port, VUTRAIN_DIST_TIMEOUT_MIN="2", VUTRAIN_EARLY_FAILURE_WAIT_S="30")
        for rank in (0, 1)
    ]
    envs[0]["MASTER_ADDR"] = "nonexistent.invalid"
    (code0, out0), (code1, out1) = run_ranks(RANK_SCRIPT, envs, wait_s=60)
    assert code1 == 1, f"rank 1 still waiting (exit {code1}):\n{out1[-3000:]}"
    [line] = error_lines(out1)
    assert "rank 0 stopped the start-up: rank 0 failed before the rendezvous" in line, line
    assert "MASTER_ADDR=nonexistent.invalid is not a host name" in line and "on rank 0's host" in line, line
    # Rank 0 says its own line once, and exits once rank 1 has read the verdict.
    assert code0 == 1, f"rank 0 still serving (exit {code0}):\n{out0[-3000:]}"
    [line0] = error_lines(out0)
    assert "MASTER_ADDR=nonexistent.invalid is not a host name this node can resolve" in line0, line0
