"""Start-up review 11: the ranks of one pair of processes start the process group again and again
(a sweep, a notebook, the tests). Rank 0's store outlives the first group, and torch names the default group's
keys the same each time: a later group's gloo read an earlier one's addresses and its first
barrier timed out, or a rank read the last start's "ok" and went into the group alone."""

from __future__ import annotations

import pytest
from rendezvous_ranks import rank_env
from startup_ranks import run_ranks
from worker_ports import free_port

# Each rank starts the group, sums its rank over the group and ends it, three times. Rank 1 comes to
# each restart first, as a rank that finished its work sooner does: rank 0 starts again only once
# rank 1 has said (a file) that it is starting. Not startup_ranks.rank_script, which starts the
# group once, as train.py does.
RESTARTS_SCRIPT = """
import os, time
import torch
from vutrain import distributed
info = distributed.resolve_dist_env()
for run in (1, 2, 3):
    said = os.path.join(os.environ["SYNC_DIR"], f"rank1_run{run}")
    if info.rank == 1:
        open(said, "w").close()
    deadline = time.monotonic() + 60
    while info.rank == 0 and not os.path.exists(said) and time.monotonic() < deadline:
        time.sleep(0.2)
    distributed.init_distributed(info)
    total = distributed.all_reduce(torch.tensor([float(info.rank)]))
    print(f"run {run}: sum {total.item():.0f}", flush=True)
    distributed.cleanup()
"""


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_the_ranks_of_one_process_pair_start_the_group_three_times(tmp_path):
    """Every start meets and sums over both ranks (before: rank 1 went on into the group alone, and
    both ranks stopped at the group's timeout, 15 s here)."""
    port = free_port()
    extra = {"VUTRAIN_DIST_TIMEOUT_MIN": "0.25", "SYNC_DIR": str(tmp_path)}
    envs = [rank_env(rank, 2, port, **extra) for rank in (0, 1)]
    results = run_ranks(RESTARTS_SCRIPT, envs, wait_s=90)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank}: exit {code}:\n{out[-3000:]}"
        assert all(f"run {run}: sum 1" in out for run in (1, 2, 3)), out[-3000:]
