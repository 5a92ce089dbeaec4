"""Read-model queries on sessions: usage history, statistics, analytics and predictions.

The session manager forwards its analytics methods here.

Answers come from the activity projection (a fold of the log). Each waits until the projection
has applied this client's last write (read-your-writes), or raises ProjectionTimeoutError.
Every query is scoped to one tenant; only :meth:`get_cross_tenant_analytics` spans tenants,
and it reports aggregates over tenants with at least ``k`` users.
"""

from __future__ import annotations

from typing import Any

from actors.events import SessionStatus
from actors.policy import QuotaType
from actors.validation import MAX_INSTANT
from blackbird._projections import Projections
from blackbird._validate import check_enum, check_seconds, invalid
from blackbird.errors import AccessDeniedError
from blackbird.sessions.gateway import SessionGateway
from blackbird.sessions.quotas import Quotas
from blackbird.subjects import validate_token
from blackbird.types import Session
from projections import activity
from projections.activity import Activity

ACTIVITY = "activity"


class Analytics:
    """Answers from the activity projection, scoped to a tenant, after this client's writes."""

    def __init__(self, gateway: SessionGateway, quotas: Quotas, projections: Projections | None, k: int) -> None:
        """``projections`` None: a client on tenant credentials, which reads no whole log."""
        self._gateway = gateway
        self._quotas = quotas
        self._projections = projections
        self._k = k

    @property
    def _read_models(self) -> Projections:
        if self._projections is None:
            raise AccessDeniedError(
                "analytics need the service identity: this client is connected with tenant credentials",
                principal=self._gateway.principal, action="analytics", tenant=self._gateway.tenant,
            )
        return self._projections

    async def _activity(self) -> Activity:
        runner = await self._read_models.caught_up(ACTIVITY, self._gateway.written)
        return runner.model  # type: ignore[no-any-return]

    async def get_user_sessions(self, user_id: str, *, tenant: str | None = None) -> list[Session]:
        """Every session of ``user_id`` in the tenant (oldest first), as of the read model."""
        user_id = validate_token(user_id, "user_id")
        tenant = self._gateway.tenant_of(tenant)
        return [_session(r, tenant) for r in activity.user_sessions(await self._activity(), tenant, user_id)]

    async def get_tenant_sessions(self, *, tenant: str | None = None) -> list[Session]:
        """Every session of the tenant (oldest first), as of the read model."""
        tenant = self._gateway.tenant_of(tenant)
        return [_session(r, tenant) for r in activity.tenant_sessions(await self._activity(), tenant)]

    async def get_usage_history(
        self,
        user_id: str,
        limit: int = 100,
        since: float | None = None,
        resource_type: QuotaType | str | None = None,
        *,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """The user's usage records, newest first."""
        user_id = validate_token(user_id, "user_id")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise invalid("limit", "a positive int", repr(limit))
        if since is not None and (
            isinstance(since, bool) or not isinstance(since, int | float) or not -MAX_INSTANT <= since <= MAX_INSTANT
        ):
            raise invalid("since", f"seconds since the epoch, at most {MAX_INSTANT:.0f}", repr(since)[:200])
        wanted = None if resource_type is None else check_enum(resource_type, QuotaType, "resource_type").value
        model = await self._activity()
        return activity.usage_history(
            model, self._gateway.tenant_of(tenant), user_id, limit=limit, since=since, resource_type=wanted
        )

    async def get_statistics(self, *, tenant: str | None = None) -> dict[str, Any]:
        """Tenant-wide figures (JSON-ready)."""
        stats = activity.statistics(await self._activity(), self._gateway.tenant_of(tenant), self._gateway.clock())
        stats["projection_lag"] = await self._read_models.lag()
        return stats

    async def get_user_analytics(self, user_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """One user's sessions, operation breakdown, resource usage, most used operation,
        refusals and alerts (exact over the whole history)."""
        user_id = validate_token(user_id, "user_id")
        return activity.user_analytics(
            await self._activity(), self._gateway.tenant_of(tenant), user_id, self._gateway.clock()
        )

    async def get_tenant_analytics(self, *, tenant: str | None = None) -> dict[str, Any]:
        """The tenant's statistics plus its top users and most recent alerts."""
        return activity.tenant_analytics(await self._activity(), self._gateway.tenant_of(tenant), self._gateway.clock())

    async def get_cross_tenant_analytics(self, k: int | None = None) -> dict[str, Any]:
        """Aggregates across tenants for the operator."""
        k = self._k if k is None else k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise invalid("k", "an int >= 1", repr(k))
        return activity.cross_tenant(await self._activity(), k, self._gateway.clock())

    async def predict_quota_exhaustion(
        self, session_id: str, window: float = 3600.0, *, tenant: str | None = None
    ) -> dict[str, dict[str, Any]]:
        """Per quota the session used in the last ``window`` seconds."""
        window = check_seconds(window, "window") or 3600.0
        session = await self._gateway.existing(session_id, tenant)
        quotas = await self._quotas.get_quota(session_id, tenant=tenant)
        history = [
            row for row in activity.usage_history(
                await self._activity(), session.tenant, session.user_id, limit=10**9,
                since=self._gateway.clock() - window,
            )
            if row["session_id"] == session.session_id
        ]
        now = self._gateway.clock()
        # a session younger than the window has used its quota over its own life, not the window
        span = max(60.0, min(window, now - session.created_at))
        return activity.predict_exhaustion(history, quotas, now, span)



def _session(row: activity.SessionRow, tenant: str) -> Session:
    """A session as the read model holds it (no usage, leases or participants: the actor's)."""
    return Session(
        session_id=row.session_id, user_id=row.user_id, tenant=tenant, tier=row.tier,
        status=SessionStatus(row.status), metadata=row.metadata, created_at=row.created_at,
        last_activity=row.last_activity, idle_timeout=row.idle_timeout, max_age=row.max_age,
        sequence=row.seq,
    )
