"""The audit report: what an audit found, as a text table for people or as JSON builtins.

A report is the timeline of one scope's commands up to the cut, and the state its aggregates
were in there. :mod:`blackbird.audit.replay` builds it from the log; :mod:`blackbird.audit.render`
puts its events in words.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from blackbird.audit.render import iso

__all__ = ["AuditReport", "TimelineRow", "finite", "render_text"]


class TimelineRow(msgspec.Struct, frozen=True, kw_only=True):
    """One command as the log recorded it."""

    seq: int  # stream sequence of its commit
    at: float  # seconds since the epoch (the deciding host's clock)
    when: str  # ``at`` as ISO-8601 UTC
    subject: str
    who: str  # the principal that caused it
    command_id: str
    what: list[str]  # its events, each with its key fields
    decision: str  # "allowed" | "refused"
    why: str | None  # the refusal's message and numbers; None when allowed
    policy_version: int | None  # the tier-policy version it was decided under, if recorded


class AuditReport(msgspec.Struct, frozen=True, kw_only=True):
    """What an audit found: the timeline up to the cut and the state at that point."""

    scope: str  # "session" | "user" | "tenant"
    id: str  # the session id, the user id, or the tenant
    tenant: str
    until_seq: int | None  # as asked
    until: float | None  # as asked, in seconds since the epoch
    last_seq: int  # the last sequence replayed (0: nothing)
    at: float | None  # the instant the state is reported at (``until``, else the last commit's)
    rows: list[TimelineRow]
    state: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-ready builtins; an unlimited (infinite) number becomes None."""
        # finite() keeps the shape it is given, here the dict to_builtins makes of a Struct
        return finite(msgspec.to_builtins(self))  # type: ignore[no-any-return]

    def render(self) -> str:
        """A readable text table of the timeline, then the state."""
        return render_text(self)


# --------------------------------------------------------------------------- output


def finite(value: Any) -> Any:
    """``value`` (builtins) with every infinite or NaN float made None, for JSON."""
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
    """The report as a text table of the timeline, then the state (see AuditReport.render)."""
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
