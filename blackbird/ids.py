"""New random ids (sessions, commands, memories): one maker, so every id has the same form."""

from __future__ import annotations

import os


def new_id(nbytes: int = 16) -> str:
    """A random id of ``nbytes`` bytes as lowercase hex: a valid subject token, unguessable."""
    return os.urandom(nbytes).hex()
