"""The participant endpoints of the HTTP API (join, leave, list a session's participants)."""

from __future__ import annotations

from blackbird.http.routes import Endpoint, HttpContext


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The endpoints of this module, served with ``ctx``."""
    return []
