"""Rendezvous ports for tests: each pytest-xdist worker draws from its own slice of the ports
`vutrain.distributed.free_port` uses, so two workers never hand the same port to two runs.

Why: a port is checked free, then bound seconds later by the launched rank 0. The kernel cannot
give it away in between (it is outside the ephemeral range), but the other worker could pick it
too. The lowest 1000 ports are left out: the SLURM tests' jobs derive theirs from the job id
(20000 + id).
"""

from __future__ import annotations

import os

from vutrain.distributed import LISTEN_PORTS
from vutrain.distributed import free_port as _free_port

_POOL = range(LISTEN_PORTS.start + 1000, LISTEN_PORTS.stop)


def worker_ports(env=None) -> range:
    """This worker's slice of the pool: all of it outside pytest-xdist, else 1/N of it."""
    env = os.environ if env is None else env
    worker = env.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", ...
    count = int(env.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if not worker.startswith("gw") or count <= 1:
        return _POOL
    size = len(_POOL) // count
    start = _POOL.start + int(worker[2:]) * size
    return range(start, start + size)


def free_port() -> int:
    """A free port from this worker's slice."""
    return _free_port(worker_ports())
