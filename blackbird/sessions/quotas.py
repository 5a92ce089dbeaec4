"""Quotas, rate limits, concurrency slots, admission and tenant policy on sessions.

:class:`~blackbird.sessions.manager.AsyncSessionManager` forwards its limit methods here.

Every decision is made by the session's actor from its own state (exact under concurrency) and
recorded as an event with the policy version it used, allowed or denied.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import anyio
import msgspec
import structlog

from actors import quota
from actors.events import (
    AcquireSlot,
    AdjustQuota,
    AdjustUserQuota,
    Admit,
    CheckRate,
    CommandReply,
    RateAllowed,
    ReleaseSlot,
    Reserved,
    SetTenantPolicy,
    Settle,
    SlotAcquired,
    TrackUsage,
    UsageTracked,
)
from actors.policy import Policy, QuotaType, RateLimitType
from actors.validation import POLICY
from blackbird._validate import (
    check_amount,
    check_bool,
    check_costs,
    check_enum,
    check_instant,
    check_metadata,
    check_seconds,
    check_text,
)
from blackbird.errors import ValidationError
from blackbird.sessions.gateway import SessionGateway
from blackbird.subjects import validate_token
from blackbird.types import Admission, UsageRecord

log = structlog.get_logger("blackbird.quotas")


class Quotas:
    """Quotas, rate limits, concurrency slots, admission and tenant policy on sessions (the
    session manager forwards its limit methods here)."""

    def __init__(self, gateway: SessionGateway) -> None:
        self._gateway = gateway
        self._usage_callbacks: list[Callable[[UsageRecord], Any]] = []
        # leases this client holds: (tenant, session, operation, holder) -> lease ids
        self._held: dict[tuple[str, str, str, Hashable], list[str]] = {}

    # ------------------------------------------------------------------ reading limits

    async def get_quota(
        self, session_id: str, quota_type: QuotaType | str | None = None, *, tenant: str | None = None
    ) -> dict[str, Any]:
        """Quota usage now."""
        wanted = None if quota_type is None else check_enum(quota_type, QuotaType, "quota_type")
        session = await self._gateway.existing(session_id, tenant)
        boosts = self._gateway.policies.user_boosts(session.tenant, session.user_id)
        info = quota.quota_info(session, self._gateway.tier_policy(session), self._gateway.clock(), boosts)
        if wanted is None:
            return info
        return info.get(wanted.value) or {
            "used": 0.0, "limit": math.inf, "remaining": math.inf, "usage_percentage": 0.0,
            "resets_at": None, "reserved": 0.0,
        }

    async def get_rate_limits(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Per operation and window."""
        session = await self._gateway.existing(session_id, tenant)
        return quota.rate_status(session, self._gateway.tier_policy(session), self._gateway.clock())

    # ------------------------------------------------------------------ usage

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
        """Count ``amount`` of ``resource_type`` against the session's quota."""
        command = TrackUsage(
            operation=check_text(operation, "operation"),
            resource_type=check_enum(resource_type, QuotaType, "resource_type"),
            amount=check_amount(amount),
            metadata=check_metadata(metadata),
        )
        await self._report_usage(await self._gateway.dispatch(tenant, session_id, command, command_id))
        return True

    async def _report_usage(self, reply: CommandReply) -> dict[str, float]:
        """Call the usage callbacks once per UsageTracked in ``reply``; the amounts charged."""
        charged: dict[str, float] = {}
        session = reply.session
        for event in reply.events:
            if not isinstance(event, UsageTracked):
                continue
            charged[event.resource_type] = charged.get(event.resource_type, 0.0) + event.amount
            if self._usage_callbacks and session is not None:
                await self._notify(
                    UsageRecord(
                        session_id=session.session_id, user_id=session.user_id, tenant=session.tenant,
                        operation=event.operation, resource_type=QuotaType(event.resource_type),
                        amount=event.amount, metadata=event.metadata, timestamp=event.at,
                    )
                )
        return charged

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Call ``callback(record)`` (sync or async) once per usage charged through this client
        (track_usage, admit, settle), after it is durable."""
        self._usage_callbacks.append(callback)

    def remove_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Stop calling ``callback``."""
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

    # ------------------------------------------------------------------ rate limits

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
        room."""
        command = CheckRate(
            operation=check_text(operation, "operation"),
            limit_type=None if limit_type is None else check_enum(limit_type, RateLimitType, "limit_type"),
        )
        await self._gateway.dispatch(tenant, session_id, command, command_id)
        return True

    # ------------------------------------------------------------------ concurrency

    async def manage_concurrency(
        self,
        session_id: str,
        operation: str,
        increment: bool,
        *,
        tenant: str | None = None,
        lease_seconds: float | None = None,
        holder: Hashable | None = None,
    ) -> int:
        """Take (``increment=True``) or give back a concurrency slot for ``operation``."""
        operation = check_text(operation, "operation")
        increment = check_bool(increment, "increment")
        if holder is None:
            holder = ("task", anyio.get_current_task().id)
        key = (self._gateway.tenant_of(tenant), validate_token(session_id, "session_id"), operation, holder)
        if increment:
            command = AcquireSlot(operation=operation, lease_seconds=check_seconds(lease_seconds, "lease_seconds"))
            session, reply = await self._gateway.request(tenant, session_id, command, None)
            leases = [e.lease_id for e in reply.events if isinstance(e, SlotAcquired)]
            self._held.setdefault(key, []).extend(leases)
        else:
            held = self._held.get(key)
            if not held:
                log.debug("slot_release_without_slot", tenant=key[0], session_id=key[1], operation=operation)
                session = await self._gateway.existing(session_id, tenant)
                return session.concurrent_operations
            lease_id = held.pop()
            if not held:
                del self._held[key]
            session, _ = await self._gateway.request(
                tenant, session_id, ReleaseSlot(operation=operation, lease_id=lease_id), None
            )
        return session.concurrent_operations

    async def release_slot(
        self, session_id: str, operation: str, lease_id: str | None = None, *,
        tenant: str | None = None, command_id: str | None = None,
    ) -> int:
        """Give back the slot ``lease_id`` (from :meth:`admit`), or the oldest slot of
        ``operation``."""
        operation = check_text(operation, "operation")
        if lease_id is not None:
            lease_id = check_text(lease_id, "lease_id")
        session = await self._gateway.send(
            tenant, session_id, ReleaseSlot(operation=operation, lease_id=lease_id), command_id
        )
        return session.concurrent_operations

    @contextlib.asynccontextmanager
    async def concurrency_slot(
        self, session_id: str, operation: str, *, tenant: str | None = None
    ) -> AsyncIterator[None]:
        """``async with`` a concurrency slot."""
        holder = ("slot", object())  # this block's own slot, whichever task exits it
        await self.manage_concurrency(session_id, operation, True, tenant=tenant, holder=holder)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await self.manage_concurrency(session_id, operation, False, tenant=tenant, holder=holder)

    # ------------------------------------------------------------------ admission

    async def admit(
        self,
        session_id: str,
        operation: str,
        costs: dict[QuotaType | str, float] | None = None,
        *,
        rate: bool = True,
        slot: bool = True,
        reserve: bool = False,
        lease_seconds: float | None = None,
        hold_seconds: float | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Admission:
        """Check quotas for ``costs``, every rate window of ``operation`` (if ``rate``) and a
        concurrency slot (if ``slot``) in one decision."""
        command = Admit(
            operation=check_text(operation, "operation"),
            costs=check_costs(costs, QuotaType),
            rate=check_bool(rate, "rate"),
            slot=check_bool(slot, "slot"),
            reserve=check_bool(reserve, "reserve"),
            lease_seconds=check_seconds(lease_seconds, "lease_seconds"),
            hold_seconds=check_seconds(hold_seconds, "hold_seconds"),
        )
        reply = await self._gateway.dispatch(tenant, session_id, command, command_id)
        assert reply.session is not None
        charged = await self._report_usage(reply)
        admission: dict[str, Any] = {"charged": charged}
        for event in reply.events:
            if isinstance(event, Reserved):
                admission.update(reserved=event.amounts, reservation_id=event.reservation_id,
                                 reservation_expires_at=event.expires_at)
            elif isinstance(event, SlotAcquired):
                admission.update(lease_id=event.lease_id, fencing_token=event.fencing_token,
                                 lease_expires_at=event.expires_at)
            elif isinstance(event, RateAllowed):
                admission["rate_windows"] = event.windows
        return Admission(
            session_id=reply.session.session_id, operation=command.operation, sequence=reply.sequence,
            duplicate=reply.duplicate, **admission,
        )

    async def reserve(
        self,
        session_id: str,
        operation: str,
        costs: dict[QuotaType | str, float],
        *,
        hold_seconds: float | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Admission:
        """Hold ``costs`` (an estimate, e.g."""
        return await self.admit(
            session_id, operation, costs, rate=False, slot=False, reserve=True,
            hold_seconds=hold_seconds, tenant=tenant, command_id=command_id,
        )

    async def settle(
        self,
        session_id: str,
        reservation_id: str,
        actual: dict[QuotaType | str, float] | None = None,
        *,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> dict[str, float]:
        """Charge what reserved work really used (``actual``."""
        command = Settle(
            reservation_id=check_text(reservation_id, "reservation_id"),
            actual=check_costs(actual, QuotaType, "actual"),
        )
        return await self._report_usage(await self._gateway.dispatch(tenant, session_id, command, command_id))

    # ------------------------------------------------------------------ dynamic limits

    async def adjust_quota(
        self,
        session_id: str | None = None,
        quota_type: QuotaType | str | None = None,
        limit: float | None = None,
        until: Any = None,
        *,
        user_id: str | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> dict[str, Any]:
        """Set the limit of one quota for a session (``session_id``) or for every session of a
        user (``user_id=``), until ``until`` (seconds since the epoch, an aware datetime, or a
        timedelta from now."""
        if (session_id is None) == (user_id is None):
            raise ValidationError(
                "session_id/user_id: expected exactly one of them",
                field="session_id", expected="exactly one of session_id or user_id", got=None,
            )
        quota_type = check_enum(quota_type, QuotaType, "quota_type")
        new_limit = None if limit is None else check_amount(limit, "limit")
        deadline = check_instant(until, "until", self._gateway.clock())
        if user_id is not None:
            user_id = validate_token(user_id, "user_id")
            command = AdjustUserQuota(user_id=user_id, resource_type=quota_type, limit=new_limit, until=deadline)
            state = await self._gateway.tenant_commands(self._gateway.tenant_of(tenant), command, command_id)
            return {q: {"limit": lim, "until": u} for q, (lim, u) in state.user_boosts.get(user_id, {}).items()}
        adjust = AdjustQuota(resource_type=quota_type, limit=new_limit, until=deadline)
        session = await self._gateway.send(tenant, session_id, adjust, command_id)
        return await self.get_quota(session.session_id, quota_type, tenant=session.tenant)

    async def set_tenant_policy(
        self, overrides: dict[str, Any], *, tenant: str | None = None, command_id: str | None = None
    ) -> dict[str, Any]:
        """Merge ``overrides`` (any part of the tier policy document, e.g."""
        if not isinstance(overrides, dict):
            raise ValidationError(
                f"overrides: expected a dict, got {type(overrides).__name__}",
                field="overrides", expected="a dict (part of the tier policy document)",
                got=type(overrides).__name__,
            )
        command = SetTenantPolicy(overrides=check_metadata(overrides, "overrides", POLICY))
        tenant = self._gateway.tenant_of(tenant)
        await self._gateway.tenant_commands(tenant, command, command_id)
        return await self.get_tenant_policy(tenant=tenant)

    async def get_tenant_policy(self, *, tenant: str | None = None) -> dict[str, Any]:
        """The tenant's effective tier policy as a JSON-ready dict (with its ``version``)."""
        policy: Policy = self._gateway.policies.policy(self._gateway.tenant_of(tenant))
        return msgspec.to_builtins(policy)  # type: ignore[no-any-return]

