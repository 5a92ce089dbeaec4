"""The session aggregate: pure ``decide`` and ``evolve``.

No clock reads, no I/O, no logging: ``now`` and the tier ``policy`` are arguments, so replay
is deterministic and every rule is unit-testable.
"""

from __future__ import annotations

import msgspec

from actors import aggregate, idempotency, quota, ratelog
from actors.events import (
    OWNER,
    AcquireSlot,
    AdjustQuota,
    Admit,
    AgentAssigned,
    Applied,
    AssignAgent,
    ChangeTier,
    CheckRate,
    Commit,
    CreateSession,
    Decision,
    Event,
    GetSession,
    JoinSession,
    LeaveSession,
    MessagePosted,
    Metadata,
    ParticipantJoined,
    ParticipantLeft,
    ParticipantRole,
    PostMessage,
    QuotaAdjusted,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    Rejection,
    ReleaseSlot,
    ReservationReleased,
    ReservationSettled,
    Reserved,
    SessionCommand,
    SessionCreated,
    SessionExpired,
    SessionStatus,
    SessionTerminated,
    SessionTouched,
    SessionView,
    Settle,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    SlotReleased,
    TerminateSession,
    TierChanged,
    TouchSession,
    TrackUsage,
    UsageTracked,
)
from actors.limits import NO_BOOSTS, Boosts
from actors.policy import Policy, TierPolicy
from actors.ports import AggregateKey
from actors.tenant import PolicyBook

__all__ = ["Decision", "SessionState", "apply_commit", "decide", "evolve", "fold", "role_of"]

#: How many recent command ids a session remembers for idempotency (beyond JetStream's
#: duplicate window). A retry of any of a session's last RECENT_COMMANDS commands is a no-op.
RECENT_COMMANDS = idempotency.WINDOW


class SessionState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    tenant: str
    session_id: str
    exists: bool = False
    user_id: str = ""
    tier: str = ""
    status: SessionStatus = SessionStatus.ACTIVE
    metadata: Metadata = {}
    created_at: float = 0.0
    last_activity: float = 0.0
    idle_timeout: float = 0.0
    max_age: float = 0.0
    policy_version: int = 0
    version: int = 0  # commits applied
    usage: dict[str, tuple[float, float]] = {}  # quota -> (window_start, used in that window)
    rate_logs: dict[str, bytes] = {}  # "operation/window" -> packed admission times
    leases: dict[str, tuple[str, float, int]] = {}  # lease_id -> (operation, expires_at, token)
    reservations: dict[str, tuple[str, dict[str, float], float]] = {}  # id -> (op, amounts, expires)
    boosts: dict[str, tuple[float, float | None]] = {}  # quota -> (limit, until): QuotaAdjusted
    fencing: int = 0  # last fencing token (or reservation number) granted
    recent_commands: bytes = b""  # fingerprints of the last RECENT_COMMANDS command ids
    recent_digests: bytes = b""  # fingerprints of those commands' digests (idempotency.recall)
    recent_refusals: dict[str, Rejection] = {}  # answers to recent refused commands
    # user_id -> ParticipantRole value of those who joined; the owner (user_id) is implicit
    participants: dict[str, str] = {}
    agent_id: str | None = None  # the agent that answers; None: the client's default agent

    def view(self, sequence: int = 0) -> SessionView:
        return SessionView(
            session_id=self.session_id,
            user_id=self.user_id,
            tenant=self.tenant,
            tier=self.tier,
            status=self.status,
            metadata=self.metadata,
            created_at=self.created_at,
            last_activity=self.last_activity,
            idle_timeout=self.idle_timeout,
            max_age=self.max_age,
            concurrent_operations=len(self.leases),
            version=self.version,
            sequence=sequence,
            usage=self.usage,
            rate_logs=self.rate_logs,
            leases=self.leases,
            reservations=self.reservations,
            boosts=self.boosts,
            participants={self.user_id: OWNER, **self.participants} if self.exists else {},
            agent_id=self.agent_id,
        )


def initial_state(tenant: str, session_id: str) -> SessionState:
    return SessionState(tenant=tenant, session_id=session_id)


def role_of(state: SessionState, user_id: str) -> str | None:
    """``user_id``'s role in the session: "owner", "participant", "observer", or None."""
    if state.exists and user_id == state.user_id:
        return OWNER
    return state.participants.get(user_id)


def expiry_reason(state: SessionState, now: float) -> str | None:
    """Why an active session has lapsed at ``now`` ("idle_timeout" or "max_age"), else None."""
    if now - state.created_at >= state.max_age:
        return "max_age"
    if now - state.last_activity >= state.idle_timeout:
        return "idle_timeout"
    return None


def _reject(code: str, message: str, **fields: str | float | bool | None) -> Decision:
    return Decision(rejection=Rejection(code, message, fields))


def _unknown_tier(tier: str, policy: Policy) -> Decision:
    known = ", ".join(sorted(policy.tiers))
    return _reject(
        "validation_error",
        f"tier: expected one of {known}, got {tier!r}",
        field="tier",
        expected=f"one of {known}",
        got=tier,
    )


_METERED = (TrackUsage, CheckRate, AcquireSlot, ReleaseSlot, Admit, Settle, AdjustQuota)


def decide(
    state: SessionState,
    command: SessionCommand,
    now: float,
    policy: Policy,
    user_boosts: Boosts = NO_BOOSTS,
) -> Decision:
    """Decide what ``command`` does to a session at instant ``now`` under ``policy`` (the
    tenant's effective tier policy) and the quota adjustments of the session's user."""
    if isinstance(command, CreateSession):
        if state.exists:
            return _reject(
                "session_exists",
                f"session {state.session_id!r} already exists",
                session_id=state.session_id,
            )
        tier = policy.tier(command.tier)
        if tier is None:
            return _unknown_tier(command.tier, policy)
        return Decision(
            events=(
                SessionCreated(
                    at=now,
                    session_id=state.session_id,
                    user_id=command.user_id,
                    tier=command.tier,
                    metadata=command.metadata,
                    idle_timeout=tier.idle_timeout,
                    max_age=tier.max_age,
                    policy_version=policy.version,
                    agent_id=command.agent_id,
                ),
            )
        )
    if not state.exists:
        return _reject(
            "session_not_found",
            f"session {state.session_id!r} does not exist in tenant {state.tenant!r}",
            session_id=state.session_id,
            tenant=state.tenant,
        )
    if isinstance(command, GetSession):
        return Decision()
    if state.status is not SessionStatus.ACTIVE:
        return _reject(
            "session_inactive",
            f"session {state.session_id!r} is {state.status.value}; start a new session",
            session_id=state.session_id,
            reason=state.status.value,
        )
    reason = expiry_reason(state, now)
    if reason is not None:
        return Decision(
            events=(SessionExpired(at=now, reason=reason),),
            rejection=Rejection(
                "session_inactive",
                f"session {state.session_id!r} expired ({reason.replace('_', ' ')}); "
                "start a new session",
                {"session_id": state.session_id, "reason": reason},
            ),
        )
    if isinstance(command, TouchSession):
        return Decision(events=(SessionTouched(at=now, operation=command.operation),))
    if isinstance(command, _METERED):
        tier_policy = policy.tier(state.tier)
        if tier_policy is None:  # the tier was removed from the policy since: refuse, clearly
            return _unknown_tier(state.tier, policy)
        # Leases and holds whose time is up are released first, as events of this decision.
        expired = quota.housekeeping(state, now)
        for event in expired:
            state = evolve(state, event)
        decision = _decide_metered(state, command, now, tier_policy, policy.version, user_boosts)
        if expired:
            return Decision(events=expired + decision.events, rejection=decision.rejection)
        return decision
    if isinstance(command, PostMessage):
        role = None if command.author is None else role_of(state, command.author)
        if command.author is not None and role not in (OWNER, ParticipantRole.PARTICIPANT):
            return _reject(
                "access_denied",
                f"author {command.author!r} may not post on session {state.session_id!r} "
                f"({'an observer reads only' if role else 'not a participant'}); "
                "the owner or a participant may",
                principal=command.author,
                action="post_message",
                tenant=state.tenant,
                session_id=state.session_id,
            )
        posted = MessagePosted(
            at=now, channel=command.channel, text=command.text, metadata=command.metadata, author=command.author
        )
        return Decision(events=(posted,))
    if isinstance(command, JoinSession | LeaveSession):
        return _decide_participants(state, command, now)
    if isinstance(command, TerminateSession):
        return Decision(events=(SessionTerminated(at=now, reason=command.reason),))
    if isinstance(command, AssignAgent):
        if command.agent_id == state.agent_id:
            return Decision(events=(SessionTouched(at=now, operation="assign_agent"),))
        return Decision(events=(AgentAssigned(at=now, agent_id=command.agent_id, previous=state.agent_id),))
    if isinstance(command, ChangeTier):
        tier = policy.tier(command.tier)
        if tier is None:
            return _unknown_tier(command.tier, policy)
        if command.tier == state.tier:
            return Decision(events=(SessionTouched(at=now, operation="change_tier"),))
        return Decision(
            events=(
                TierChanged(
                    at=now,
                    old_tier=state.tier,
                    new_tier=command.tier,
                    idle_timeout=tier.idle_timeout,
                    max_age=tier.max_age,
                    policy_version=policy.version,
                ),
            )
        )
    raise TypeError(f"not a session command: {command!r}")  # unreachable for typed input


def _decide_participants(state: SessionState, command: JoinSession | LeaveSession, now: float) -> Decision:
    if command.user_id == state.user_id:
        action = "re-roled" if isinstance(command, JoinSession) else "removed"
        return _reject(
            "validation_error",
            f"user_id: {command.user_id!r} owns session {state.session_id!r} and cannot be {action}",
            field="user_id",
            expected="a user other than the session's owner",
            got=command.user_id,
        )
    if isinstance(command, JoinSession):
        return Decision(events=(ParticipantJoined(at=now, user_id=command.user_id, role=command.role.value),))
    if command.user_id not in state.participants:
        return _reject(
            "validation_error",
            f"user_id: {command.user_id!r} is not a participant of session {state.session_id!r}",
            field="user_id",
            expected="a participant of the session",
            got=command.user_id,
        )
    return Decision(events=(ParticipantLeft(at=now, user_id=command.user_id),))


def _decide_metered(
    state: SessionState,
    command: SessionCommand,
    now: float,
    tier: TierPolicy,
    version: int,
    user_boosts: Boosts,
) -> Decision:
    if isinstance(command, CheckRate):
        return quota.decide_rate(state, command, now, tier, version)
    if isinstance(command, TrackUsage):
        return quota.decide_usage(state, command, now, tier, version, user_boosts)
    if isinstance(command, Admit):
        return quota.decide_admit(state, command, now, tier, version, user_boosts)
    if isinstance(command, Settle):
        return quota.decide_settle(state, command, now, tier, version, user_boosts)
    if isinstance(command, AcquireSlot):
        return quota.decide_acquire(state, command, now, tier, version)
    if isinstance(command, ReleaseSlot):
        return quota.decide_release(state, command, now)
    assert isinstance(command, AdjustQuota)
    return quota.decide_adjust(state, command, now, version)


#: Events that count as activity (they move ``last_activity``, resetting the idle timer).
ACTIVITY_EVENTS = (
    SessionTouched, MessagePosted, TierChanged, SessionTerminated, UsageTracked, RateAllowed,
    SlotAcquired, Reserved, AgentAssigned,
)


def evolve(state: SessionState, event: Event) -> SessionState:
    """Apply one event to a session's state (pure)."""
    replace = msgspec.structs.replace
    # the most frequent events first
    if isinstance(event, RateAllowed):
        logs = dict(state.rate_logs)
        for window in event.windows:
            key = f"{event.operation}/{window}"
            logs[key] = ratelog.record(logs.get(key, b""), event.at, quota.WINDOW_SECONDS[window])
        return replace(state, rate_logs=logs, last_activity=event.at)
    if isinstance(event, (QuotaDenied, RateDenied, SlotDenied)):
        return state  # a refusal is a fact for the audit; it changes no counter
    if isinstance(event, SessionCreated):
        return replace(
            state,
            exists=True,
            user_id=event.user_id,
            tier=event.tier,
            status=SessionStatus.ACTIVE,
            metadata=event.metadata,
            created_at=event.at,
            last_activity=event.at,
            idle_timeout=event.idle_timeout,
            max_age=event.max_age,
            policy_version=event.policy_version,
            agent_id=event.agent_id,
        )
    if isinstance(event, (SessionTouched, MessagePosted)):
        return replace(state, last_activity=event.at)
    if isinstance(event, TierChanged):
        return replace(
            state,
            tier=event.new_tier,
            idle_timeout=event.idle_timeout,
            max_age=event.max_age,
            policy_version=event.policy_version,
            last_activity=event.at,
        )
    if isinstance(event, SessionExpired):
        return replace(state, status=SessionStatus.EXPIRED)
    if isinstance(event, SessionTerminated):
        return replace(state, status=SessionStatus.TERMINATED, last_activity=event.at)
    if isinstance(event, UsageTracked):
        used = quota.used_in_window(state, event.resource_type, event.window_start)
        usage = {**state.usage, event.resource_type: (event.window_start, used + event.amount)}
        return replace(state, usage=usage, last_activity=event.at)
    if isinstance(event, SlotAcquired):
        lease = (event.operation, event.expires_at, event.fencing_token)
        leases = {**state.leases, event.lease_id: lease}
        return replace(state, leases=leases, fencing=event.fencing_token, last_activity=event.at)
    if isinstance(event, (SlotReleased, SlotExpired)):
        leases = {k: v for k, v in state.leases.items() if k != event.lease_id}
        return replace(state, leases=leases)
    if isinstance(event, Reserved):
        hold = (event.operation, event.amounts, event.expires_at)
        reservations = {**state.reservations, event.reservation_id: hold}
        return replace(
            state, reservations=reservations, fencing=max(state.fencing, event.token),
            last_activity=event.at,
        )
    if isinstance(event, (ReservationSettled, ReservationReleased)):
        reservations = {k: v for k, v in state.reservations.items() if k != event.reservation_id}
        return replace(state, reservations=reservations)
    if isinstance(event, ParticipantJoined):
        return replace(state, participants={**state.participants, event.user_id: event.role})
    if isinstance(event, ParticipantLeft):
        return replace(state, participants={k: v for k, v in state.participants.items() if k != event.user_id})
    if isinstance(event, AgentAssigned):
        return replace(state, agent_id=event.agent_id, last_activity=event.at)
    if isinstance(event, QuotaAdjusted):
        boosts = {k: v for k, v in state.boosts.items() if k != event.resource_type}
        if event.limit is not None:
            boosts[event.resource_type] = (event.limit, event.until)
        return replace(state, boosts=boosts)
    raise TypeError(f"not a session event: {event!r}")


def apply_commands(state: SessionState, applied: tuple[Applied, ...]) -> SessionState:
    """Fold commands' events, and their ids into the idempotency window (version unchanged)."""
    return aggregate.apply_commands(evolve, state, applied)


def apply_commit(state: SessionState, commit: Commit) -> SessionState:
    """Fold one commit: its commands' events and ids, then the aggregate version."""
    return aggregate.apply_commit(evolve, state, commit)


def fold(state: SessionState, commits: list[Commit]) -> SessionState:
    for commit in commits:
        state = apply_commit(state, commit)
    return state


class SessionBehaviour(aggregate.Behaviour):
    """Binds the session aggregate's pure functions and the tenants' policies for the host."""

    state_type = SessionState
    evolve = staticmethod(evolve)

    def __init__(self, policies: Policy | PolicyBook) -> None:
        self.policies = policies if isinstance(policies, PolicyBook) else PolicyBook(policies)

    def initial_state(self, key: AggregateKey) -> SessionState:
        return initial_state(key.tenant, key.id)

    def decide(self, state: SessionState, command: SessionCommand, now: float) -> Decision:
        book = self.policies
        boosts = book.user_boosts(state.tenant, state.user_id) if state.user_id else NO_BOOSTS
        return decide(state, command, now, book.policy(state.tenant), boosts)

