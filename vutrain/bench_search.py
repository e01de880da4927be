"""The largest batch that fits: doubling until a batch fails, then bisection between the two."""

from __future__ import annotations

from collections.abc import Callable


def error_line(exc: BaseException, prefix: str | None = None) -> str:
    """One line for a benchmark row or search: ``prefix`` (default: the exception's type), then
    the first line of its message cut at 160 characters (CUDA errors run to pages)."""
    first_line = (str(exc).splitlines() or [""])[0][:160]
    return f"{prefix or type(exc).__name__}: {first_line}"


def largest_batch(
    fits: Callable[[int], bool],
    known_fit: int,
    start: int,
    limit: int,
    granularity: int = 8,
    precision: float = 0.0625,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Search the largest batch size `b <= limit` with `fits(b)` true, assuming fits is monotone.

    Args:
        fits: trains at a batch size and says whether it fitted (catching out-of-memory itself).
        known_fit: a batch size already known to fit (0 if none); the doubling starts above it.
        start: the first size probed when nothing is known to fit.
        limit: the largest size probed; reaching it is reported as `capped`.
        granularity: sizes probed while bisecting are multiples of it; bisection stops at this spacing
        precision: ... or once the failing and fitting sizes are within this fraction of the fitting one.
        stop: asked before each probe; True ends the search early with what is known (a time budget).

    Returns:
        {"largest_batch": int (0 if nothing fits), "capped": bool (the limit fitted, so the true
        largest may be larger), "failed_at": the smallest size that failed (None if none),
        "probes": [[size, fitted], ...] in the order probed, "stopped": True when `stop` ended it,
        "error": "Type: message" when `fits` raised (not an out-of-memory it caught): the search
        ends there and keeps the bounds found so far, like a stop}.
    """
    # Refused before any probe: a start of 0 "fitted" and doubled to 0 again, forever, and a
    # granularity of 0 ended the bisection in a ZeroDivisionError after the doubling's probes.
    if start < 1 or granularity < 1 or not 0 <= precision < 1:
        raise ValueError(
            f"largest_batch needs start >= 1, granularity >= 1 and 0 <= precision < 1; "
            f"got start={start}, granularity={granularity}, precision={precision}"
        )
    probes: list[list] = []

    class Stopped(Exception):
        pass

    def probe(size: int) -> bool:
        if stop is not None and stop():
            raise Stopped
        ok = bool(fits(size))
        probes.append([size, ok])
        return ok

    state = {"lo": min(known_fit, limit), "hi": None}
    try:
        _search(probe, state, start, limit, granularity, precision)
    except Stopped:
        return {
            "largest_batch": state["lo"],
            "capped": False,
            "failed_at": state["hi"],
            "probes": probes,
            "stopped": True,
        }
    except Exception as exc:  # the sizes probed before the failure are still true: kept
        return {
            "largest_batch": state["lo"],
            "capped": False,
            "failed_at": state["hi"],
            "probes": probes,
            "stopped": False,
            "error": error_line(exc),
        }
    lo, hi = state["lo"], state["hi"]
    return {"largest_batch": lo, "capped": hi is None, "failed_at": hi, "probes": probes, "stopped": False}


def _search(
    probe: Callable[[int], bool], state: dict, start: int, limit: int, granularity: int, precision: float
) -> None:
    """Doubling, then bisection; `state` holds the best bounds so far (lo fits, hi fails)."""
    size = 2 * state["lo"] if state["lo"] else start
    while state["lo"] < limit:
        size = min(size, limit)
        if not probe(size):
            state["hi"] = size
            break
        state["lo"], size = size, 2 * size
    if state["hi"] is None:
        return
    while state["hi"] - state["lo"] > max(granularity, int(state["lo"] * precision)):
        mid = (state["lo"] + state["hi"]) // 2
        mid -= mid % granularity
        if mid <= state["lo"]:
            mid = state["lo"] + granularity
        if mid >= state["hi"]:
            break
        state["lo" if probe(mid) else "hi"] = mid
