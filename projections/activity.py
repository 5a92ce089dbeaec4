"""The activity read model: sessions per user, usage history, counters and alerts, per tenant.

One deterministic fold over every commit of the log (``<prefix>.>``). Everything is kept per
tenant, so every query reads inside one tenant's wall; cross-tenant figures are aggregates only
(:func:`cross_tenant`), and hide tenants with fewer than ``k`` users.

Counters are exact over the whole history; the per-user usage history keeps the newest
``history_limit`` records (the log keeps all of them: an audit replays the log).
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from actors.events import (
    AlertRaised,
    Commit,
    QuotaDenied,
    RateDenied,
    SessionCreated,
    SessionExpired,
    SessionTerminated,
    SlotDenied,
    TenantPolicyChanged,
    TierChanged,
    UsageTracked,
)
from actors.session import ACTIVITY_EVENTS

DEFAULT_HISTORY_LIMIT = 10_000


class SessionRow(msgspec.Struct, kw_only=True):
    session_id: str
    user_id: str
    tier: str
    status: str  # "active" | "expired" | "terminated"
    created_at: float
    last_activity: float
    idle_timeout: float
    max_age: float
    seq: int  # where it was created
    metadata: dict[str, Any] = {}

    def active_at(self, now: float) -> bool:
        return (
            self.status == "active"
            and now - self.last_activity < self.idle_timeout
            and now - self.created_at < self.max_age
        )


class UsageRow(msgspec.Struct, frozen=True, gc=False):
    seq: int
    at: float
    session_id: str
    operation: str
    resource_type: str
    amount: float
    metadata: dict[str, Any]


class AlertRow(msgspec.Struct, frozen=True, gc=False):
    seq: int
    at: float
    kind: str
    user_id: str
    session_id: str | None
    detail: str
    value: float
    threshold: float


class Counters(msgspec.Struct):
    operations: dict[str, int] = {}  # usage records per operation
    resources: dict[str, float] = {}  # amount per resource type
    refusals: dict[str, int] = {}  # denial event name -> count
    events: int = 0


class UserModel(msgspec.Struct):
    sessions: list[str] = []
    history: list[UsageRow] = []  # oldest first, the newest history_limit
    counters: Counters = msgspec.field(default_factory=Counters)
    first_seen: float = 0.0
    last_seen: float = 0.0


class TenantModel(msgspec.Struct):
    sessions: dict[str, SessionRow] = {}
    users: dict[str, UserModel] = {}
    counters: Counters = msgspec.field(default_factory=Counters)
    alerts: list[AlertRow] = []  # the newest history_limit
    policy_version: int = 0


class Activity(msgspec.Struct):
    tenants: dict[str, TenantModel] = {}
    history_limit: int = DEFAULT_HISTORY_LIMIT


def _count(counters: Counters, event: Any) -> None:
    counters.events += 1
    if isinstance(event, UsageTracked):
        counters.operations[event.operation] = counters.operations.get(event.operation, 0) + 1
        resources = counters.resources
        resources[event.resource_type] = resources.get(event.resource_type, 0.0) + event.amount
    elif isinstance(event, (RateDenied, QuotaDenied, SlotDenied)):
        name = type(event).__name__
        counters.refusals[name] = counters.refusals.get(name, 0) + 1


def _bounded(rows: list[Any], limit: int) -> None:
    if len(rows) > limit * 2:  # trim in amortised steps, not on every append
        del rows[: len(rows) - limit]


class ActivityProjection:
    """The fold (see the module docstring)."""

    name = "activity"
    model_type = Activity

    def __init__(self, history_limit: int = DEFAULT_HISTORY_LIMIT) -> None:
        self.history_limit = history_limit

    def initial(self) -> Activity:
        return Activity(history_limit=self.history_limit)

    def apply(self, model: Activity, seq: int, subject: str, commit: Commit) -> list[Any]:
        parts = subject.split(".")
        tenant = model.tenants.get(parts[1])
        if tenant is None:
            tenant = model.tenants[parts[1]] = TenantModel()
        kind = parts[2]
        if kind == "session":
            self._session(model, tenant, parts[3], seq, commit)
        elif kind == "user":
            for applied in commit.commands:
                for event in applied.events:
                    if isinstance(event, AlertRaised):
                        tenant.alerts.append(AlertRow(
                            seq=seq, at=event.at, kind=event.kind, user_id=event.user_id,
                            session_id=event.session_id, detail=event.detail, value=event.value,
                            threshold=event.threshold,
                        ))
                        _bounded(tenant.alerts, model.history_limit)
        else:
            for applied in commit.commands:
                for event in applied.events:
                    if isinstance(event, TenantPolicyChanged):
                        tenant.policy_version = event.policy.version
        return []

    def _session(self, model: Activity, tenant: TenantModel, sid: str, seq: int, commit: Commit) -> None:
        for applied in commit.commands:
            for event in applied.events:
                if isinstance(event, SessionCreated):
                    tenant.sessions[sid] = SessionRow(
                        session_id=sid, user_id=event.user_id, tier=event.tier, status="active",
                        created_at=event.at, last_activity=event.at,
                        idle_timeout=event.idle_timeout, max_age=event.max_age, seq=seq,
                        metadata=event.metadata,
                    )
                    user = tenant.users.get(event.user_id)
                    if user is None:
                        user = tenant.users[event.user_id] = UserModel(first_seen=event.at)
                    user.sessions.append(sid)
                row = tenant.sessions.get(sid)
                if row is None:  # commits of a session whose creation is not in the log
                    continue
                user = tenant.users[row.user_id]
                user.last_seen = event.at
                _count(tenant.counters, event)
                _count(user.counters, event)
                if isinstance(event, ACTIVITY_EVENTS):
                    row.last_activity = event.at
                if isinstance(event, UsageTracked):
                    user.history.append(UsageRow(
                        seq=seq, at=event.at, session_id=sid, operation=event.operation,
                        resource_type=event.resource_type, amount=event.amount,
                        metadata=event.metadata,
                    ))
                    _bounded(user.history, model.history_limit)
                elif isinstance(event, TierChanged):
                    row.tier = event.new_tier
                    row.idle_timeout, row.max_age = event.idle_timeout, event.max_age
                elif isinstance(event, SessionExpired):
                    row.status = "expired"
                elif isinstance(event, SessionTerminated):
                    row.status = "terminated"


# --------------------------------------------------------------------------- queries (pure)


def usage_history(
    model: Activity, tenant: str, user_id: str, *, limit: int = 100, since: float | None = None,
    resource_type: str | None = None,
) -> list[dict[str, Any]]:
    """The user's usage records, newest first, as JSON-ready dicts."""
    user = model.tenants.get(tenant, TenantModel()).users.get(user_id)
    if user is None:
        return []
    rows: list[dict[str, Any]] = []
    for row in reversed(user.history[-model.history_limit :]):
        if since is not None and row.at < since:
            break
        if resource_type is not None and row.resource_type != resource_type:
            continue
        rows.append({
            "operation": row.operation, "resource_type": row.resource_type, "amount": row.amount,
            "timestamp": row.at, "session_id": row.session_id, "metadata": row.metadata,
            "sequence": row.seq,
        })
        if len(rows) >= limit:
            break
    return rows


def user_sessions(model: Activity, tenant: str, user_id: str) -> list[SessionRow]:
    t = model.tenants.get(tenant)
    if t is None or user_id not in t.users:
        return []
    return [t.sessions[sid] for sid in t.users[user_id].sessions]


def tenant_sessions(model: Activity, tenant: str) -> list[SessionRow]:
    """Every session of the tenant, oldest first."""
    t = model.tenants.get(tenant)
    return [] if t is None else sorted(t.sessions.values(), key=lambda row: row.seq)


def _most_used(operations: dict[str, int]) -> str | None:
    return max(sorted(operations), key=operations.__getitem__) if operations else None


def user_analytics(model: Activity, tenant: str, user_id: str, now: float) -> dict[str, Any]:
    t = model.tenants.get(tenant, TenantModel())
    user = t.users.get(user_id)
    if user is None:
        return {"user_id": user_id, "total_sessions": 0, "active_sessions": 0, "total_operations": 0,
                "operation_breakdown": {}, "resource_usage": {}, "most_used_operation": None,
                "refusals": {}, "alerts": 0}
    c = user.counters
    sessions = [t.sessions[sid] for sid in user.sessions]
    return {
        "user_id": user_id,
        "total_sessions": len(sessions),
        "active_sessions": sum(1 for s in sessions if s.active_at(now)),
        "total_operations": sum(c.operations.values()),
        "operation_breakdown": dict(c.operations),
        "resource_usage": dict(c.resources),
        "most_used_operation": _most_used(c.operations),
        "refusals": dict(c.refusals),
        "alerts": sum(1 for a in t.alerts if a.user_id == user_id),
        "first_seen": user.first_seen,
        "last_seen": user.last_seen,
    }


def statistics(model: Activity, tenant: str, now: float) -> dict[str, Any]:
    """The seed's ``get_statistics`` figures for one tenant (JSON-ready)."""
    t = model.tenants.get(tenant, TenantModel())
    by_tier: dict[str, int] = {}
    active = 0
    for row in t.sessions.values():
        if row.active_at(now):
            active += 1
            by_tier[row.tier] = by_tier.get(row.tier, 0) + 1
    users = len(t.users)
    return {
        "tenant": tenant,
        "active_sessions": active,
        "total_sessions": len(t.sessions),
        "total_users": users,
        "average_sessions_per_user": (len(t.sessions) / users) if users else 0.0,
        "sessions_by_tier": by_tier,
        "usage_by_resource": dict(t.counters.resources),
        "operations": dict(t.counters.operations),
        "refusals": dict(t.counters.refusals),
        "alerts": len(t.alerts),
        "tenant_policy_version": t.policy_version,  # 0: the packaged policy, never overridden
    }


def tenant_analytics(model: Activity, tenant: str, now: float) -> dict[str, Any]:
    stats = statistics(model, tenant, now)
    t = model.tenants.get(tenant, TenantModel())
    top = sorted(t.users.items(), key=lambda kv: (-sum(kv[1].counters.resources.values()), kv[0]))
    stats["top_users"] = [
        {"user_id": uid, "resource_usage": dict(u.counters.resources),
         "operations": sum(u.counters.operations.values())}
        for uid, u in top[:10]
    ]
    stats["most_used_operation"] = _most_used(t.counters.operations)
    stats["recent_alerts"] = [msgspec.to_builtins(a) for a in t.alerts[-10:]]
    return stats


def cross_tenant(model: Activity, k: int, now: float) -> dict[str, Any]:
    """Aggregates over tenants with at least ``k`` users; smaller tenants are left out entirely
    (only how many were hidden is reported), so no figure describes a small group."""
    included = [t for t in model.tenants.values() if len(t.users) >= k]
    resources: dict[str, float] = {}
    operations: dict[str, int] = {}
    for t in included:
        for r, amount in t.counters.resources.items():
            resources[r] = resources.get(r, 0.0) + amount
        for op, n in t.counters.operations.items():
            operations[op] = operations.get(op, 0) + n
    users = sum(len(t.users) for t in included)
    sessions = sum(len(t.sessions) for t in included)
    return {
        "k": k,
        "tenants_included": len(included),
        "tenants_hidden": len(model.tenants) - len(included),
        "total_users": users,
        "total_sessions": sessions,
        "active_sessions": sum(1 for t in included for s in t.sessions.values() if s.active_at(now)),
        "average_sessions_per_user": sessions / users if users else 0.0,
        "usage_by_resource": resources,
        "operations": operations,
    }


def predict_exhaustion(
    history: list[dict[str, Any]], quotas: dict[str, dict[str, Any]], now: float, window: float
) -> dict[str, dict[str, Any]]:
    """Per quota with recent use: the usage rate over the last ``window`` seconds (from the
    newest-first ``history``; the caller shortens the window for a younger session), hours
    until ``remaining`` runs out at that rate and the predicted instant (seconds since the
    epoch). A predicted instant after the quota's reset is reported with ``resets_first`` True."""
    used: dict[str, float] = {}
    for row in history:
        if row["timestamp"] < now - window:
            break
        used[row["resource_type"]] = used.get(row["resource_type"], 0.0) + row["amount"]
    out: dict[str, dict[str, Any]] = {}
    for quota, info in quotas.items():
        amount = used.get(quota, 0.0)
        if amount <= 0:
            continue
        rate = amount / window  # per second
        remaining = info["remaining"]
        seconds = remaining / rate if math.isfinite(remaining) else math.inf
        resets = info.get("resets_at")
        out[quota] = {
            "rate_per_hour": rate * 3600,
            "remaining": remaining,
            "time_to_exhaustion_hours": seconds / 3600,
            "predicted_exhaustion": now + seconds if math.isfinite(seconds) else None,
            "resets_first": resets is not None and now + seconds > resets,
        }
    return out
