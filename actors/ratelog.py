"""A sliding-window log of admitted requests with bounded size, packed as float64 pairs in bytes.

The guarantee is the one a rate limit promises: in *no* interval of ``window`` seconds, wherever
it starts, are more than ``limit`` requests admitted (so no fixed-window boundary burst of twice
the limit). A request is admitted only if the log counts fewer than ``limit`` admissions in
``(now - window, now]``.

To keep memory and the cost of a check bounded however large the limit (a per-day limit of
two million would otherwise be a 16 MB log), admissions that fall in the same 1/64th of the
window are merged into one entry ``(time of the latest, count)``. An entry counts until its
*latest* admission leaves the window, so the log never undercounts: merging can only make the
limiter wait up to ``window / 64`` longer than a log of every timestamp would, never admit more.
Sparse traffic (at most one request per bucket) is counted exactly.

Entries are ``(t, n)`` pairs in ascending ``t``: at most ~65 per window in steady state.
"""

from __future__ import annotations

import bisect
import math
import struct

#: Buckets per window: the precision of the limiter (it may wait up to window/GRID too long).
GRID = 64
_PAIR = struct.Struct("dd")
_WIDTH = _PAIR.size


def _trim(log: bytes, now: float, window: float) -> bytes:
    """The entries still inside ``(now - window, now]`` (older ones no longer count)."""
    if not log:
        return log
    times = memoryview(log).cast("d")[0::2]
    cut = bisect.bisect_right(times, now - window)
    return log[cut * _WIDTH :] if cut else log


def _total(live: bytes) -> int:
    return int(sum(memoryview(live).cast("d")[1::2])) if live else 0


def count(log: bytes, now: float, window: float) -> int:
    """Admissions counted in ``(now - window, now]``."""
    return _total(_trim(log, now, window))


def retry_after(log: bytes, now: float, window: float, limit: int) -> float:
    """Seconds until one more request would be admitted (0.0 if it would be admitted now)."""
    live = _trim(log, now, window)
    excess = _total(live) - limit + 1  # admissions that must leave the window first
    if excess <= 0:
        return 0.0
    if limit == 0:
        return window
    values = memoryview(live).cast("d")
    seen = 0.0
    for i in range(0, len(values), 2):
        seen += values[i + 1]
        if seen >= excess:
            return max(0.0, values[i] + window - now)
    return window  # unreachable: excess <= total


def record(log: bytes, now: float, window: float) -> bytes:
    """The log, trimmed to ``window``, with one admission at ``now`` added."""
    live = _trim(log, now, window)
    if live:
        t_last, n_last = _PAIR.unpack_from(live, len(live) - _WIDTH)
        grid = window / GRID
        # Same bucket as the newest entry (or a clock that stepped back): merge into it,
        # keeping the later time so the merged entry counts until its last admission expires.
        if math.floor(now / grid) <= math.floor(t_last / grid):
            return live[:-_WIDTH] + _PAIR.pack(max(t_last, now), n_last + 1)
    return live + _PAIR.pack(now, 1.0)


def entries(log: bytes) -> list[tuple[float, int]]:
    """The log as ``[(time, count), ...]`` (for tests and audits)."""
    return [(t, int(n)) for t, n in _PAIR.iter_unpack(log)]
