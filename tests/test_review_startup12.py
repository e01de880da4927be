"""Start-up review 12: a rank whose RANK / WORLD_SIZE are wrong (a hand-written launch that numbers
its ranks from 1, a node whose script still says WORLD_SIZE=1) stops at once with a line naming
both variables, and tells the ranks at the rendezvous, which stop within seconds with its cause;
before, they waited for it for the group's whole timeout (30 minutes) and then named no cause."""

from __future__ import annotations

import re
import sys
import threading

import pytest
from rendezvous_ranks import finish, rank_env, start
from startup_ranks import error_lines, rank_script
from worker_ports import free_port

from vutrain.distributed import resolve_dist_env

# A rank as train.py starts it: the ranks resolved (a failure is train.py's one line, exit 2), then
# the group started, with rank 0's store kept up 2 s after a failed check (10 s).
RESOLVE_THEN_START = """
import re
import sys
from vutrain import distributed
try:
    distributed.resolve_dist_env()
except RuntimeError as exc:
    print(f"error: {exc}", flush=True)
    sys.exit(2)
""" + rank_script(LINGER_S=2.0)


def _bad_rank_and_good_ranks(bad_rank: int, bad_world: int, world: int, good: list[int]):
    """(exit code, output) of ranks `good` of `world`, and of a rank `bad_rank` of `bad_world`, at one
    rendezvous; a group timeout of 2 minutes, beyond the 60 s each is given to stop."""
    port = free_port()
    timeout = {"VUTRAIN_DIST_TIMEOUT_MIN": "2", "VUTRAIN_DEVICE": "cpu"}
    envs = [rank_env(rank, world, port, **timeout) for rank in good]
    envs.append(rank_env(bad_rank, bad_world, port, **timeout))
    procs = [start([sys.executable, "-c", RESOLVE_THEN_START], env) for env in envs]
    results = finish(procs, 60)
    return results[:-1], results[-1]


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_ranks_numbered_from_1_stop_every_rank_naming_rank_and_world_size():
    """WORLD_SIZE=3 with ranks 0, 1 and a third told RANK=3: the third says at once that RANK=3 is
    outside WORLD_SIZE=3; ranks 0 and 1 stop within seconds with its line and number (before:
    both waited out the group's timeout, here 2 minutes)."""
    good, (bad_code, bad_out) = _bad_rank_and_good_ranks(3, 3, 3, good=[0, 1])
    assert bad_code == 2, bad_out[-3000:]
    [bad_line] = error_lines(bad_out)
    assert "RANK=3 is outside WORLD_SIZE=3" in bad_line, bad_line
    for rank, (code, out) in enumerate(good):
        assert code == 1, f"rank {rank} still waiting (exit {code}):\n{out[-3000:]}"
        [line] = error_lines(out)
        assert "rank 3 failed before the rendezvous: RANK=3 is outside WORLD_SIZE=3" in line, line


@pytest.mark.slow  # its ranks start in tests/rendezvous_ranks.py
def test_a_rank_told_world_size_1_stops_rank_0_of_the_real_world():
    """Rank 0 of WORLD_SIZE=2, and a rank 1 whose node still exports WORLD_SIZE=1: rank 0 stops
    within seconds naming rank 1's variables (before: it waited out the group's timeout)."""
    [(code0, out0)], (bad_code, bad_out) = _bad_rank_and_good_ranks(1, 1, 2, good=[0])
    assert bad_code == 2, bad_out[-3000:]
    assert code0 == 1, f"rank 0 still waiting (exit {code0}):\n{out0[-3000:]}"
    [line0] = error_lines(out0)
    assert "rank 1 failed before the rendezvous: RANK=1 is outside WORLD_SIZE=1" in line0, line0


@pytest.mark.parametrize(
    ("rank", "world", "says"),
    [("2", "2", "RANK=2 is outside WORLD_SIZE=2 (ranks 0 to 1)"), ("0", "0", "WORLD_SIZE=0 is no number")],
)
def test_a_wrong_rank_or_world_size_names_the_variables(rank, world, says):
    """The line names RANK and WORLD_SIZE as the user set them (it said "rank 2 is outside world
    size 2 (env launcher): check --ntasks / --nproc_per_node", a SLURM / torchrun option, of a
    hand-written launch). An environment passed in is no running rank's: nobody is told."""
    threads = threading.active_count()
    env = {"RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "VUTRAIN_DEVICE": "cpu"}
    with pytest.raises(RuntimeError, match="^" + re.escape(says)):
        resolve_dist_env(env)
    assert threading.active_count() == threads
