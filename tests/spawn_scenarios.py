"""Many named scenarios on one spawn: a spawned process group pays ~20-30 s of imports (torch,
DeepSpeed) and process-group start before its first scenario, which then takes a second or a few.
A module keeps a table of its scenarios by name, and

- its spawned worker (a module-level function, so `torch.multiprocessing.spawn` can pickle it) runs
  the named ones with `run_in_turn(names, run)`: {name: result}, or {name: the traceback} for the
  first that raised;
- its module-scoped fixture asks only for those the selected tests read:
  `selected(request, table, run_of)`;
- each test reads its own with `result(runs, name)` (one rank) or `results_by_rank(runs_by_rank,
  name)`: a scenario that raised, or was not reached, fails that test alone, with the traceback.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable

import pytest


def run_in_turn(names: Iterable[str], run: Callable[[str], object]) -> dict:
    """`run(name)` for each name in turn: {name: result}, or {name: the traceback} for the first that
    raised. Later ones are not run: with several ranks, the ranks may be out of step after it.
    A scenario's result must not be a str (a str is read as its traceback)."""
    out = {}
    for name in names:
        try:
            out[name] = run(name)
        except Exception:
            out[name] = traceback.format_exc()
            break
    return out


def selected(request, table: Iterable[str], run_of: Callable[[object], str | None]) -> list[str]:
    """The names in `table` (in its order) that the tests of this session read: `run_of(item)` is
    the name test `item` reads, or None."""
    wanted = {run_of(item) for item in request.session.items}
    return [name for name in table if name in wanted]


def _failure(runs: dict, name: str) -> str | None:
    if name not in runs:
        return f"run {name!r} not reached (an earlier run raised: {list(runs)})"
    if isinstance(runs[name], str):
        return f"run {name!r} raised\n{runs[name]}"
    return None


def result(runs: dict, name: str):
    """Scenario `name`'s result from one rank's `run_in_turn`; one that raised (or was not reached)
    fails the test with why."""
    __tracebackhide__ = True  # the failure is the scenario's traceback, not this frame
    failure = _failure(runs, name)
    if failure:
        pytest.fail(failure)
    return runs[name]


def results_by_rank(runs_by_rank: list[dict], name: str) -> list:
    """Scenario `name`'s result by rank; one that raised (or was not reached) on any rank fails the
    test with that rank's why."""
    __tracebackhide__ = True
    for rank, runs in enumerate(runs_by_rank):
        failure = _failure(runs, name)
        if failure:
            pytest.fail(f"rank {rank}: {failure}")
    return [runs[name] for runs in runs_by_rank]
