"""Start-up review 10: a rank other than 0 kept waiting at the rendezvous says once what it waits
for (it was silent until rank 0's verdict, up to 30 minutes); a second start on rank 0's store in one
process no longer reads the first start's world size and verdict; a rank whose MASTER_PORT is held
by another run's store stops within seconds naming the port (it joined that run's finished start and
hung in its group, or waited out the group's timeout)."""

from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch.distributed as dist
from rendezvous_ranks import rank_env
from startup_ranks import dist_info, error_lines, rank_script, run_ranks
from worker_ports import free_port

from vutrain import distributed

# A rank as train.py starts it (its logging too: ranks other than 0 keep only vutrain's warnings),
# with the first "still waiting" report after 2 s instead of 30, 3 s for a store to answer (60), and
# rank 0's store kept up 2 s after a failed check (10).
RANK_SCRIPT = rank_script(with_logging=True, LINGER_S=2.0, STORE_ANSWER_S=3.0, WAITING_FIRST_S=2.0)


def _rendezvous(info: distributed.DistInfo, timeout_s: float = 20.0) -> int:
    """This rank's side of a real rendezvous (its store, the world-size check): the start's number."""
    store = distributed.rendezvous_store(info, datetime.timedelta(seconds=timeout_s))
    return distributed.agree_on_world_size(store, info, timeout_s)


def _rank_0_server(port: int):
    """Rank 0's store server at `port`, up while the caller holds it: in a real process the group
    keeps it up for good; here rank 0's store would go with its thread and rank 1 lose the verdict."""
    return distributed.rendezvous_store(dist_info(0, port), datetime.timedelta(seconds=60))


def _both_ranks_meet(port: int) -> list[int]:
    """Ranks 0 and 1 of a world of 2 meet at `port` (served by `_rank_0_server`), each on its own
    thread of this process."""
    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(_rendezvous, [dist_info(0, port), dist_info(1, port)]))


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_waiting_rank_other_than_0_says_once_what_it_waits_for():
    """Rank 1 of a world of 3 whose rank 2 never comes says once (after 2 s here) that it reached the
    rendezvous at MASTER_ADDR:MASTER_PORT and waits for the others; a rank 1 whose rank 0 never
    starts says once that it has not reached rank 0's store there. Before, both said nothing until
    the group's timeout (6 s here, 30 minutes by default)."""
    port, lone_port = free_port(), free_port()
    envs = [rank_env(rank, 3, port, VUTRAIN_DIST_TIMEOUT_MIN="0.1") for rank in (0, 1)]
    envs.append(rank_env(1, 2, lone_port, VUTRAIN_DIST_TIMEOUT_MIN="0.1"))
    (code0, out0), (code1, out1), (code_lone, out_lone) = run_ranks(RANK_SCRIPT, envs, 60)
    assert code1 == 1, f"rank 1: exit {code1}:\n{out1[-3000:]}"
    waiting = [line for line in out1.splitlines() if "has waited" in line]
    assert len(waiting) == 1, out1[-3000:]
    assert f"[rank 1] WARNING vutrain: rank 1 reached the rendezvous at 127.0.0.1:{port}" in waiting[0]
    assert "the 3 of WORLD_SIZE" in waiting[0] and "VUTRAIN_DIST_TIMEOUT_MIN" in waiting[0], waiting[0]
    [line1] = error_lines(out1)
    assert "rank 0 stopped the start-up" in line1 and "(rank 2 missing)" in line1, line1
    assert code0 == 1 and "has waited" not in out0, out0[-3000:]  # rank 0 reports on its own
    assert code_lone == 1, out_lone[-3000:]
    not_reached = [line for line in out_lone.splitlines() if "has not reached" in line]
    assert len(not_reached) == 1, out_lone[-3000:]
    assert f"rank 0's rendezvous store at 127.0.0.1:{lone_port}" in not_reached[0], not_reached[0]
    assert "MASTER_ADDR / MASTER_PORT" in not_reached[0], not_reached[0]


def test_a_second_start_on_rank_0s_store_waits_for_rank_0():
    """Rank 0's store outlives a start. In the next start in the same process, rank 1 came before
    rank 0 and read the last start's world size and "ok": it went on alone into the group while
    rank 0 waited out its timeout for it. Now it waits for rank 0, and the two starts have their own
    numbers (torch's own keys for the group go under them)."""
    port = free_port()
    server = _rank_0_server(port)
    first = _both_ranks_meet(port)
    assert first[0] == first[1], first
    # Rank 1 alone, before rank 0's next start: no start to join (before: it joined the old one).
    with pytest.raises(distributed.RendezvousError, match="heard nothing from rank 0"):
        _rendezvous(dist_info(1, port), timeout_s=1.0)
    second = _both_ranks_meet(port)
    assert second[0] == second[1] != first[0], (first, second)
    del server


@pytest.fixture
def fresh_process(monkeypatch):
    """The rendezvous bookkeeping of a process that has taken part in none (this one has), and 2 s
    for a store to begin a start instead of STORE_ANSWER_S's 60."""
    monkeypatch.setattr(distributed, "_joined_rendezvous", set(), raising=False)
    monkeypatch.setattr(distributed, "STORE_ANSWER_S", 2.0)


def test_a_rank_at_a_store_of_another_program_stops_naming_the_port(fresh_process):
    """Another program's TCP store (not a vutrain rendezvous) holds MASTER_PORT: rank 1 stops within
    seconds naming the port (before: it waited for a world size until the group's timeout and then
    said only that it heard nothing from rank 0)."""
    port = free_port()
    other = dist.TCPStore("127.0.0.1", port, 1, True, datetime.timedelta(seconds=30), wait_for_workers=False)
    with pytest.raises(distributed.RendezvousError) as caught:
        _rendezvous(dist_info(1, port), timeout_s=20.0)
    message = str(caught.value)
    assert f"reached a store at 127.0.0.1:{port} that began no rendezvous of this run within 2 s" in message
    assert f"another run holds port {port}" in message and "set MASTER_PORT" in message, message
    del other


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_ranks_whose_port_another_run_holds_each_stop_in_one_line():
    """Run A's ranks have met at a port (their start is over; A keeps running). Run B is started
    at the same port: its rank 0 stops with EADDRINUSE in one line naming the port; its rank 1,
    connected to A's store, stops within seconds naming the port (before: it read A's world size
    and "ok", went into A's group and hung there past the group's timeout)."""
    port = free_port()
    server = _rank_0_server(port)
    _both_ranks_meet(port)  # run A, in this process
    envs = [rank_env(rank, 2, port, VUTRAIN_DIST_TIMEOUT_MIN="1") for rank in (0, 1)]
    (code0, out0), (code1, out1) = run_ranks(RANK_SCRIPT, envs, 60)
    assert code1 == 1, f"rank 1 still waiting (exit {code1}):\n{out1[-3000:]}"
    [line1] = error_lines(out1)
    assert f"another run holds port {port} on that host" in line1, line1
    assert "its ranks had started their group already" in line1, line1
    assert "is taken on this host" not in line1, line1  # not rank 1's host
    assert code0 == 1, out0[-3000:]
    [line0] = error_lines(out0)
    assert "EADDRINUSE" in line0 and f"port {port} is taken on this host" in line0, line0
    assert "set MASTER_PORT to a free port, the same on every rank" in line0, line0
    del server
