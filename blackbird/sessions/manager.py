"""The session manager: the seed's session API (sessions, their limits and analytics), async.

Sessions are handled here; limits and analytics by the :class:`Quotas` and :class:`Analytics`
objects it is made of, which share one :class:`SessionGateway` (tenant, tier policy, session).

Every argument is validated here, before anything is sent, so bad input gets a
:class:`~blackbird.errors.ValidationError` naming the field and appends nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from typing import Any

import structlog

from actors.events import (
    AssignAgent,
    ChangeTier,
    CreateSession,
    JoinSession,
    LeaveSession,
    ParticipantRole,
    PostMessage,
    TerminateSession,
    TouchSession,
)
from actors.policy import QuotaType, RateLimitType
from actors.validation import MAX_MESSAGE_LENGTH
from blackbird._validate import check_metadata, check_str, check_text, invalid
from blackbird.errors import ValidationError
from blackbird.ids import derived_id, new_id
from blackbird.sessions.analytics import Analytics
from blackbird.sessions.gateway import SessionGateway
from blackbird.sessions.quotas import Quotas
from blackbird.subjects import validate_token
from blackbird.types import Admission, Session, UsageRecord

log = structlog.get_logger("blackbird.sessions")


class AsyncSessionManager:
    """Sessions and their limits: create, read, touch, re-tier and terminate sessions; quotas,
    rate limits, concurrency slots and admission; analytics from the read models. Every write
    is durable when it returns."""

    def __init__(self, gateway: SessionGateway, quotas: Quotas, analytics: Analytics) -> None:
        self._gateway = gateway
        self._quotas = quotas
        self._analytics = analytics
        self._current: tuple[str, str] | None = None  # the last session this client created

    @property
    def current_session(self) -> tuple[str, str] | None:
        """``(tenant, session_id)`` of the session this client created last (None before any):
        the session ``send_message`` uses when it is given none."""
        return self._current

    async def create_session(
        self,
        user_id: str,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        *,
        tenant: str | None = None,
        session_id: str | None = None,
        command_id: str | None = None,
        agent_id: str | None = None,
    ) -> Session:
        """Create a session for ``user_id`` under ``tier`` and return it once it is durable.

        ``agent_id`` is the agent that answers in it (None: the client's default agent); hand
        the session to another agent later with :meth:`hand_over`.

        ``session_id`` defaults to a new random id (with a ``command_id``: an id derived from it and
        ``user_id``). Passing the same ``command_id`` again (a retry) returns the session without
        creating a second one; a different creation under that ``command_id`` raises
        CommandIdReusedError. Raises ValidationError
        (naming the field) for a bad user_id, tier, metadata, agent_id or id; SessionExistsError if
        ``session_id`` is taken; SessionLimitError if the user already holds the tier's
        ``max_sessions_per_user`` open sessions (terminated and lapsed ones do not count).
        """
        user_id = validate_token(user_id, "user_id")
        tier = self._gateway.tier_name(tier, tenant)
        command = CreateSession(
            user_id=user_id, tier=tier, metadata=check_metadata(metadata),
            agent_id=None if agent_id is None else validate_token(agent_id, "agent_id"),
        )
        if session_id is None:
            # a retry (same command id) must reach the session its first try created
            session_id = new_id() if command_id is None else derived_id("session", user_id, command_id)
        sid = validate_token(session_id, "session_id")
        # The host counts the session against the user's limit (whichever way the command came).
        session = await self._gateway.send(tenant, sid, command, command_id)
        self._current = (session.tenant, session.session_id)
        return session

    async def get_session(self, session_id: str, *, tenant: str | None = None) -> Session | None:
        """The session as it is now (read-your-writes across hosts), or None if unknown."""
        return await self._gateway.find(session_id, tenant)

    async def get_session_data(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The session as a JSON-serialisable dict (with is_active, age and idle seconds), or None."""
        session = await self.get_session(session_id, tenant=tenant)
        return None if session is None else session.to_dict()

    async def touch_session(
        self, session_id: str, operation: str = "activity", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Record activity (resets the idle timer). Raises SessionInactiveError if it lapsed."""
        command = TouchSession(operation=check_text(operation, "operation"))
        return await self._gateway.send(tenant, session_id, command, command_id)

    async def change_tier(
        self, session_id: str, tier: str, *, tenant: str | None = None, command_id: str | None = None
    ) -> Session:
        """Move a session to another tier; its limits apply at once (recorded as TierChanged)."""
        command = ChangeTier(tier=self._gateway.tier_name(tier, tenant))
        return await self._gateway.send(tenant, session_id, command, command_id)

    async def terminate_session(
        self, session_id: str, reason: str = "terminated", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Terminate a session; later commands on it raise SessionInactiveError. It no longer
        counts against the user's open sessions."""
        command = TerminateSession(reason=check_text(reason, "reason"))
        return await self._gateway.send(tenant, session_id, command, command_id)

    async def send_message(
        self,
        message: str,
        *,
        session_id: str | None = None,
        channel: str = "chat",
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
        author: str | None = None,
    ) -> dict[str, Any]:
        """Post ``message`` on a channel of a session (default: the session this client created
        last) as a durable MessagePosted event; returns where it landed (``sequence`` is the
        stream sequence, the event id a resuming subscriber passes back). Counts as activity.
        Raises SessionInactiveError on a lapsed session.

        ``author`` is the posting user: the session's owner or a participant who joined with
        role "participant" may post; an observer or a user who did not join gets
        AccessDeniedError (``principal`` the author). Without ``author`` the message is a
        service's (an agent's, a notification) and is not checked."""
        if not isinstance(message, str) or len(message) > MAX_MESSAGE_LENGTH:
            got = type(message).__name__ if not isinstance(message, str) else f"{len(message)} characters"
            raise ValidationError(
                f"message: expected a string of at most {MAX_MESSAGE_LENGTH} characters, got {got}",
                field="message", expected=f"a string of at most {MAX_MESSAGE_LENGTH} characters", got=got,
            )
        check_str(message, "message")
        if session_id is None:
            if self._current is None:
                raise ValidationError(
                    "session_id: expected a session id (this client has created no session yet)",
                    field="session_id", expected="a session id", got=None,
                )
            tenant, session_id = self._current
        command = PostMessage(
            channel=validate_token(channel, "channel"), text=message, metadata=check_metadata(metadata),
            author=None if author is None else validate_token(author, "author"),
        )
        session, reply = await self._gateway.request(tenant, session_id, command, command_id)
        assert session is not None
        return {
            "session_id": session.session_id, "tenant": session.tenant, "channel": channel,
            "message": message, "sequence": reply.sequence,
        }

    async def join_session(
        self,
        session_id: str,
        user_id: str,
        role: str = "participant",
        *,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Let ``user_id`` take part in a session with ``role``: "participant" (posts and reads)
        or "observer" (reads only); returns the session (its ``participants`` map user ids to
        roles, the owner's being "owner"). Joining again changes the role. Recorded as
        ParticipantJoined.

        Raises ValidationError naming ``user_id`` for the owner (who cannot be re-roled) or
        ``role`` for another role; SessionInactiveError on a terminated or lapsed session."""
        value = getattr(role, "value", role)
        roles = [r.value for r in ParticipantRole]
        if value not in roles:
            raise invalid("role", "one of " + ", ".join(roles), repr(value))
        command = JoinSession(user_id=validate_token(user_id, "user_id"), role=ParticipantRole(value))
        return await self._gateway.send(tenant, session_id, command, command_id)

    async def leave_session(
        self, session_id: str, user_id: str, *, tenant: str | None = None, command_id: str | None = None
    ) -> Session:
        """``user_id`` no longer takes part in the session (recorded as ParticipantLeft); returns
        the session. Raises ValidationError naming ``user_id`` for the owner (who cannot leave)
        or a user who is not a participant; SessionInactiveError on a terminated or lapsed
        session."""
        command = LeaveSession(user_id=validate_token(user_id, "user_id"))
        return await self._gateway.send(tenant, session_id, command, command_id)

    async def hand_over(
        self, session_id: str, agent_id: str, *, tenant: str | None = None, command_id: str | None = None
    ) -> Session:
        """Hand a session over to agent ``agent_id``: its replies come from that agent from now
        on (recorded as AgentAssigned, with the agent it had); returns the session, whose
        ``agent_id`` is the new agent. Handing it to the agent it has changes nothing but counts
        as activity.

        An operator's action: over NATS it needs the service identity. Raises ValidationError
        naming ``agent_id`` for a bad id; SessionInactiveError on a terminated or lapsed
        session."""
        command = AssignAgent(agent_id=validate_token(agent_id, "agent_id"))
        return await self._gateway.send(tenant, session_id, command, command_id)

    # ------------------------------------------------------------------ limits (Quotas)

    async def get_quota(
        self, session_id: str, quota_type: QuotaType | str | None = None, *, tenant: str | None = None
    ) -> dict[str, Any]:
        """Quota usage now: ``{quota: {used, limit, remaining, usage_percentage, resets_at,
        reserved}}`` keyed by QuotaType value ("tokens", ...), or that one dict when
        ``quota_type`` is given. ``remaining`` already excludes reserved (unsettled) amounts;
        ``limit`` includes any live adjustment. Raises SessionNotFoundError."""
        return await self._quotas.get_quota(session_id, quota_type, tenant=tenant)

    async def get_rate_limits(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Per operation and window: ``{limit, remaining, reset_at}`` now (``reset_at``: when one
        more request would be admitted)."""
        return await self._quotas.get_rate_limits(session_id, tenant=tenant)

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
        return await self._quotas.track_usage(
            session_id, operation, resource_type, amount, metadata, tenant=tenant,
            command_id=command_id
        )

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Call ``callback(record)`` (sync or async) once per usage charged through this client
        (track_usage, admit, settle), after it is durable. A callback that raises is logged and
        breaks nothing."""
        self._quotas.add_usage_callback(callback)

    def remove_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        self._quotas.remove_usage_callback(callback)

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
        sliding: never more than the limit in any window, wherever it starts.

        Raises RateLimitError (message, retry_after seconds, limit_type, limit)."""
        return await self._quotas.enforce_rate_limit(
            session_id, operation, limit_type, tenant=tenant, command_id=command_id
        )

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
        """Take (``increment=True``) or give back a concurrency slot for ``operation``; returns
        the session's slots in use. Over the limit raises RateLimitError.

        A slot is a lease: one never given back (a crashed holder) expires after
        ``lease_seconds`` (the tier's default if None). Giving back releases the slot this
        ``holder`` took (default: the calling task; the synchronous facade uses the calling
        thread), so a caller whose increment was refused and who decrements anyway (a
        ``finally`` block) cannot free somebody else's slot. Giving back with no slot held is a
        no-op. To release from elsewhere, use :meth:`release_slot` with the lease id.
        """
        return await self._quotas.manage_concurrency(
            session_id, operation, increment, tenant=tenant,
            lease_seconds=lease_seconds, holder=holder
        )

    async def release_slot(
        self, session_id: str, operation: str, lease_id: str | None = None, *,
        tenant: str | None = None, command_id: str | None = None,
    ) -> int:
        """Give back the slot ``lease_id`` (from :meth:`admit`), or the oldest slot of
        ``operation``; returns the slots in use. Idempotent."""
        return await self._quotas.release_slot(
            session_id, operation, lease_id, tenant=tenant, command_id=command_id
        )

    @contextlib.asynccontextmanager
    async def concurrency_slot(
        self, session_id: str, operation: str, *, tenant: str | None = None
    ) -> AsyncIterator[None]:
        """``async with`` a concurrency slot; it is given back on exit, even on error."""
        async with self._quotas.concurrency_slot(session_id, operation, tenant=tenant):
            yield

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
        concurrency slot (if ``slot``) in one decision: everything is granted together, or
        nothing is and the first limit hit is raised (QuotaExceededError or RateLimitError).

        With ``reserve=True`` the costs are held, not charged: settle the real amounts with
        :meth:`settle` once known (e.g. the tokens an LLM stream really used); an unsettled
        hold is released after ``hold_seconds``. The slot, if taken, is a lease: give it back
        with :meth:`release_slot` or let it expire after ``lease_seconds``.
        """
        return await self._quotas.admit(
            session_id, operation, costs, rate=rate, slot=slot, reserve=reserve,
            lease_seconds=lease_seconds, hold_seconds=hold_seconds, tenant=tenant,
            command_id=command_id
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
        """Hold ``costs`` (an estimate, e.g. max tokens) against the quotas; settle the real
        amounts with :meth:`settle`. Raises QuotaExceededError if the estimate does not fit."""
        return await self._quotas.reserve(
            session_id, operation, costs, hold_seconds=hold_seconds, tenant=tenant,
            command_id=command_id
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
        """Charge what reserved work really used (``actual``; None or {} charges nothing) and
        release the hold; returns what was charged. Settling never fails for quota (the work is
        done: an overshoot is recorded and later requests are refused instead). Raises
        ReservationNotFoundError if the hold expired, was settled already or never existed."""
        return await self._quotas.settle(
            session_id, reservation_id, actual, tenant=tenant, command_id=command_id
        )

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
        timedelta from now; None: until changed again). ``limit=None`` removes the adjustment.
        A session adjustment wins over a user one, which wins over the tier. The change is an
        event; a boost ends by itself at ``until``. Returns the adjusted quota's info (for a
        session) or the user's adjustments."""
        return await self._quotas.adjust_quota(
            session_id, quota_type, limit, until, user_id=user_id, tenant=tenant,
            command_id=command_id
        )

    async def set_tenant_policy(
        self, overrides: dict[str, Any], *, tenant: str | None = None, command_id: str | None = None
    ) -> dict[str, Any]:
        """Merge ``overrides`` (any part of the tier policy document, e.g. ``{"tiers": {"pro":
        {"quotas": {"tokens": {"limit": 5000}}}}}``) into the tenant's policy; the change is an
        event and gets the next policy version, which every later decision records. Returns
        the tenant's effective policy. Raises ValidationError naming the wrong field."""
        return await self._quotas.set_tenant_policy(overrides, tenant=tenant, command_id=command_id)

    async def get_tenant_policy(self, *, tenant: str | None = None) -> dict[str, Any]:
        """The tenant's effective tier policy as a JSON-ready dict (with its ``version``)."""
        return await self._quotas.get_tenant_policy(tenant=tenant)

    # ------------------------------------------------------------------ analytics (read models)

    async def get_user_sessions(self, user_id: str, *, tenant: str | None = None) -> list[Session]:
        """Every session of ``user_id`` in the tenant (oldest first), as of the read model."""
        return await self._analytics.get_user_sessions(user_id, tenant=tenant)

    async def get_tenant_sessions(self, *, tenant: str | None = None) -> list[Session]:
        """Every session of the tenant (oldest first), as of the read model: ids, users, tiers,
        status and times (read a session itself for its usage, leases and participants)."""
        return await self._analytics.get_tenant_sessions(tenant=tenant)

    async def get_usage_history(
        self,
        user_id: str,
        limit: int = 100,
        since: float | None = None,
        resource_type: QuotaType | str | None = None,
        *,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The user's usage records, newest first: JSON-ready dicts with operation,
        resource_type (the value, as get_quota's keys), amount, timestamp, session_id, metadata
        and the log sequence. Includes everything this client tracked before the call."""
        return await self._analytics.get_usage_history(
            user_id, limit, since, resource_type, tenant=tenant
        )

    async def get_statistics(self, *, tenant: str | None = None) -> dict[str, Any]:
        """Tenant-wide figures (JSON-ready): active_sessions, total_sessions, total_users,
        average_sessions_per_user, sessions_by_tier, usage_by_resource, refusals, alerts and
        the projections' lag (commits not yet applied)."""
        return await self._analytics.get_statistics(tenant=tenant)

    async def get_user_analytics(self, user_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """One user's sessions, operation breakdown, resource usage, most used operation,
        refusals and alerts (exact over the whole history)."""
        return await self._analytics.get_user_analytics(user_id, tenant=tenant)

    async def get_tenant_analytics(self, *, tenant: str | None = None) -> dict[str, Any]:
        """The tenant's statistics plus its top users and most recent alerts."""
        return await self._analytics.get_tenant_analytics(tenant=tenant)

    async def get_cross_tenant_analytics(self, k: int | None = None) -> dict[str, Any]:
        """Aggregates across tenants for the operator. Tenants with fewer than ``k`` users
        (default: the ``analytics_k`` setting) are left out, so no figure describes a small
        group; only how many were left out is reported."""
        return await self._analytics.get_cross_tenant_analytics(k)

    async def predict_quota_exhaustion(
        self, session_id: str, window: float = 3600.0, *, tenant: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per quota the session used in the last ``window`` seconds: the usage rate (per hour),
        hours until the remaining quota runs out at that rate and the predicted instant
        (seconds since the epoch); ``resets_first`` when the quota resets before that."""
        return await self._analytics.predict_quota_exhaustion(session_id, window, tenant=tenant)

    def __repr__(self) -> str:
        return f"<AsyncSessionManager tenant={self._gateway.tenant!r}>"
