"""The window of recent command ids an aggregate remembers, so a retry is applied once.

It outlives JetStream's duplicate window (2 minutes by default), which alone would let a late
retry through. Kept as packed 64-bit fingerprints in one ``bytes`` value rather than a tuple of
strings: a bytes object is a single allocation the garbage collector never scans, so a thousand
busy sessions with full windows cost no more per command than empty ones. (A tuple of 256
strings per session made sustained throughput fall by a quarter.) Two distinct ids share a
fingerprint with probability about 2^-64 per pair.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TypeVar

R = TypeVar("R")

#: How many recent command ids an aggregate remembers.
WINDOW = 256
_WIDTH = 8


def fingerprint(command_id: str) -> bytes:
    return hashlib.blake2b(command_id.encode(), digest_size=_WIDTH).digest()


def remember(window: bytes, command_ids: Iterable[str]) -> bytes:
    """``window`` with ``command_ids`` appended, keeping the newest WINDOW of them."""
    added = b"".join(fingerprint(c) for c in command_ids)
    return (window + added)[-WINDOW * _WIDTH :]


def seen(window: bytes, command_id: str) -> bool:
    """Whether ``command_id`` is among the ids remembered in ``window``."""
    needle = fingerprint(command_id)
    at = window.find(needle)
    while at != -1 and at % _WIDTH:  # a match must start on a fingerprint boundary
        at = window.find(needle, at + 1)
    return at != -1


#: How many recent refusals an aggregate remembers, so a retried refused command is refused
#: again with the same answer (not mistaken for a success).
REFUSALS = 64


def remember_refusals(
    refusals: dict[str, R], refused: Iterable[tuple[str, R]]
) -> dict[str, R]:
    """``refusals`` (fingerprint hex -> answer) with ``refused`` added, keeping the newest."""
    added = {fingerprint(command_id).hex(): answer for command_id, answer in refused}
    if not added:
        return refusals
    merged = {**refusals, **added}
    return dict(list(merged.items())[-REFUSALS:]) if len(merged) > REFUSALS else merged


def refusal(refusals: dict[str, R], command_id: str) -> R | None:
    return refusals.get(fingerprint(command_id).hex())


def size(window: bytes) -> int:
    return len(window) // _WIDTH
