"""Ranks that start as train.py starts them, for the start-up review tests: the rank script
(init_distributed, and the one line train.py prints when it fails) with some of
vutrain.distributed's waits shortened, its ranks run as subprocesses (tests/rendezvous_ranks.py),
their `error: ` lines, and one rank's DistInfo on 127.0.0.1 for a rendezvous inside the test process."""

from __future__ import annotations

import sys

from rendezvous_ranks import finish, start

from vutrain import distributed

_START = """
info = distributed.resolve_dist_env()
try:
    distributed.init_distributed(info)
except Exception as exc:
    print(f"error: rank {info.rank}: {startup_errors.rendezvous_message(info, exc)}", flush=True)
    sys.exit(1)
print("started", flush=True)
"""


def rank_script(with_logging: bool = False, **waits: float) -> str:
    """The `python -c` source of one rank. `waits` sets vutrain.distributed's module constants first
    (LINGER_S=2.0, STORE_ANSWER_S=3.0, WAITING_FIRST_S=2.0, ...: seconds, shortened so that a test
    sees in seconds what a run sees in minutes); `with_logging` sets up logging as train.py does
    (ranks other than 0 keep only vutrain's warnings)."""
    lines = ["import sys", "from vutrain import distributed, startup_errors"]
    if with_logging:
        lines += ["from vutrain.logging_setup import setup_logging", "setup_logging()"]
    for name, seconds in waits.items():
        if not hasattr(distributed, name):  # a misspelt name would be set on the side, silently unused
            raise AttributeError(f"rank_script: vutrain.distributed has no {name}")
        lines.append(f"distributed.{name} = {float(seconds)!r}")
    return "\n".join(lines) + _START


def run_ranks(script: str, envs: list[dict[str, str]], wait_s: float) -> list[tuple[int | None, str]]:
    """(exit code, or None when still running `wait_s` after the start; output) of one process of
    `script` per environment in `envs` (tests/rendezvous_ranks.py `rank_env`)."""
    return finish([start([sys.executable, "-c", script], env) for env in envs], wait_s)


def error_lines(out: str) -> list[str]:
    """The lines of a rank's output that train.py prints when its start-up fails."""
    return [line for line in out.splitlines() if line.startswith("error: ")]


def dist_info(rank: int, port: int, world: int = 2) -> distributed.DistInfo:
    """Rank `rank` of `world` (one rank a node, gloo on the CPU) at 127.0.0.1:`port`."""
    return distributed.DistInfo(
        rank=rank,
        local_rank=0,
        world_size=world,
        local_world_size=1,
        master_addr="127.0.0.1",
        master_port=port,
        launcher="env",
        device="cpu",
        backend="gloo",
    )
