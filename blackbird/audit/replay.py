"""Audit: replay one session, user or tenant up to an instant or a stream sequence.

The report is rebuilt from the log alone (no snapshot, no read model): a timeline of every
command (when, who, what it caused, allowed or refused and why, at which sequence) and the
state the aggregates were in at that point. Every read goes through the audited tenant's own
subjects, so an audit of one tenant cannot see another tenant's commits. How the report reads
(its text table and JSON form) is :mod:`blackbird.audit.report`, its events in words
:mod:`blackbird.audit.render`.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import msgspec

from actors import graph as graph_logic
from actors import quota, ratelog
from actors import session as session_logic
from actors import tenant as tenant_logic
from actors import user as user_logic
from actors.events import (
    Applied,
    Commit,
    Event,
    GraphEvent,
    SessionCreated,
    SessionStatus,
    TenantPolicyChanged,
    UserQuotaAdjusted,
)
from actors.graph import GraphState
from actors.policy import RateLimitType
from actors.ports import AggregateKey
from actors.session import SessionState
from actors.tenant import PolicyBook, TenantState
from actors.validation import MAX_INSTANT
from blackbird._validate import invalid
from blackbird.audit.render import describe, iso, key_figures
from blackbird.audit.report import AuditReport, TimelineRow
from blackbird.errors import BlackbirdError, SessionNotFoundError
from blackbird.journal import Entry, LogReader
from blackbird.subjects import validate_token

__all__ = ["AuditReport", "Auditor", "TimelineRow", "parse_until"]

ALLOWED = "allowed"
REFUSED = "refused"


class _Verifiable(Protocol):
    async def verify(self) -> dict[str, list[str]]: ...


class Auditor:
    """Replays the log of one tenant's session, user or whole tenant up to a point.

    Reads only; appends nothing and needs no actor host, so it runs on a remote client too.
    """

    def __init__(
        self,
        journal: LogReader,
        policies: PolicyBook,
        tenant: str,
        *,
        projections: _Verifiable | None = None,
    ) -> None:
        self._journal = journal
        self._policies = policies
        self.tenant = validate_token(tenant, "tenant")
        self._projections = projections

    async def verify(self) -> dict[str, list[str]]:
        """Rebuild the running projections from the log and compare: ``{projection: [difference,
        ...]}``, an empty list meaning identical. Raises BlackbirdError if none are running."""
        if self._projections is None:
            raise BlackbirdError("no projections are running in this client")
        return await self._projections.verify()

    async def replay(
        self,
        *,
        session_id: str | None = None,
        user_id: str | None = None,
        tenant: str | None = None,
        until_seq: int | None = None,
        until: float | datetime.datetime | str | None = None,
    ) -> AuditReport:
        """Replay exactly one scope up to ``until_seq`` and/or ``until`` and report it.

        Scopes: ``session_id`` (that session), ``user_id`` (the user's aggregate and every
        session created for the user), or ``tenant`` alone (the whole tenant). With a session
        or user, ``tenant`` says whose (default: the client's tenant). ``until`` is seconds
        since the epoch, an aware datetime or an ISO-8601 string (read as UTC without an
        offset); the replay stops at the first commit after it, so the report is always a
        prefix of the log. Raises ValidationError naming the field for bad input, and
        SessionNotFoundError for a session the log has never seen.
        """
        if session_id is not None and user_id is not None:
            raise invalid("scope", "exactly one of session_id, user_id or tenant", "session_id and user_id")
        if session_id is None and user_id is None and tenant is None:
            raise invalid("scope", "exactly one of session_id, user_id or tenant", "none of them")
        tenant = self.tenant if tenant is None else validate_token(tenant, "tenant")
        cut = _Cut(_sequence(until_seq), parse_until(until))
        if session_id is not None:
            return await self._replay_session(tenant, validate_token(session_id, "session_id"), cut)
        if user_id is not None:
            return await self._replay_user(tenant, validate_token(user_id, "user_id"), cut)
        return await self._replay_tenant(tenant, cut)

    # ------------------------------------------------------------------ scopes

    async def _read(self, subject_filter: str, cut: _Cut) -> list[Entry]:
        entries: list[Entry] = []
        stopped = False  # at the first commit after ``until``: the report is a prefix of the log

        def collect(seq: int, subject: str, commit: Commit) -> None:
            nonlocal stopped
            stopped = stopped or (cut.until is not None and commit.at > cut.until)
            if not stopped:
                entries.append(Entry(seq, subject, commit))

        # replay() gives up only when delivery stops making progress: long histories are fine
        await self._journal.replay(subject_filter, 0, collect, cut.seq)
        return entries

    async def _replay_session(self, tenant: str, session_id: str, cut: _Cut) -> AuditReport:
        subjects = self._journal.subjects
        subject = subjects.session(tenant, session_id)
        if await self._journal.last_seq_of(subject) == 0:
            raise SessionNotFoundError(
                f"session {session_id!r} not found in tenant {tenant!r}",
                session_id=session_id, tenant=tenant,
            )
        entries = await self._read(subject, cut)
        tenant_entries = await self._read(subjects.aggregate(AggregateKey(tenant, "tenant", tenant)), cut)
        tenant_state = _fold_tenant(tenant, tenant_entries)
        state = session_logic.initial_state(tenant, session_id)
        for entry in entries:
            state = session_logic.apply_commit(state, entry.commit)
        last_seq = entries[-1].seq if entries else 0
        at = cut.at(entries)
        return AuditReport(
            scope="session", id=session_id, tenant=tenant, until_seq=cut.seq, until=cut.until,
            last_seq=last_seq, at=at, rows=_rows(entries),
            state=self._session_detail(state, last_seq, at, tenant_state),
        )

    async def _replay_user(self, tenant: str, user_id: str, cut: _Cut) -> AuditReport:
        subjects = self._journal.subjects
        user_subject = subjects.aggregate(AggregateKey(tenant, "user", user_id))
        tenant_subject = subjects.aggregate(AggregateKey(tenant, "tenant", tenant))
        memory_subject = subjects.aggregate(AggregateKey(tenant, "memory", f"user:{user_id}"))
        graph = GraphState()
        mine: dict[str, bool] = {}  # session subject -> created for this user
        sessions: dict[str, tuple[SessionState, int]] = {}
        user = user_logic.UserState(tenant=tenant, user_id=user_id)
        tenant_entries: list[Entry] = []
        timeline: list[Entry] = []
        for entry in await self._read(subjects.tenant_filter(tenant), cut):
            if entry.subject == user_subject:
                user = user_logic.apply_commit(user, entry.commit)
                timeline.append(entry)
            elif entry.subject == memory_subject:  # the user's own memories and knowledge graph
                for event in entry.commit.events:
                    if isinstance(event, GraphEvent):
                        graph = graph_logic.evolve(graph, event)
                timeline.append(entry)
            elif entry.subject == tenant_subject:
                tenant_entries.append(entry)
                if any(_adjusts(applied, user_id) for applied in entry.commit.commands):
                    timeline.append(entry)
            elif (sid := _session_id(entry.subject, tenant)) is not None:
                if entry.subject not in mine:  # its first commit creates it
                    mine[entry.subject] = any(
                        isinstance(e, SessionCreated) and e.user_id == user_id for e in entry.commit.events
                    )
                if mine[entry.subject]:
                    before = sessions.get(sid, (session_logic.initial_state(tenant, sid), 0))[0]
                    sessions[sid] = (session_logic.apply_commit(before, entry.commit), entry.seq)
                    timeline.append(entry)

        def concerns_user(entry: Entry, applied: Applied) -> bool:
            return entry.subject != tenant_subject or _adjusts(applied, user_id)

        tenant_state = _fold_tenant(tenant, tenant_entries)
        at = cut.at(timeline)
        report_state: dict[str, Any] = {
            "user_id": user_id,
            "version": user.version,
            "open_sessions": dict(user.sessions),
            "quota_adjustments": _boosts(tenant_state.user_boosts.get(user_id, {})),
            "sessions": {
                sid: self._session_summary(s, seq, at, tenant_state) for sid, (s, seq) in sessions.items()
            },
            "graph": _graph_summary(graph),
        }
        return AuditReport(
            scope="user", id=user_id, tenant=tenant, until_seq=cut.seq, until=cut.until,
            last_seq=timeline[-1].seq if timeline else 0, at=at,
            rows=_rows(timeline, concerns_user), state=report_state,
        )

    async def _replay_tenant(self, tenant: str, cut: _Cut) -> AuditReport:
        subjects = self._journal.subjects
        tenant_subject = subjects.aggregate(AggregateKey(tenant, "tenant", tenant))
        entries = await self._read(subjects.tenant_filter(tenant), cut)
        sessions: dict[str, SessionState] = {}
        users: set[str] = set()
        for entry in entries:
            if subjects.tenant_of(entry.subject) != tenant:  # the filter guarantees it; say so
                raise BlackbirdError(f"audit of tenant {tenant!r} read {entry.subject!r}")
            sid = _session_id(entry.subject, tenant)
            if sid is not None:
                state = sessions.get(sid) or session_logic.initial_state(tenant, sid)
                sessions[sid] = state = session_logic.apply_commit(state, entry.commit)
                users.add(state.user_id)
            elif entry.subject != tenant_subject:
                users.add(entry.subject.rsplit(".", 1)[1])  # a user aggregate
        tenant_state = _fold_tenant(tenant, [e for e in entries if e.subject == tenant_subject])
        at = cut.at(entries)
        by_status: dict[str, int] = {}
        for state in sessions.values():
            by_status[state.status.value] = by_status.get(state.status.value, 0) + 1
        commands = [c for e in entries for c in e.commit.commands]
        policy = tenant_logic.effective_policy(tenant_state, self._policies.base)
        report_state = {
            "tenant": tenant,
            "version": tenant_state.version,
            "policy_version": policy.version,
            "policy_overrides": tenant_state.overrides,
            "user_quota_adjustments": {u: _boosts(b) for u, b in tenant_state.user_boosts.items()},
            "counts": {
                "sessions": len(sessions),
                "sessions_by_status": by_status,
                "users": len(users - {""}),
                "commits": len(entries),
                "commands": len(commands),
                "events": sum(len(c.events) for c in commands),
                "refusals": sum(1 for c in commands if c.rejection is not None),
            },
        }
        return AuditReport(
            scope="tenant", id=tenant, tenant=tenant, until_seq=cut.seq, until=cut.until,
            last_seq=entries[-1].seq if entries else 0, at=at, rows=_rows(entries), state=report_state,
        )

    # ------------------------------------------------------------------ session state

    def _session_detail(
        self, state: SessionState, seq: int, at: float | None, tenant_state: TenantState
    ) -> dict[str, Any]:
        """The session's view at ``seq`` plus, at instant ``at``, its quotas and rate windows
        under the tenant policy in force then."""
        view: dict[str, Any] = msgspec.to_builtins(state.view(seq))
        del view["rate_logs"]  # packed timestamps; reported as per-window counts below
        # the view's positional tuples, with their fields named
        view["usage"] = {q: {"window_start": w, "used": u} for q, (w, u) in state.usage.items()}
        view["leases"] = {
            lease: {"operation": op, "expires_at": expires, "fencing_token": token}
            for lease, (op, expires, token) in state.leases.items()
        }
        view["reservations"] = {
            rid: {"operation": op, "amounts": amounts, "expires_at": expires}
            for rid, (op, amounts, expires) in state.reservations.items()
        }
        view["boosts"] = _boosts(state.boosts)
        view["exists"] = state.exists
        view["policy_version"] = state.policy_version
        if not state.exists or at is None:
            return view
        tier = tenant_logic.effective_policy(tenant_state, self._policies.base).tier(state.tier)
        boosts = tenant_state.user_boosts.get(state.user_id, {})
        view["active_at"] = _active_at(state, at)
        view["quota"] = quota.quota_info(state, tier, at, boosts) if tier is not None else {}
        rates: dict[str, dict[str, dict[str, float | int | None]]] = {}
        for key, log in sorted(state.rate_logs.items()):
            operation, window = key.split("/", 1)
            used = ratelog.count(log, at, quota.WINDOW_SECONDS[window])
            limit = tier.rate_limits.for_operation(operation).limit(RateLimitType(window)) if tier else None
            remaining = None if limit is None else max(0, limit - used)
            rates.setdefault(operation, {})[window] = {"used": used, "limit": limit, "remaining": remaining}
        view["rate_limits"] = rates
        return view

    def _session_summary(
        self, state: SessionState, seq: int, at: float | None, tenant_state: TenantState
    ) -> dict[str, Any]:
        detail = self._session_detail(state, seq, at, tenant_state)
        summary = {k: detail[k] for k in ("tier", "status", "created_at", "last_activity", "version", "sequence")}
        summary["active_at"] = detail.get("active_at")
        summary["used"] = {q: info["used"] for q, info in detail.get("quota", {}).items() if info["used"]}
        return summary


# --------------------------------------------------------------------------- the cut


class _Cut(msgspec.Struct, frozen=True):
    seq: int | None
    until: float | None

    def at(self, entries: list[Entry]) -> float | None:
        """The instant the state is reported at: ``until`` if given, else the last commit's."""
        if self.until is not None:
            return self.until
        return entries[-1].commit.at if entries else None




def _sequence(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise invalid("until_seq", "a stream sequence (an integer >= 1)", repr(value))
    return value


def parse_until(value: Any) -> float | None:
    """``until`` as seconds since the epoch: a number, an aware datetime, or a string holding
    a number or an ISO-8601 instant (UTC when it has no offset). Raises ValidationError."""
    if value is None:
        return None
    expected = "seconds since the epoch, an aware datetime or an ISO-8601 string"
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            raise invalid("until", expected, "a naive datetime")
        return value.timestamp()
    if isinstance(value, str):
        text = value.strip()
        try:
            number: Any = float(text)
        except ValueError:
            try:
                parsed = datetime.datetime.fromisoformat(text)
            except ValueError:
                raise invalid("until", expected, repr(value)) from None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=datetime.UTC)
            return parsed.timestamp()
    else:
        number = value
    # a range (NaN fails it), not math.isfinite, which raises OverflowError for a huge int
    if isinstance(number, bool) or not isinstance(number, int | float) or not -MAX_INSTANT <= number <= MAX_INSTANT:
        raise invalid("until", expected, repr(value)[:200])
    return float(number)


# --------------------------------------------------------------------------- folding


def _session_id(subject: str, tenant: str) -> str | None:
    """The session id of ``<prefix>.<tenant>.session.<id>``, else None."""
    parts = subject.split(".")
    if len(parts) == 4 and parts[1] == tenant and parts[2] == "session":
        return parts[3]
    return None


def _fold_tenant(tenant: str, entries: Iterable[Entry]) -> TenantState:
    state = TenantState(tenant=tenant)
    for entry in entries:
        state = tenant_logic.apply_commit(state, entry.commit)
    return state


def _boosts(boosts: Mapping[str, tuple[float, float | None]]) -> dict[str, dict[str, float | None]]:
    return {q: {"limit": limit, "until": until} for q, (limit, until) in boosts.items()}


def _adjusts(applied: Applied, user_id: str) -> bool:
    """Whether a tenant command adjusted ``user_id``'s quotas."""
    return any(isinstance(e, UserQuotaAdjusted) and e.user_id == user_id for e in applied.events)


def _active_at(state: SessionState, at: float) -> bool:
    return state.status is SessionStatus.ACTIVE and session_logic.expiry_reason(state, at) is None


# --------------------------------------------------------------------------- the timeline


def _policy_version(events: Iterable[Event]) -> int | None:
    for event in events:
        if isinstance(event, TenantPolicyChanged):
            return event.policy.version
        version = getattr(event, "policy_version", None)
        if version is not None:
            return int(version)
    return None


def _graph_summary(graph: GraphState) -> dict[str, int]:
    """The user scope's knowledge graph at the cut, in figures (names are sealed)."""
    edges = [edge for facts in graph.facts.values() for edge in facts.values()]
    return {
        "entities": len(graph.entities),
        "facts_open": sum(1 for edge in edges if edge.open),  # holding, as far as is known
        "facts_closed": sum(1 for edge in edges if not edge.open),  # ended, or stated with an end
    }


def _rows(
    entries: Iterable[Entry], keep: Callable[[Entry, Applied], bool] = lambda entry, applied: True
) -> list[TimelineRow]:
    rows: list[TimelineRow] = []
    for entry in entries:
        at = entry.commit.at
        for applied in entry.commit.commands:
            if not keep(entry, applied):
                continue
            why = None
            if applied.rejection is not None:
                figures = [f for f in map(key_figures, applied.events) if f]
                why = "; ".join([applied.rejection.message, *figures])
            rows.append(
                TimelineRow(
                    seq=entry.seq, at=at, when=iso(at), subject=entry.subject, who=applied.principal,
                    command_id=applied.command_id, what=[describe(e) for e in applied.events],
                    decision=ALLOWED if applied.rejection is None else REFUSED, why=why,
                    policy_version=_policy_version(applied.events),
                )
            )
    return rows
