"""A sliding-window log of admitted requests with bounded size, packed as float64s in bytes.

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

Layout: ``total`` (the sum of all entries' counts), then ``(t, n)`` pairs in ascending ``t``:
at most ~65 pairs per window in steady state. The total makes the common case cheap: if even
the untrimmed total is under the limit, the request is admitted without looking further.
"""

from __future__ import annotations

import bisect
import struct

#: Buckets per window: the precision of the limiter (it may wait up to window/GRID too long).
GRID = 64
_F = struct.Struct("d")
_PAIR = struct.Struct("dd")
_HEAD = _F.size
_WIDTH = _PAIR.size
EMPTY = b""
_ONE = struct.Struct("ddd")


def _first(now: float) -> bytes:
    return _ONE.pack(1.0, now, 1.0)


def _total(log: bytes) -> float:
    return _F.unpack_from(log)[0] if log else 0.0


def _trim(log: bytes, now: float, window: float) -> bytes:
    """The log without entries that left ``(now - window, now]``; its total adjusted."""
    if not log or _F.unpack_from(log, _HEAD)[0] > now - window:
        return log  # the oldest entry is still inside: nothing to cut
    values = memoryview(log).cast("d")
    cut = bisect.bisect_right(values[1::2], now - window)
    if cut * 2 >= len(values) - 1:
        return EMPTY
    gone = sum(values[2 : 2 + cut * 2 : 2])
    return _F.pack(values[0] - gone) + log[_HEAD + cut * _WIDTH :]


def count(log: bytes, now: float, window: float) -> int:
    """Admissions counted in ``(now - window, now]``."""
    return int(_total(_trim(log, now, window)))


def retry_after(log: bytes, now: float, window: float, limit: int) -> float:
    """Seconds until one more request would be admitted (0.0 if it would be admitted now)."""
    if _total(log) < limit:  # even counting expired entries there is room
        return 0.0
    if limit == 0:
        return window
    live = _trim(log, now, window)
    excess = _total(live) - limit + 1  # admissions that must leave the window first
    if excess <= 0:
        return 0.0
    values = memoryview(live).cast("d")
    seen = 0.0
    for i in range(1, len(values), 2):
        seen += values[i + 1]
        if seen >= excess:
            return max(0.0, values[i] + window - now)
    return window  # unreachable: excess <= total


def record(log: bytes, now: float, window: float) -> bytes:
    """The log, trimmed to ``window``, with one admission at ``now`` added."""
    live = _trim(log, now, window)
    if not live:
        return _first(now)
    end = len(live) - _WIDTH
    t_last, n_last = _PAIR.unpack_from(live, end)
    total = _F.pack(_F.unpack_from(live)[0] + 1.0)
    grid = window / GRID
    # Same bucket as the newest entry (or a clock that stepped back): merge into it, keeping
    # the later time so the merged entry counts until its last admission has left the window.
    if now // grid <= t_last // grid:
        return b"".join((total, live[_HEAD:end], _PAIR.pack(max(t_last, now), n_last + 1.0)))
    return b"".join((total, live[_HEAD:], _PAIR.pack(now, 1.0)))


def entries(log: bytes) -> list[tuple[float, int]]:
    """The log as ``[(time, count), ...]`` (for tests and audits)."""
    return [(t, int(n)) for t, n in _PAIR.iter_unpack(log[_HEAD:])] if log else []
