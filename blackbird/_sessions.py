"""The session manager: the seed's session API, one implementation (async).

Every argument is validated here, before anything is sent, so bad input gets a
:class:`~blackbird.errors.ValidationError` naming the field and appends nothing.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import json
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import anyio
import structlog

from actors import quota
from actors.events import (
    AcquireSlot,
    ChangeTier,
    CheckRate,
    CreateSession,
    GetSession,
    ReleaseSlot,
    SessionCommand,
    TerminateSession,
    TouchSession,
    TrackUsage,
)
from actors.policy import Policy, QuotaType, RateLimitType, TierPolicy
from blackbird._dispatch import Dispatcher, raise_for_rejection
from blackbird.errors import PayloadTooLargeError, SessionNotFoundError, ValidationError
from blackbird.subjects import validate_token
from blackbird.types import Session, UsageRecord

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


E = TypeVar("E", bound=enum.Enum)


def _enum(value: Any, kind: type[E], field: str) -> E:
    try:
        return kind(getattr(value, "value", value))
    except ValueError:
        expected = "one of " + ", ".join(str(m.value) for m in kind)
        got = value if isinstance(value, str) else type(value).__name__
        raise ValidationError(f"{field}: expected {expected}, got {got!r}", field=field, expected=expected, got=got) from None


def _check_amount(amount: Any) -> float:
    expected = "a finite number >= 0"
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        got = type(amount).__name__
        raise ValidationError(f"amount: expected {expected}, got {got}", field="amount", expected=expected, got=got)
    if not math.isfinite(amount) or amount < 0 or amount > 1e15:
        raise ValidationError(f"amount: expected {expected}, got {amount!r}", field="amount", expected=expected, got=repr(amount))
    return float(amount)


class AsyncSessionManager:
    """Create, read, touch, re-tier and terminate sessions. Every write is durable when it returns."""

    def __init__(self, dispatcher: Dispatcher, policy: Policy, *, tenant: str, principal: str) -> None:
        self._dispatcher = dispatcher
        self._policy = policy
        self._tenant = validate_token(tenant, "tenant")
        self._usage_callbacks: list[Callable[[UsageRecord], Any]] = []
        self._held: dict[tuple[str, str, str], list[str]] = {}  # leases this client holds
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

    # ------------------------------------------------------------------ quotas and rate limits

    def _tier_policy(self, session: Session) -> TierPolicy:
        tier = self._policy.tier(session.tier)
        if tier is None:
            raise ValidationError(
                f"tier: session {session.session_id!r} is on tier {session.tier!r}, which the "
                "current policy no longer defines",
                field="tier", expected="a tier of the current policy", got=session.tier,
            )
        return tier

    async def _existing(self, session_id: Any, tenant: str | None) -> Session:
        session = await self.get_session(session_id, tenant=tenant)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return session

    async def get_quota(
        self, session_id: str, quota_type: QuotaType | str | None = None, *, tenant: str | None = None
    ) -> dict[str, Any]:
        """Quota usage now: ``{quota: {used, limit, remaining, usage_percentage, resets_at}}``,
        or that one dict when ``quota_type`` is given. Keys are QuotaType values ("tokens", ...)."""
        wanted = None if quota_type is None else _enum(quota_type, QuotaType, "quota_type")
        session = await self._existing(session_id, tenant)
        info = quota.quota_info(session, self._tier_policy(session), time.time())  # type: ignore[arg-type]
        if wanted is None:
            return info
        return info.get(wanted.value) or {
            "used": session.usage.get(wanted.value, (0.0, 0.0))[1], "limit": math.inf,
            "remaining": math.inf, "usage_percentage": 0.0, "resets_at": None,
        }

    async def track_usage(
        self,
        session_id: str,
        operation: str,
        resource_type: QuotaType | str,
        amount: float,
        metadata: dict[str, Any] | None = None,
        *,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> bool:
        """Count ``amount`` of ``resource_type`` against the session's quota; True once durable.

        Raises QuotaExceededError (message, used, limit, quota_type, resets_at) and counts
        nothing if it would exceed the quota; ValidationError for a negative, NaN, infinite or
        non-numeric amount. Usage callbacks run after the usage is durable.
        """
        command = TrackUsage(
            operation=_check_text(operation, "operation"),
            resource_type=_enum(resource_type, QuotaType, "resource_type"),
            amount=_check_amount(amount),
            metadata=_check_metadata(metadata),
        )
        session = await self._send_existing(tenant, session_id, command, command_id)
        if self._usage_callbacks:
            record = UsageRecord(
                session_id=session.session_id, user_id=session.user_id, tenant=session.tenant,
                operation=command.operation, resource_type=command.resource_type,
                amount=command.amount, metadata=command.metadata, timestamp=time.time(),
            )
            await self._notify(record)
        return True

    async def enforce_rate_limit(
        self,
        session_id: str,
        operation: str,
        limit_type: RateLimitType | str | None = None,
        *,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> bool:
        """Admit one ``operation`` request if every checked window (``limit_type``, or all) has
        room; True once durable. Exact under concurrency (the session's actor decides) and
        sliding (never more than the limit in any window, wherever it starts).

        Raises RateLimitError (message, retry_after seconds, limit_type, limit)."""
        command = CheckRate(
            operation=_check_text(operation, "operation"),
            limit_type=None if limit_type is None else _enum(limit_type, RateLimitType, "limit_type"),
        )
        await self._send_existing(tenant, session_id, command, command_id)
        return True

    async def get_rate_limits(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Per operation and window: ``{limit, remaining, reset_at}`` now."""
        session = await self._existing(session_id, tenant)
        return quota.rate_status(session, self._tier_policy(session), time.time())  # type: ignore[arg-type]

    async def manage_concurrency(
        self, session_id: str, operation: str, increment: bool, *, tenant: str | None = None
    ) -> int:
        """Take (``increment=True``) or give back a concurrency slot for ``operation``; returns
        the session's slots in use. Slots are leases: one never given back expires by itself.
        Over the limit raises RateLimitError."""
        operation = _check_text(operation, "operation")
        tenant = self._tenant_of(tenant)
        held = self._held.setdefault((tenant, str(session_id), operation), [])
        if increment:
            session = await self._send_existing(tenant, session_id, AcquireSlot(operation=operation), None)
            mine = max(
                (token, lid) for lid, (op, _, token) in session.leases.items() if op == operation
            )
            held.append(mine[1])
        else:
            lease_id = held.pop() if held else None
            session = await self._send_existing(
                tenant, session_id, ReleaseSlot(operation=operation, lease_id=lease_id), None
            )
        return session.concurrent_operations

    @contextlib.asynccontextmanager
    async def concurrency_slot(
        self, session_id: str, operation: str, *, tenant: str | None = None
    ) -> AsyncIterator[None]:
        """``async with`` a concurrency slot; it is given back on exit, even on error."""
        await self.manage_concurrency(session_id, operation, True, tenant=tenant)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.manage_concurrency(session_id, operation, False, tenant=tenant)

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Call ``callback(record)`` (sync or async) once per usage tracked through this client.
        A callback that raises is logged and breaks nothing."""
        self._usage_callbacks.append(callback)

    def remove_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        with contextlib.suppress(ValueError):
            self._usage_callbacks.remove(callback)

    async def _notify(self, record: UsageRecord) -> None:
        for callback in list(self._usage_callbacks):
            try:
                result = callback(record)
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                log.warning(
                    "usage_callback_failed", tenant=record.tenant, session_id=record.session_id,
                    callback=getattr(callback, "__qualname__", repr(callback)), error=repr(exc),
                )

    def __repr__(self) -> str:
        return f"<AsyncSessionManager tenant={self._tenant!r}>"
