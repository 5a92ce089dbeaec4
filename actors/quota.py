"""Quota, rate-limit and concurrency decisions for the session aggregate (pure).

Each function takes the session state, the command, ``now`` and the tier policy in force and
returns a Decision whose events record the outcome either way: allowed (UsageTracked,
RateAllowed, SlotAcquired) or denied (QuotaDenied, RateDenied, SlotDenied) with the policy
version, so an audit shows why a request was refused.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from actors import ratelog
from actors.events import (
    AcquireSlot,
    CheckRate,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    Rejection,
    ReleaseSlot,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    SlotReleased,
    TrackUsage,
    UsageTracked,
)
from actors.policy import QuotaType, RateLimitType, TierPolicy

if TYPE_CHECKING:
    from actors.session import Decision, SessionState


def window_start(created_at: float, period: float, now: float) -> float:
    """Start of the quota window containing ``now`` (windows are aligned to session creation)."""
    return created_at + math.floor(max(0.0, now - created_at) / period) * period


def used_in_window(state: SessionState, resource: str, start: float) -> float:
    current = state.usage.get(resource)
    return current[1] if current is not None and current[0] == start else 0.0


def quota_info(state: SessionState, tier: TierPolicy, now: float) -> dict[str, dict[str, float]]:
    """``{quota: {used, limit, remaining, usage_percentage, resets_at}}`` at ``now``."""
    info: dict[str, dict[str, float]] = {}
    for quota, rule in tier.quotas.items():
        start = window_start(state.created_at, rule.period, now)
        used = used_in_window(state, quota.value, start)
        info[quota.value] = {
            "used": used,
            "limit": rule.limit,
            "remaining": max(0.0, rule.limit - used),
            "usage_percentage": (used / rule.limit * 100.0) if rule.limit else 100.0,
            "resets_at": start + rule.period,
        }
    return info


def decide_usage(
    state: SessionState, command: TrackUsage, now: float, tier: TierPolicy, version: int
) -> Decision:
    from actors.session import Decision

    resource = command.resource_type.value
    rule = tier.quotas.get(command.resource_type)
    if rule is None:  # not metered in this tier: count it, never refuse it
        start, limit = state.created_at, math.inf
    else:
        start, limit = window_start(state.created_at, rule.period, now), rule.limit
    used = used_in_window(state, resource, start)
    if used + command.amount > limit:
        resets_at = start + rule.period if rule is not None else math.inf
        denied = QuotaDenied(
            at=now, operation=command.operation, resource_type=resource, amount=command.amount,
            used=used, limit=limit, resets_at=resets_at, policy_version=version,
        )
        return Decision(
            events=(denied,),
            rejection=Rejection(
                "quota_exceeded",
                f"{resource} quota exceeded: {used:g} used + {command.amount:g} requested > "
                f"limit {limit:g}; resets at {resets_at:.0f}",
                {"used": used, "limit": limit, "quota_type": resource, "resets_at": resets_at,
                 "requested": command.amount},
            ),
        )
    tracked = UsageTracked(
        at=now, operation=command.operation, resource_type=resource, amount=command.amount,
        metadata=command.metadata, window_start=start, policy_version=version,
    )
    return Decision(events=(tracked,))


def _rate_key(operation: str, window: RateLimitType) -> str:
    return f"{operation}/{window.value}"


def rate_status(
    state: SessionState, tier: TierPolicy, now: float
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per operation seen (plus "default") and window: limit, remaining, reset_at."""
    operations = {"default", *tier.rate_limits.operations} | {
        key.split("/", 1)[0] for key in state.rate_logs
    }
    status: dict[str, dict[str, dict[str, float | int]]] = {}
    for operation in sorted(operations):
        limits = tier.rate_limits.for_operation(operation)
        per_window: dict[str, dict[str, float | int]] = {}
        for window in RateLimitType:
            limit = limits.limit(window)
            if limit is None:
                continue
            log = state.rate_logs.get(_rate_key(operation, window), b"")
            used = ratelog.count(log, now, window.seconds)
            wait = ratelog.retry_after(log, now, window.seconds, limit)
            per_window[window.value] = {
                "limit": limit, "remaining": max(0, limit - used), "reset_at": now + wait,
            }
        status[operation] = per_window
    return status


def decide_rate(
    state: SessionState, command: CheckRate, now: float, tier: TierPolicy, version: int
) -> Decision:
    from actors.session import Decision

    limits = tier.rate_limits.for_operation(command.operation)
    windows = [command.limit_type] if command.limit_type is not None else list(RateLimitType)
    checked: list[str] = []
    for window in windows:
        limit = limits.limit(window)
        if limit is None:
            continue
        log = state.rate_logs.get(_rate_key(command.operation, window), b"")
        wait = ratelog.retry_after(log, now, window.seconds, limit)
        if wait > 0:
            denied = RateDenied(
                at=now, operation=command.operation, limit_type=window.value, limit=limit,
                retry_after=wait, policy_version=version,
            )
            return Decision(
                events=(denied,),
                rejection=Rejection(
                    "rate_limited",
                    f"rate limit for {command.operation!r} reached: {limit} {window.value}; "
                    f"retry after {wait:.3f}s",
                    {"retry_after": wait, "limit_type": window.value, "limit": limit,
                     "operation": command.operation},
                ),
            )
        checked.append(window.value)
    allowed = RateAllowed(
        at=now, operation=command.operation, windows=tuple(checked), policy_version=version
    )
    return Decision(events=(allowed,))


def expire_leases(state: SessionState, now: float) -> tuple[SlotExpired, ...]:
    """Expiry events for leases whose time is up (a crashed holder loses its slot)."""
    return tuple(
        SlotExpired(at=now, operation=operation, lease_id=lease_id)
        for lease_id, (operation, expires_at, _token) in state.leases.items()
        if expires_at <= now
    )


def decide_acquire(
    state: SessionState, command: AcquireSlot, now: float, tier: TierPolicy, version: int
) -> Decision:
    from actors.session import Decision

    expired = expire_leases(state, now)
    gone = {e.lease_id for e in expired}
    live = [(lid, op) for lid, (op, _, _) in state.leases.items() if lid not in gone]
    rule = tier.concurrency
    same = sum(1 for _, op in live if op == command.operation)
    for scope, active, limit in (
        ("operation", same, rule.limit(command.operation)),
        ("total", len(live), rule.total),
    ):
        if active >= limit:
            denied = SlotDenied(
                at=now, operation=command.operation, scope=scope, active=active, limit=limit,
                policy_version=version,
            )
            return Decision(
                events=(*expired, denied),
                rejection=Rejection(
                    "rate_limited",
                    f"concurrency limit for {command.operation!r} reached: {active} of "
                    f"{limit} ({scope}) in use",
                    {"retry_after": None, "limit_type": "concurrency", "limit": limit,
                     "scope": scope, "operation": command.operation},
                ),
            )
    token = state.fencing + 1
    lease = SlotAcquired(
        at=now, operation=command.operation, lease_id=f"{state.session_id}:{token}",
        expires_at=now + (command.lease_seconds or rule.lease_seconds), fencing_token=token,
        policy_version=version,
    )
    return Decision(events=(*expired, lease))


def decide_release(state: SessionState, command: ReleaseSlot, now: float) -> Decision:
    from actors.session import Decision

    expired = expire_leases(state, now)
    gone = {e.lease_id for e in expired}
    if command.lease_id is not None:
        held = state.leases.get(command.lease_id)
        target = command.lease_id if held and held[0] == command.operation else None
    else:
        mine = sorted(
            (token, lid) for lid, (op, _, token) in state.leases.items()
            if op == command.operation and lid not in gone
        )
        target = mine[0][1] if mine else None
    if target is None or target in gone:
        # Already released or expired: releasing is idempotent, the slot is free either way.
        return Decision(events=expired)
    return Decision(events=(*expired, SlotReleased(at=now, operation=command.operation, lease_id=target)))
