"""Audit output: an audit report in words.

The timeline's events and refusals as short text with their key figures, the report as a text
table followed by the state (quotas and rate windows one line each, instants as ISO-8601 UTC),
and the report as JSON-ready builtins. Replaying the log is :mod:`blackbird.audit.replay`'s job.
"""

from __future__ import annotations

import datetime
import math
from typing import TYPE_CHECKING, Any

import msgspec

from actors.events import (
    AlertRaised,
    Event,
    MessagePosted,
    QuotaAdjusted,
    QuotaDenied,
    RateAllowed,
    RateDenied,
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

if TYPE_CHECKING:
    from blackbird.audit.replay import AuditReport


# --------------------------------------------------------------------------- the timeline


def iso(at: float) -> str:
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
        case TenantPolicyChanged():
            detail = f"version {event.policy.version} ({', '.join(_paths(event.overrides)) or 'no change'})"
        case UserQuotaAdjusted():
            limit = "reset" if event.limit is None else f"-> {_n(event.limit)}"
            detail = f"{event.user_id} {event.resource_type} {limit}"
        case UserSessionOpened():
            detail = f"{event.session_id} tier {event.tier}"
        case UserSessionClosed():
            detail = f"{event.session_id} {event.reason}"
        case UserSessionDenied():
            detail = f"{event.session_id} {event.active}/{event.limit} open"
        case AlertRaised():
            detail = f"{event.kind} value {_n(event.value)} threshold {_n(event.threshold)}"
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

# --------------------------------------------------------------------------- output


def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def _aggregate(subject: str) -> str:
    """``session s1`` / ``user u1`` / ``tenant`` from an event subject."""
    parts = subject.split(".", 3)
    return " ".join(parts[2:])


def render_text(report: AuditReport) -> str:
    cut = []
    if report.until_seq is not None:
        cut.append(f"seq {report.until_seq}")
    if report.until is not None:
        cut.append(iso(report.until))
    title = f"audit of {report.scope} {report.id!r}"
    if report.scope != "tenant":
        title += f" in tenant {report.tenant!r}"
    lines = [title + (f", up to {' and '.join(cut)}" if cut else ", up to now")]
    header = ["SEQ", "WHEN", "WHO"] + (["ON"] if report.scope != "session" else []) + ["WHAT", "DECISION", "WHY"]
    table = [header]
    for row in report.rows:
        on = [_aggregate(row.subject)] if report.scope != "session" else []
        what = "; ".join(row.what)
        table.append([str(row.seq), row.when, row.who, *on, what, row.decision, row.why or ""])
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not report.rows:
        lines.append("(no commands)")
    when = "" if report.at is None else f", {iso(report.at)}"
    lines.append("")
    lines.append(f"state at seq {report.last_seq}{when}:")
    lines.extend(_render_value(_compact(finite(msgspec.to_builtins(report.state))), "  "))
    return "\n".join(lines)


def _compact(state: dict[str, Any]) -> dict[str, Any]:
    """Quotas and rate windows one line each (``used / limit ...``), for people."""
    state = dict(state)
    if "quota" in state:
        quotas = {}
        for name, q in state["quota"].items():
            limit = "unlimited" if q["limit"] is None else _scalar(q["limit"])
            line = f"{_scalar(q['used'])} / {limit} ({q['usage_percentage'] or 0:.1f}%)"
            if q["reserved"]:
                line += f", {_scalar(q['reserved'])} reserved"
            if q["resets_at"] is not None:
                line += f", resets {iso(q['resets_at'])}"
            quotas[name] = line
        state["quota"] = quotas
        state.pop("usage", None)  # the quota lines say it
    if "rate_limits" in state:
        state["rate_limits"] = {
            f"{operation} {window}": f"{w['used']} / {'unlimited' if w['limit'] is None else w['limit']}"
            for operation, windows in state["rate_limits"].items()
            for window, w in windows.items()
        }
    return state


def _render_value(value: dict[str, Any], indent: str) -> list[str]:
    lines: list[str] = []
    for key, item in value.items():
        if isinstance(item, dict) and item:
            lines.append(f"{indent}{key}:")
            lines.extend(_render_value(item, indent + "  "))
        elif _is_instant(key) and isinstance(item, int | float) and not isinstance(item, bool):
            lines.append(f"{indent}{key}: {iso(item)}")
        else:
            lines.append(f"{indent}{key}: {_scalar(item)}")
    return lines


def _is_instant(key: str) -> bool:
    return key.endswith("_at") or key in ("last_activity", "window_start", "until")


def _scalar(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3f}".rstrip("0")
    return str(value)
