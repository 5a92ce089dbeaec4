"""The clock tests move by hand: actors, projections and the API decide with it; nothing sleeps."""

from __future__ import annotations

import time


class Clock:
    """Starts at ``now`` (by default the real time when it is made) and moves only when a test
    sets ``now``."""

    def __init__(self, now: float | None = None) -> None:
        self.now = time.time() if now is None else now

    def __call__(self) -> float:
        return self.now
