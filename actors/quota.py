"""Quota, rate-limit, concurrency and admission decisions for the session aggregate (pure).

Each function takes the session's state (read through :class:`actors.limits.QuotaView`, so the
API's ``SessionView`` serves for reports too), the command, ``now``, the tier policy in force and
the policy version, and returns a :class:`Decision` whose events record the outcome either way:
allowed (``UsageTracked``, ``RateAllowed``, ``SlotAcquired``, ``Reserved``) or denied
(``QuotaDenied``, ``RateDenied``, ``SlotDenied``) with the policy version, so an audit shows
why a request was refused. Because the session's single actor makes every decision from its
own state, the limits are exact under any concurrency.

Limits in force for a quota, strongest first: a live session adjustment (``QuotaAdjusted``), a
live user adjustment (the tenant's ``UserQuotaAdjusted``), the tier's quota. Quota windows are
aligned to the session's creation; reserved (unsettled) amounts count as used until settled or
expired.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from actors import ratelog
from actors.events import (
    AcquireSlot,
    AdjustQuota,
    Admit,
    CheckRate,
    Decision,
    Event,
    Metadata,
    QuotaAdjusted,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    Rejection,
    ReleaseSlot,
    ReservationReleased,
    ReservationSettled,
    Reserved,
    Settle,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    SlotReleased,
    TrackUsage,
    UsageTracked,
)
from actors.limits import NO_BOOSTS, Boosts, QuotaState, QuotaView
from actors.policy import QuotaType, RateLimitType, TierPolicy

# --------------------------------------------------------------------------- quotas


def window_start(created_at: float, period: float, now: float) -> float:
    """Start of the quota window containing ``now`` (windows are aligned to session creation)."""
    return created_at + math.floor(max(0.0, now - created_at) / period) * period


def used_in_window(state: QuotaView, resource: str, start: float) -> float:
    current = state.usage.get(resource)
    return current[1] if current is not None and current[0] == start else 0.0


def _live_boost(boosts: Boosts, resource: str, now: float) -> float | None:
    boost = boosts.get(resource)
    if boost is not None and (boost[1] is None or now < boost[1]):
        return boost[0]
    return None


def limit_in_force(
    state: QuotaView, tier: TierPolicy, resource: str, now: float, user_boosts: Boosts
) -> tuple[float, float, float | None]:
    """``(limit, window_start, resets_at)`` for ``resource`` at ``now``.

    A resource the tier does not meter has an infinite limit, one window since creation and
    no reset (``resets_at`` None)."""
    rule = tier.quotas.get(QuotaType(resource))
    if rule is None:
        limit, start, resets = math.inf, state.created_at, None
    else:
        start = window_start(state.created_at, rule.period, now)
        limit, resets = rule.limit, start + rule.period
    boost = _live_boost(state.boosts, resource, now)
    if boost is None:
        boost = _live_boost(user_boosts, resource, now)
    return (limit if boost is None else boost), start, resets


def reserved(state: QuotaView, resource: str, now: float = -math.inf) -> float:
    """Amount of ``resource`` held by unsettled reservations still live at ``now`` (a decision
    has released the expired ones already; a read of the state may not have)."""
    return sum(
        (amounts.get(resource, 0.0)
         for _, amounts, expires in state.reservations.values() if expires > now),
        0.0,
    )


def quota_info(
    state: QuotaView, tier: TierPolicy, now: float, user_boosts: Boosts = NO_BOOSTS
) -> dict[str, dict[str, float | None]]:
    """``{quota: {used, limit, remaining, usage_percentage, resets_at, reserved}}`` at ``now``
    for every quota the tier meters (and any other the session has used)."""
    resources = [q.value for q in tier.quotas] + [r for r in state.usage if QuotaType(r) not in tier.quotas]
    info: dict[str, dict[str, float | None]] = {}
    for resource in resources:
        limit, start, resets = limit_in_force(state, tier, resource, now, user_boosts)
        used = used_in_window(state, resource, start)
        held = reserved(state, resource, now)
        info[resource] = {
            "used": used,
            "limit": limit,
            "remaining": max(0.0, limit - used - held),
            "usage_percentage": (used / limit * 100.0) if limit else 100.0,
            "resets_at": resets,
            "reserved": held,
        }
    return info


def _check_costs(
    state: QuotaView,
    tier: TierPolicy,
    operation: str,
    costs: Mapping[str, float],
    now: float,
    user_boosts: Boosts,
    version: int,
) -> Decision | None:
    """The denial if any of ``costs`` does not fit its quota (used + reserved + cost), else None."""
    for resource, amount in costs.items():
        limit, start, resets = limit_in_force(state, tier, resource, now, user_boosts)
        used = used_in_window(state, resource, start)
        held = reserved(state, resource)
        if used + held + amount > limit:
            resets_at = math.inf if resets is None else resets
            denied = QuotaDenied(
                at=now, operation=operation, resource_type=resource, amount=amount,
                used=used + held, limit=limit, resets_at=resets_at, policy_version=version,
            )
            held_note = f" (of which {held:g} reserved)" if held else ""
            return Decision(
                events=(denied,),
                rejection=Rejection(
                    "quota_exceeded",
                    f"{resource} quota exceeded: {used + held:g} used{held_note} + {amount:g} "
                    f"requested > limit {limit:g}; resets at {resets_at:.0f}",
                    {"used": used + held, "limit": limit, "quota_type": resource,
                     "resets_at": None if resets is None else resets, "requested": amount,
                     "operation": operation},
                ),
            )
    return None


def _charges(
    state: QuotaView,
    tier: TierPolicy,
    operation: str,
    costs: Mapping[str, float],
    metadata: Metadata,
    now: float,
    user_boosts: Boosts,
    version: int,
) -> tuple[UsageTracked, ...]:
    return tuple(
        UsageTracked(
            at=now, operation=operation, resource_type=resource, amount=amount, metadata=metadata,
            window_start=limit_in_force(state, tier, resource, now, user_boosts)[1],
            policy_version=version,
        )
        for resource, amount in costs.items()
    )


def decide_usage(
    state: QuotaView, command: TrackUsage, now: float, tier: TierPolicy, version: int,
    user_boosts: Boosts = NO_BOOSTS,
) -> Decision:
    costs = {command.resource_type.value: command.amount}
    denied = _check_costs(state, tier, command.operation, costs, now, user_boosts, version)
    if denied is not None:
        return denied
    return Decision(
        events=_charges(state, tier, command.operation, costs, command.metadata, now, user_boosts, version)
    )


def decide_adjust(state: QuotaView, command: AdjustQuota, now: float, version: int) -> Decision:
    if command.until is not None and command.until <= now:
        return Decision(
            rejection=Rejection(
                "validation_error",
                f"until: expected an instant after now ({now:.3f}), got {command.until!r}",
                {"field": "until", "expected": "a time in the future (seconds since the epoch)",
                 "got": command.until},
            )
        )
    adjusted = QuotaAdjusted(
        at=now, resource_type=command.resource_type.value, limit=command.limit,
        until=command.until, policy_version=version,
    )
    return Decision(events=(adjusted,))


# --------------------------------------------------------------------------- rate limits


# (window, its value, its length): enum attribute lookups are a real cost on the hot path
_WINDOWS = tuple((w, w.value, w.seconds) for w in RateLimitType)
_WINDOW = {w: (entry,) for w, entry in zip(RateLimitType, _WINDOWS, strict=True)}
WINDOW_SECONDS = {w.value: w.seconds for w in RateLimitType}


def rate_key(operation: str, window: RateLimitType) -> str:
    return f"{operation}/{window.value}"


def rate_status(
    state: QuotaView, tier: TierPolicy, now: float
) -> dict[str, dict[str, dict[str, float | int]]]:
    """Per operation (the named ones, ``default`` and any seen) and window: limit, remaining,
    reset_at (when one more request would be admitted)."""
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
            log = state.rate_logs.get(rate_key(operation, window), b"")
            used = ratelog.count(log, now, window.seconds)
            wait = ratelog.retry_after(log, now, window.seconds, limit)
            per_window[window.value] = {
                "limit": limit, "remaining": max(0, limit - used), "reset_at": now + wait,
            }
        status[operation] = per_window
    return status


def _check_rate(
    state: QuotaView,
    tier: TierPolicy,
    operation: str,
    only: RateLimitType | None,
    now: float,
    version: int,
) -> tuple[Decision | None, tuple[str, ...]]:
    """(the denial, or None with the windows that have a limit and room)."""
    limits = tier.rate_limits.for_operation(operation)
    logs = state.rate_logs
    checked: list[str] = []
    for _window, name, seconds in _WINDOWS if only is None else _WINDOW[only]:
        limit = getattr(limits, name)
        if limit is None:
            continue
        log = logs.get(f"{operation}/{name}", b"")
        wait = ratelog.retry_after(log, now, seconds, limit) if log or not limit else 0.0
        if wait > 0:
            denied = RateDenied(
                at=now, operation=operation, limit_type=name, limit=limit,
                retry_after=wait, policy_version=version,
            )
            return Decision(
                events=(denied,),
                rejection=Rejection(
                    "rate_limited",
                    f"rate limit for {operation!r} reached: {limit} {name}; "
                    f"retry after {wait:.3f}s",
                    {"retry_after": wait, "limit_type": name, "limit": limit,
                     "operation": operation},
                ),
            ), ()
        checked.append(name)
    return None, tuple(checked)


def decide_rate(
    state: QuotaView, command: CheckRate, now: float, tier: TierPolicy, version: int
) -> Decision:
    denied, windows = _check_rate(state, tier, command.operation, command.limit_type, now, version)
    if denied is not None:
        return denied
    return Decision(
        events=(RateAllowed(at=now, operation=command.operation, windows=windows, policy_version=version),)
    )


# --------------------------------------------------------------------------- concurrency


def housekeeping(state: QuotaView, now: float) -> tuple[Event, ...]:
    """Expiry events for leases and reservations whose time is up: a crashed holder loses its
    slot and its hold, and the log says when."""
    expired: list[Event] = [
        SlotExpired(at=now, operation=operation, lease_id=lease_id)
        for lease_id, (operation, expires_at, _token) in state.leases.items()
        if expires_at <= now
    ]
    expired += [
        ReservationReleased(at=now, reservation_id=rid, reason="expired")
        for rid, (_op, _amounts, expires_at) in state.reservations.items()
        if expires_at <= now
    ]
    return tuple(expired)


def _check_slot(
    state: QuotaView, tier: TierPolicy, operation: str, now: float, version: int
) -> Decision | None:
    rule = tier.concurrency
    same = sum(1 for op, _, _ in state.leases.values() if op == operation)
    for scope, active, limit in (
        ("operation", same, rule.limit(operation)),
        ("total", len(state.leases), rule.total),
    ):
        if active >= limit:
            denied = SlotDenied(
                at=now, operation=operation, scope=scope, active=active, limit=limit,
                policy_version=version,
            )
            return Decision(
                events=(denied,),
                rejection=Rejection(
                    "rate_limited",
                    f"concurrency limit for {operation!r} reached: {active} of {limit} "
                    f"({scope}) in use; release a slot or wait for a lease to expire",
                    {"retry_after": None, "limit_type": "concurrency", "limit": limit,
                     "scope": scope, "operation": operation},
                ),
            )
    return None


def _grant_slot(
    state: QuotaView, token: int, tier: TierPolicy, operation: str, lease_seconds: float | None,
    now: float, version: int,
) -> SlotAcquired:
    """The lease of a slot, fenced by ``token`` (one more than the last token granted)."""
    return SlotAcquired(
        at=now, operation=operation, lease_id=f"{state.session_id}:{token}",
        expires_at=now + (lease_seconds or tier.concurrency.lease_seconds),
        fencing_token=token, policy_version=version,
    )


def decide_acquire(
    state: QuotaState, command: AcquireSlot, now: float, tier: TierPolicy, version: int
) -> Decision:
    denied = _check_slot(state, tier, command.operation, now, version)
    if denied is not None:
        return denied
    slot = _grant_slot(
        state, state.fencing + 1, tier, command.operation, command.lease_seconds, now, version
    )
    return Decision(events=(slot,))


def decide_release(state: QuotaView, command: ReleaseSlot, now: float) -> Decision:
    if command.lease_id is not None:
        held = state.leases.get(command.lease_id)
        target = command.lease_id if held is not None and held[0] == command.operation else None
    else:
        mine = sorted(
            (token, lid) for lid, (op, _, token) in state.leases.items() if op == command.operation
        )
        target = mine[0][1] if mine else None
    if target is None:
        # Already released or expired: releasing is idempotent, the slot is free either way.
        return Decision()
    return Decision(events=(SlotReleased(at=now, operation=command.operation, lease_id=target),))


# --------------------------------------------------------------------------- admission


def decide_admit(
    state: QuotaState, command: Admit, now: float, tier: TierPolicy, version: int,
    user_boosts: Boosts = NO_BOOSTS,
) -> Decision:
    """Quotas, every rate window and a concurrency slot in one all-or-nothing decision."""
    costs = {q.value: amount for q, amount in command.costs.items()}
    denied = _check_costs(state, tier, command.operation, costs, now, user_boosts, version)
    if denied is not None:
        return denied
    windows: tuple[str, ...] = ()
    if command.rate:
        denied, windows = _check_rate(state, tier, command.operation, None, now, version)
        if denied is not None:
            return denied
    if command.slot:
        denied = _check_slot(state, tier, command.operation, now, version)
        if denied is not None:
            return denied
    events: list[Event] = []
    token = state.fencing
    if costs and command.reserve:
        token += 1
        hold = command.hold_seconds or tier.concurrency.lease_seconds
        events.append(
            Reserved(
                at=now, operation=command.operation, reservation_id=f"{state.session_id}:r{token}",
                amounts=costs, expires_at=now + hold, token=token, policy_version=version,
            )
        )
    elif costs:
        events += _charges(state, tier, command.operation, costs, {}, now, user_boosts, version)
    if command.rate:
        events.append(RateAllowed(at=now, operation=command.operation, windows=windows, policy_version=version))
    if command.slot:  # fenced after the reservation's token, if one was taken above
        events.append(
            _grant_slot(
                state, token + 1, tier, command.operation, command.lease_seconds, now, version
            )
        )
    return Decision(events=tuple(events))


def decide_settle(
    state: QuotaView, command: Settle, now: float, tier: TierPolicy, version: int,
    user_boosts: Boosts = NO_BOOSTS,
) -> Decision:
    """Charge the actual amounts of a reserved piece of work and release its hold.

    Settling never refuses for quota: the work is done, so its real cost is recorded even if it
    overshoots (later requests are refused instead). An unknown, expired or already settled
    reservation is refused, so a settlement is never charged twice."""
    held = state.reservations.get(command.reservation_id)
    if held is None:
        return Decision(
            rejection=Rejection(
                "reservation_not_found",
                f"reservation {command.reservation_id!r} is not held by session "
                f"{state.session_id!r}: it expired, was settled, or never existed; "
                "record the usage with track_usage instead",
                {"reservation_id": command.reservation_id, "session_id": state.session_id},
            )
        )
    operation = held[0]
    actual = {q.value: amount for q, amount in (command.actual or {}).items()}
    settled = ReservationSettled(
        at=now, operation=operation, reservation_id=command.reservation_id, amounts=actual
    )
    charges = _charges(state, tier, operation, actual, {"reservation_id": command.reservation_id},
                       now, user_boosts, version)
    return Decision(events=(settled, *charges))
