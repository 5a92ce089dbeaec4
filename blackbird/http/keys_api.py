"""The API-key endpoints of the HTTP API (admins create, list and revoke their tenant's keys)."""

from __future__ import annotations

from blackbird.http.routes import Endpoint, HttpContext


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The endpoints of this module, served with ``ctx``."""
    return []
