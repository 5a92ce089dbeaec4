"""An exact sliding-window log of admitted requests, packed as float64 timestamps in ``bytes``.

Exact: a request is admitted only if fewer than ``limit`` requests were admitted in the
``window`` seconds before it, so no window of that length, wherever it starts, ever holds more
than ``limit`` (no fixed-window boundary bursts, unlike counters that reset on the minute).
Packed bytes are one allocation the garbage collector never scans; memory is bounded by the
limit (8 bytes per admitted request still inside the window).
"""

from __future__ import annotations

import bisect
import struct

_WIDTH = 8


def _times(log: bytes) -> "memoryview[float]":
    return memoryview(log).cast("d")


def trim(log: bytes, now: float, window: float) -> bytes:
    """The log without entries older than ``now - window`` (they no longer count)."""
    if not log:
        return log
    times = _times(log)
    cut = bisect.bisect_right(times, now - window)
    return log[cut * _WIDTH :] if cut else log


def count(log: bytes, now: float, window: float) -> int:
    """Admitted requests in ``(now - window, now]``."""
    return len(trim(log, now, window)) // _WIDTH


def retry_after(log: bytes, now: float, window: float, limit: int) -> float:
    """Seconds until one more request would be admitted (0 if it would be now)."""
    live = trim(log, now, window)
    n = len(live) // _WIDTH
    if n < limit:
        return 0.0
    if limit == 0:
        return window
    # the (n - limit + 1)-th oldest live entry must leave the window first
    oldest_blocking = _times(live)[n - limit]
    return max(0.0, oldest_blocking + window - now)


def record(log: bytes, now: float, window: float) -> bytes:
    """The log trimmed to ``window`` with an admission at ``now`` appended."""
    return trim(log, now, window) + struct.pack("d", now)


def oldest(log: bytes) -> float | None:
    return _times(log)[0] if log else None
