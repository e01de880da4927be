"""Start-up review 6: a rendezvous port held by another program stops every rank within seconds
(torch's store client waited forever for that program to answer), also a rank that failed before the
rendezvous; the process group's timeout is set by VUTRAIN_DIST_TIMEOUT_MIN."""

from __future__ import annotations

import socket

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import error_lines, rank_script, run_ranks
from worker_ports import free_port

from vutrain import distributed

# A rank as train.py starts it; rank 0 keeps its store up 2 s after a failed check (10 s in a run),
# and a rank waits 3 s for the program at the port to answer as a store (60 s).
RANK_SCRIPT = rank_script(LINGER_S=2.0, STORE_ANSWER_S=3.0)

# A rank whose config failed before the rendezvous, telling the others as train.py does.
EARLY_FAILURE_SCRIPT = """
from vutrain import distributed
distributed.STORE_ANSWER_S = 3.0
info = distributed.resolve_dist_env()
print("told:", distributed.tell_peers_of_early_failure(info, "config error: x", wait_s=5.0), flush=True)
"""


@pytest.fixture
def port_held_by_another_program():
    """A port on which some other program listens and accepts, but never speaks (not a store)."""
    port = free_port()
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen(16)
        yield port


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_port_held_by_another_program_stops_every_rank_in_one_line(port_held_by_another_program):
    """Rank 0 cannot bind MASTER_PORT (another program listens there) and says EADDRINUSE; rank 1,
    connected to that program, says within seconds that it is no rendezvous store and to set
    MASTER_PORT (before: it waited forever, whatever the group's timeout)."""
    port = port_held_by_another_program
    envs = [rank_env(rank, 2, port, VUTRAIN_DIST_TIMEOUT_MIN="1") for rank in (0, 1)]
    results = run_ranks(RANK_SCRIPT, envs, wait_s=30)
    code0, out0 = results[0]
    assert code0 == 1 and "EADDRINUSE" in out0, out0[-3000:]
    code1, out1 = results[1]
    assert code1 == 1, f"rank 1 still waiting (exit {code1}):\n{out1[-3000:]}"
    lines = error_lines(out1)
    assert len(lines) == 1, out1[-3000:]
    assert "did not answer as rank 0's rendezvous store" in lines[0], lines[0]
    assert f"another program holds port {port}" in lines[0] and "set MASTER_PORT" in lines[0], lines[0]


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_rank_that_failed_early_exits_when_another_program_holds_the_port(port_held_by_another_program):
    """A rank whose config failed before the rendezvous tries to tell rank 0 for 5 s; with another
    program on the port it gives up and exits (before: it never exited)."""
    env = rank_env(1, 2, port_held_by_another_program)
    [(code, out)] = run_ranks(EARLY_FAILURE_SCRIPT, [env], wait_s=30)
    assert code == 0 and "told: False" in out, f"exit {code}:\n{out[-3000:]}"


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_the_group_timeout_is_set_by_its_variable():
    """VUTRAIN_DIST_TIMEOUT_MIN=0.05 (3 s): rank 0 of a world of 2 whose peer never comes stops within
    seconds naming the 3 s (before: the fixed 30 minutes)."""
    envs = [rank_env(0, 2, free_port(), VUTRAIN_DIST_TIMEOUT_MIN="0.05")]
    [(code, out)] = run_ranks(RANK_SCRIPT, envs, wait_s=40)
    assert code == 1, f"rank 0 still waiting (exit {code}):\n{out[-3000:]}"
    lines = error_lines(out)
    assert len(lines) == 1 and "only 1 of the 2 ranks" in lines[0] and "within 3 s" in lines[0], out[-3000:]


@pytest.mark.parametrize("value", ["abc", "0", "-5", "inf", "nan"])
def test_a_group_timeout_that_is_no_positive_number_is_one_line_naming_it(value):
    """A value that is not a positive number of minutes is refused naming the variable; unset is 30."""
    with pytest.raises(distributed.RendezvousError, match=f"{distributed.GROUP_TIMEOUT_ENV}=.*positive"):
        distributed.group_timeout_minutes({distributed.GROUP_TIMEOUT_ENV: value})
    assert distributed.group_timeout_minutes({}) == 30.0
    assert distributed.group_timeout_minutes({distributed.GROUP_TIMEOUT_ENV: " 90 "}) == 90.0
