"""The session manager: the seed's session API, one implementation (async).

Every argument is validated here, before anything is sent, so bad input gets a
:class:`~blackbird.errors.ValidationError` naming the field and appends nothing.
"""

from __future__ import annotations

import json
import os
from typing import Any

import structlog

from actors.events import (
    ChangeTier,
    CreateSession,
    GetSession,
    SessionCommand,
    TerminateSession,
    TouchSession,
)
from actors.policy import Policy
from blackbird._dispatch import Dispatcher, raise_for_rejection
from blackbird.errors import PayloadTooLargeError, SessionNotFoundError, ValidationError
from blackbird.subjects import validate_token
from blackbird.types import Session

log = structlog.get_logger("blackbird.sessions")

MAX_METADATA_BYTES = 64 * 1024
MAX_TEXT_LENGTH = 256


def _check_text(value: Any, field: str) -> str:
    expected = f"a non-empty string of at most {MAX_TEXT_LENGTH} characters"
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_LENGTH:
        got = type(value).__name__ if not isinstance(value, str) else f"{len(value)} characters"
        raise ValidationError(f"{field}: expected {expected}, got {got}", field=field, expected=expected, got=got)
    return value


def _check_metadata(metadata: Any) -> dict[str, Any]:
    expected = "a JSON-serialisable dict with string keys"
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise ValidationError(
            f"metadata: expected {expected}, got {type(metadata).__name__}",
            field="metadata",
            expected=expected,
            got=type(metadata).__name__,
        )
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            f"metadata: expected {expected}; {exc}", field="metadata", expected=expected, got=str(exc)
        ) from None
    if len(encoded) > MAX_METADATA_BYTES:
        raise PayloadTooLargeError(
            f"metadata: {len(encoded)} bytes as JSON, expected at most {MAX_METADATA_BYTES}",
            field="metadata",
            expected=f"at most {MAX_METADATA_BYTES} bytes",
            got=len(encoded),
        )
    # round-trip so that what is stored is exactly what JSON can carry (tuples -> lists, ...)
    return json.loads(encoded)


class AsyncSessionManager:
    """Create, read, touch, re-tier and terminate sessions. Every write is durable when it returns."""

    def __init__(self, dispatcher: Dispatcher, policy: Policy, *, tenant: str, principal: str) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self._tenant = validate_token(tenant, "tenant")
        self._principal = principal

    def _tenant_of(self, tenant: str | None) -> str:
        if tenant is None or tenant == self._tenant:
            return self._tenant  # validated once, in __init__
        return validate_token(tenant, "tenant")

    def _tier(self, tier: Any) -> str:
        known = sorted(self._policy.tiers)
        expected = "one of " + ", ".join(known)
        value = getattr(tier, "value", tier)  # accept a str Enum
        if not isinstance(value, str) or value not in self._policy.tiers:
            got = value if isinstance(value, str) else type(value).__name__
            raise ValidationError(f"tier: expected {expected}, got {got!r}", field="tier", expected=expected, got=got)
        return value

    async def _send(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> Session | None:
        tenant = self._tenant_of(tenant)
        session_id = validate_token(session_id, "session_id")
        if command_id is not None:
            validate_token(command_id, "command_id")
        reply = await self._dispatcher.dispatch(
            tenant, session_id, command, command_id or os.urandom(16).hex(), self._principal
        )
        raise_for_rejection(reply)
        return Session.from_view(reply.session) if reply.session is not None else None

    async def _send_existing(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> Session:
        session = await self._send(tenant, session_id, command, command_id)
        if session is None:  # a command on an unknown session is refused by decide(); belt and braces
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return session

    async def create_session(
        self,
        user_id: str,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        *,
        tenant: str | None = None,
        session_id: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Create a session for ``user_id`` under ``tier`` and return it once it is durable.

        ``session_id`` defaults to a new random id. Passing the same ``command_id`` again
        (a retry) returns the session without creating a second one. Raises ValidationError
        (naming the field) for a bad user_id, tier, metadata or id; SessionExistsError if
        ``session_id`` is taken.
        """
        user_id = validate_token(user_id, "user_id")
        command = CreateSession(user_id=user_id, tier=self._tier(tier), metadata=_check_metadata(metadata))
        sid = os.urandom(16).hex() if session_id is None else session_id
        return await self._send_existing(tenant, sid, command, command_id)

    async def get_session(self, session_id: str, *, tenant: str | None = None) -> Session | None:
        """The session as it is now (read-your-writes across hosts), or None if unknown."""
        try:
            return await self._send(tenant, session_id, GetSession(), None)
        except SessionNotFoundError:
            return None

    async def get_session_data(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The session as a JSON-serialisable dict (with is_active, age and idle seconds), or None."""
        session = await self.get_session(session_id, tenant=tenant)
        return None if session is None else session.to_dict()

    async def touch_session(
        self, session_id: str, operation: str = "activity", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Record activity (resets the idle timer). Raises SessionInactiveError if it lapsed."""
        command = TouchSession(operation=_check_text(operation, "operation"))
        return await self._send_existing(tenant, session_id, command, command_id)

    async def change_tier(
        self, session_id: str, tier: str, *, tenant: str | None = None, command_id: str | None = None
    ) -> Session:
        """Move a session to another tier; its limits apply at once (recorded as TierChanged)."""
        return await self._send_existing(tenant, session_id, ChangeTier(tier=self._tier(tier)), command_id)

    async def terminate_session(
        self, session_id: str, reason: str = "terminated", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Terminate a session; later commands on it raise SessionInactiveError."""
        command = TerminateSession(reason=_check_text(reason, "reason"))
        return await self._send_existing(tenant, session_id, command, command_id)

    def __repr__(self) -> str:
        return f"<AsyncSessionManager tenant={self._tenant!r}>"
