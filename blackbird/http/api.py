"""The JSON endpoints of the HTTP API (sessions, usage and limits, memory, messages, audits, keys)."""

from __future__ import annotations

from blackbird.http.routes import Endpoint, HttpContext


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """Every JSON endpoint, served with ``ctx``."""
    return []
