"""New random ids (sessions, commands, memories): one maker, so every id has the same form."""

from __future__ import annotations

import hashlib
import os


def derived_id(*parts: str) -> str:
    """An id made from ``parts`` (the same parts give the same id), in :func:`new_id`'s form:
    for a retry that must reach the same aggregate as its first try."""
    return hashlib.blake2b("\x00".join(parts).encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def new_id(nbytes: int = 16) -> str:
    """A random id of ``nbytes`` bytes as lowercase hex: a valid subject token, unguessable."""
    return os.urandom(nbytes).hex()
