"""Audit events in words: each event of the timeline, and each refusal's figures, as short text.

Instants read as ISO-8601 UTC. The report these words go into (its text table and JSON form) is
:mod:`blackbird.audit.report`; replaying the log is :mod:`blackbird.audit.replay`'s job.
"""

from __future__ import annotations

import datetime
import math
from typing import Any

from actors.events import (
    AgentAssigned,
    AlertRaised,
    ApiKeyIssued,
    ApiKeyRevoked,
    ApiKeyUsed,
    AuthorErased,
    EntityAliased,
    EntityForgotten,
    EntityNoted,
    Event,
    MemoryForgotten,
    MemoryRemembered,
    MemorySuperseded,
    MessagePosted,
    ParticipantJoined,
    ParticipantLeft,
    QuotaAdjusted,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    RelationEnded,
    RelationForgotten,
    RelationStated,
    ReservationReleased,
    ReservationSettled,
    Reserved,
    SessionCreated,
    SessionExpired,
    SessionTerminated,
    SessionTouched,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    SlotReleased,
    TenantPolicyChanged,
    TierChanged,
    UsageTracked,
    UserQuotaAdjusted,
    UserSessionClosed,
    UserSessionDenied,
    UserSessionOpened,
)


def iso(at: float) -> str:
    """``at`` (seconds since the epoch) as ISO-8601 UTC to the millisecond, e.g. ``...Z``."""
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _n(value: float) -> str:
    return "unlimited" if math.isinf(value) else f"{value:g}"


def describe(event: Event) -> str:
    """The event's type name with its key fields, e.g. ``UsageTracked tokens 150 (llm)``."""
    name = type(event).__name__
    match event:
        case SessionCreated():
            detail = f"user {event.user_id} tier {event.tier}"
            if event.agent_id is not None:
                detail += f" agent {event.agent_id}"
        case SessionTouched():
            detail = event.operation
        case TierChanged():
            detail = f"{event.old_tier} -> {event.new_tier}"
        case SessionExpired() | SessionTerminated():
            detail = event.reason
        case UsageTracked():
            detail = f"{event.resource_type} {_n(event.amount)} ({event.operation})"
        case QuotaDenied():
            detail = (
                f"{event.resource_type} {_n(event.amount)} ({event.operation}): "
                f"{_n(event.used)} used of {_n(event.limit)}"
            )
        case RateAllowed():
            detail = f"{event.operation} [{', '.join(event.windows)}]"
        case RateDenied():
            detail = f"{event.operation} {event.limit_type} limit {event.limit}"
        case SlotAcquired():
            detail = f"{event.operation} lease {event.lease_id} token {event.fencing_token}"
        case SlotReleased() | SlotExpired():
            detail = f"{event.operation} lease {event.lease_id}"
        case SlotDenied():
            detail = f"{event.operation} {event.scope} {event.active}/{event.limit}"
        case Reserved() | ReservationSettled():
            amounts = " ".join(f"{k} {_n(v)}" for k, v in event.amounts.items())
            detail = f"{amounts} ({event.operation})" if amounts else f"({event.operation})"
        case ReservationReleased():
            detail = f"{event.reservation_id} {event.reason}"
        case QuotaAdjusted():
            limit = "reset" if event.limit is None else f"-> {_n(event.limit)}"
            detail = f"{event.resource_type} {limit}" + ("" if event.until is None else f" until {iso(event.until)}")
        case MessagePosted():
            detail = f"{event.channel} ({len(event.text)} chars)"  # the text itself is not audit data
            if event.author is not None:
                detail += f" by {event.author}"
        case ParticipantJoined():
            detail = f"{event.user_id} as {event.role}"
        case ParticipantLeft():
            detail = event.user_id
        case AgentAssigned():
            detail = f"{event.previous or 'default agent'} -> {event.agent_id}"
        case TenantPolicyChanged():
            detail = f"version {event.policy.version} ({', '.join(_paths(event.overrides)) or 'no change'})"
        case UserQuotaAdjusted():
            limit = "reset" if event.limit is None else f"-> {_n(event.limit)}"
            detail = f"{event.user_id} {event.resource_type} {limit}"
        case ApiKeyIssued():  # never the secret's hash
            detail = f"{event.key_id} role {event.role}" + ("" if event.user_id is None else f" user {event.user_id}")
            detail += ("" if event.label is None else f" label {event.label!r}") + (
                "" if event.expires_at is None else f" expires {iso(event.expires_at)}"
            )
        case ApiKeyRevoked():
            detail = event.key_id
        case ApiKeyUsed():
            detail = f"{event.key_id} at {iso(event.used_at)}"
        case UserSessionOpened():
            detail = f"{event.session_id} tier {event.tier}"
        case UserSessionClosed():
            detail = f"{event.session_id} {event.reason}"
        case UserSessionDenied():
            detail = f"{event.session_id} {event.active}/{event.limit} open"
        case AlertRaised():
            detail = f"{event.kind} value {_n(event.value)} threshold {_n(event.threshold)}"
        # memory and the knowledge graph: ids, kinds and predicates (names and texts are sealed)
        case MemoryRemembered():
            detail = f"{event.memory_id} {event.kind} ({event.size} bytes)" + (" updated" if event.updated else "")
        case MemorySuperseded():
            detail = f"{event.memory_id} by {event.by}"
        case MemoryForgotten():
            detail = f"{event.memory_id} {event.reason}"
        case AuthorErased():
            detail = event.author
        case EntityForgotten():
            detail = f"{event.entity_id} {event.reason}"
        case RelationForgotten():
            detail = f"{event.relation_id} {event.reason}"
        case EntityNoted():
            detail = f"{event.entity_id} {event.entity_type}"
        case EntityAliased():
            detail = f"{event.entity_id} +alias"
        case RelationStated():
            detail = f"{event.relation_id}: {event.subject} {event.predicate} {event.object}"
            detail += f" from {iso(event.valid_from)}"
            if event.valid_to is not None:
                detail += f" to {iso(event.valid_to)}"
        case RelationEnded():
            detail = f"{event.relation_id} at {iso(event.valid_to)} {event.reason}" + (
                "" if event.by is None else f" by {event.by}"
            )
        case _:
            return name
    return f"{name} {detail}"


def _paths(overrides: dict[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            paths += _paths(value, f"{prefix}{key}.")
        else:
            paths.append(f"{prefix}{key}")
    return paths


def key_figures(event: Event) -> str | None:
    """The figures a denial was decided on."""
    match event:
        case QuotaDenied():
            resets = "never" if math.isinf(event.resets_at) else iso(event.resets_at)
            return (
                f"used={_n(event.used)} limit={_n(event.limit)} requested={_n(event.amount)} "
                f"resets_at={resets} policy_version={event.policy_version}"
            )
        case RateDenied():
            return (
                f"limit_type={event.limit_type} limit={event.limit} "
                f"retry_after={event.retry_after:.3f}s policy_version={event.policy_version}"
            )
        case SlotDenied():
            return (
                f"scope={event.scope} active={event.active} limit={event.limit} "
                f"policy_version={event.policy_version}"
            )
        case UserSessionDenied():
            return f"active={event.active} limit={event.limit} policy_version={event.policy_version}"
        case SessionExpired():
            return f"reason={event.reason}"
    return None
