"""Start-up review 9: while ranks are missing at the rendezvous, rank 0 says at intervals how many
arrived and which are missing, and the final line names them; before, every rank was silent for the
whole group timeout (30 minutes) and then said only how many arrived."""

from __future__ import annotations

import datetime
import re

import pytest
import torch.distributed as dist
from rendezvous_ranks import rank_env
from startup_ranks import dist_info, error_lines, rank_script, run_ranks
from worker_ports import free_port

from vutrain import distributed

# A rank as train.py starts it, with rank 0's report intervals shortened through the module's
# WAITING_FIRST_S and WAITING_EVERY_S (30 s and 300 s by default), and its store kept up 2 s after a
# failed check (10 s).
RANK_SCRIPT = rank_script(LINGER_S=2.0, WAITING_FIRST_S=2.0, WAITING_EVERY_S=3.0)
WAITING = "rank 0 waiting at the rendezvous"


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_rank_0_names_the_missing_ranks_while_it_waits_and_when_it_gives_up():
    """WORLD_SIZE=4 with only ranks 0 and 2 started, a group timeout of 12 s, rank 0 reporting after
    2 s and then every 3 s: rank 0 prints a few lines (not one a poll) saying how many arrived and
    that ranks 1 and 3 are missing, with what to check; the final line of both names them too
    (before: nothing until the timeout, whose line named no rank)."""
    port = free_port()
    envs = [rank_env(rank, 4, port, VUTRAIN_DIST_TIMEOUT_MIN="0.2") for rank in (0, 2)]
    (code0, out0), (code2, out2) = run_ranks(RANK_SCRIPT, envs, 60)
    assert code0 == 1, f"rank 0: exit {code0}:\n{out0[-3000:]}"
    waiting = [line for line in out0.splitlines() if WAITING in line]
    assert 2 <= len(waiting) <= 5, out0[-3000:]
    for line in waiting:
        assert re.search(r"[12] of the 4 ranks of WORLD_SIZE", line), line
        assert "VUTRAIN_DIST_TIMEOUT_MIN" in line and "MASTER_ADDR=127.0.0.1" in line, line
        assert f"port {port}" in line, line
    # Rank 2 may still be starting at the first report; by the last it has long arrived.
    assert "2 of the 4 ranks" in waiting[-1] and "(ranks 1, 3 missing)" in waiting[-1], waiting[-1]
    [line0] = error_lines(out0)
    assert "only 2 of the 4 ranks of WORLD_SIZE" in line0, line0
    assert "within 12 s (ranks 1, 3 missing): check that every rank started" in line0, line0
    assert code2 == 1, f"rank 2: exit {code2}:\n{out2[-3000:]}"
    [line2] = error_lines(out2)
    assert "rank 0 stopped the start-up" in line2 and "(ranks 1, 3 missing)" in line2, line2
    assert WAITING not in out2, out2[-3000:]


@pytest.mark.slow
def test_no_waiting_line_when_every_rank_arrives():
    """Both ranks of a world of 2 start: no waiting line, the group starts as before."""
    port = free_port()
    envs = [rank_env(rank, 2, port, VUTRAIN_DIST_TIMEOUT_MIN="1") for rank in (0, 1)]
    results = run_ranks(RANK_SCRIPT, envs, 60)
    for rank, (code, out) in enumerate(results):
        assert code == 0 and "started" in out, f"rank {rank}: exit {code}:\n{out[-3000:]}"
        assert WAITING not in out, out[-3000:]


def test_missing_ranks_come_from_each_arrived_ranks_key():
    """In a real store of a world of 8: the ranks without a key are named in runs; a count of joined
    ranks the keys do not account for (a peer that posts none) names no rank."""
    info = dist_info(0, free_port(), world=8)
    store = dist.TCPStore(
        "127.0.0.1", info.master_port, 8, True, datetime.timedelta(seconds=10), wait_for_workers=False
    )
    for rank in (1, 5):
        store.set(distributed._ARRIVED_KEY.format(rank=rank), "1")
    arrived: set[int] = set()
    assert distributed._missing(store, info, 2, arrived) == "ranks 2-4, 6-7"
    assert arrived == {1, 5}
    store.set(distributed._ARRIVED_KEY.format(rank=3), "1")
    assert distributed._missing(store, info, 3, arrived) == "ranks 2, 4, 6-7"
    assert distributed._missing(store, info, 4, arrived) == ""


def test_rank_ranges_are_short_for_large_worlds():
    assert distributed._rank_ranges([3]) == "rank 3"
    assert distributed._rank_ranges([2, 5, 6, 7]) == "ranks 2, 5-7"
    many = distributed._rank_ranges(list(range(1, 400, 2)))
    assert many.startswith("ranks 1, 3, 5") and many.endswith("... (200 in all)") and len(many) < 80, many
