"""The largest batch that fits: doubling until a batch fails, then bisection between the two."""
from __future__ import annotations

from typing import Callable


def largest_batch(fits: Callable[[int], bool], known_fit: int, start: int, limit: int,
                  granularity: int = 8, precision: float = 0.0625) -> dict:
    """Search the largest batch size `b <= limit` with `fits(b)` true, assuming fits is monotone.

    Args:
        fits: trains at a batch size and says whether it fitted (catching out-of-memory itself).
        known_fit: a batch size already known to fit (0 if none); the doubling starts above it.
        start: the first size probed when nothing is known to fit.
        limit: the largest size probed; reaching it is reported as `capped`.
        granularity: sizes probed while bisecting are multiples of it; bisection stops at this spacing
        precision: ... or once the failing and fitting sizes are within this fraction of the fitting one.

    Returns:
        {"largest_batch": int (0 if nothing fits), "capped": bool (the limit fitted, so the true
        largest may be larger), "failed_at": the smallest size that failed (None if none),
        "probes": [[size, fitted], ...] in the order probed}.
    """
    probes: list[list] = []

    def probe(size: int) -> bool:
        ok = bool(fits(size))
        probes.append([size, ok])
        return ok

    lo, hi = min(known_fit, limit), None
    size = 2 * lo if lo else start
    while lo < limit:
        size = min(size, limit)
        if not probe(size):
            hi = size
            break
        lo, size = size, 2 * size
    if hi is None:
        return {"largest_batch": lo, "capped": True, "failed_at": None, "probes": probes}
    while hi - lo > max(granularity, int(lo * precision)):
        mid = (lo + hi) // 2
        mid -= mid % granularity
        if mid <= lo:
            mid = lo + granularity
        if mid >= hi:
            break
        if probe(mid):
            lo = mid
        else:
            hi = mid
    return {"largest_batch": lo, "capped": False, "failed_at": hi, "probes": probes}
