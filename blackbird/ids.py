"""New random ids (sessions, commands, memories): one maker, so every id has the same form."""

from __future__ import annotations

import hashlib
import os
import threading


def derived_id(*parts: str) -> str:
    """An id made from ``parts`` (the same parts give the same id), in :func:`new_id`'s form:
    for a retry that must reach the same aggregate as its first try."""
    return hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class _Randomness:
    """Bytes from the OS's random source, read 4 KiB at a time: an id costs a slice, not a
    system call (every command gets an id). A forked child starts with fresh bytes of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._buffer, self._at = b"", 0

    def take(self, n: int) -> bytes:
        with self._lock:
            if self._at + n > len(self._buffer):
                self._buffer, self._at = os.urandom(max(4096, n)), 0
            start = self._at
            self._at += n
            return self._buffer[start : start + n]


_RANDOM = _Randomness()


def new_id(nbytes: int = 16) -> str:
    """A random id of ``nbytes`` bytes as lowercase hex: a valid subject token, unguessable."""
    return _RANDOM.take(nbytes).hex()
