"""Who is calling the HTTP API: an API key, a bootstrap token, or a session's stream token.

* **API keys** (``Authorization: Bearer bbk_...``): event-sourced on the tenant aggregate, kept
  only as hashes (:mod:`blackbird.sessions.api_keys`); role ``admin`` (the tenant: every session,
  keys, monitoring, broadcast), ``service`` (every session of the tenant) or ``user`` (the
  sessions one user takes part in).
* **Bootstrap tokens** (``--http-tokens FILE``: a JSON map of token -> tenant): an admin of that
  tenant, to create the first API keys with.
* **Stream tokens** (``?token=...``, for a browser's EventSource, which cannot send headers):
  signed by the server, short-lived, read-only, for one session (:mod:`blackbird.http.tokens`).

Every command an HTTP call causes is recorded under the caller's principal (``key:<key id>``,
``token:<tenant>``), set for the request with :data:`blackbird.sessions.gateway.acting_principal`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, Literal, Protocol

import msgspec

from blackbird.errors import AccessDeniedError, BlackbirdError

__all__ = ["ALL_ROLES", "ADMIN", "Caller", "KeyVerifier", "TokenVerifier", "Unauthorized", "authenticate"]

Role = Literal["admin", "service", "user", "stream"]
ALL_ROLES: frozenset[str] = frozenset({"admin", "service", "user"})
ADMIN: frozenset[str] = frozenset({"admin"})
TENANT_WIDE: frozenset[str] = frozenset({"admin", "service"})


class Unauthorized(BlackbirdError):
    """No credentials, or credentials this server does not accept (unknown, expired, revoked,
    tampered): 401."""

    code = "unauthorized"


class Caller(msgspec.Struct, frozen=True, kw_only=True):
    """The authenticated identity of one request."""

    tenant: str
    role: Role
    principal: str  # recorded in the commits the request causes
    user_id: str | None = None  # role "user": whose sessions
    key_id: str | None = None  # an API key's id
    session_id: str | None = None  # role "stream": the one session it may read

    def require(self, roles: frozenset[str], action: str) -> None:
        """AccessDeniedError unless this caller's role is one of ``roles``."""
        if self.role not in roles:
            raise AccessDeniedError(
                f"{action}: a {self.role} credential may not (needs {' or '.join(sorted(roles))})",
                principal=self.principal, action=action, tenant=self.tenant,
            )

    def may_read(self, session_user: str, participants: Mapping[str, str], session_id: str) -> bool:
        """Whether this caller may see the session (a user: if they take part in it)."""
        if self.role == "stream":
            return self.session_id == session_id
        if self.role == "user":
            return self.user_id == session_user or (self.user_id or "") in participants
        return True


class VerifiedKey(Protocol):
    key_id: str
    tenant: str
    role: str
    user_id: str | None


class KeyVerifier(Protocol):
    def verify(self, presented: str) -> VerifiedKey | None:
        """The live API key ``presented`` is, or None (unknown, revoked, expired, tampered)."""
        ...


class TokenVerifier(Protocol):
    def verify(self, token: str) -> tuple[str, str] | None:
        """(tenant, session_id) of a valid stream token, or None."""
        ...


def authenticate(
    headers: Mapping[str, str],
    query: Mapping[str, str],
    *,
    keys: KeyVerifier | None,
    bootstrap: Mapping[str, str],
    stream_tokens: TokenVerifier | None,
) -> Caller:
    """The caller of a request, or Unauthorized. A ``?token=`` stream token is accepted only
    where the route allows it (the caller's role "stream" is checked by the route)."""
    scheme, _, presented = headers.get("authorization", "").partition(" ")
    presented = presented.strip()
    if scheme.lower() == "bearer" and presented:
        if keys is not None and presented.startswith("bbk_"):
            key = keys.verify(presented)
            if key is None:
                raise Unauthorized("the API key is unknown, revoked or expired")
            role: Any = key.role
            return Caller(
                tenant=key.tenant, role=role, principal=f"key:{key.key_id}", user_id=key.user_id, key_id=key.key_id
            )
        tenant = _bootstrap_tenant(presented, bootstrap)
        if tenant is None:
            raise Unauthorized("the bearer token is not one this server accepts")
        return Caller(tenant=tenant, role="admin", principal=f"token:{tenant}")
    token = query.get("token")
    if token and stream_tokens is not None:
        found = stream_tokens.verify(token)
        if found is None:
            raise Unauthorized("the stream token is invalid or expired")
        tenant, session_id = found
        return Caller(tenant=tenant, role="stream", principal=f"stream:{session_id}", session_id=session_id)
    raise Unauthorized("expected Authorization: Bearer <API key> (or ?token=<stream token> on a stream)")


def _bootstrap_tenant(presented: str, tokens: Mapping[str, str]) -> str | None:
    found = None
    for known, tenant in tokens.items():  # constant-time compare, no early exit on a hit
        if hmac.compare_digest(known.encode(), presented.encode()):
            found = tenant
    return found
