"""The user aggregate (pure): the sessions a user holds open, against the tier's limit.

The limit is the tier's ``max_sessions_per_user``. Its commits live on
``<prefix>.<tenant>.user.<user_id>``. A session is opened here before it is created (so two
hosts cannot both open the last allowed session) and closed when it is terminated. A session
that lapsed by idle time or age, or whose creation never completed, is closed by the caller's
reconciliation when the limit is reached: the user actor cannot see session state, the shell
that asks it can.
"""

from __future__ import annotations

import msgspec

from actors import aggregate
from actors.events import (
    AlertRaised,
    CloseUserSessions,
    Commit,
    Decision,
    EraseUser,
    Event,
    GetSession,
    OpenUserSession,
    RaiseAlert,
    Rejection,
    UserCommand,
    UserErased,
    UserSessionClosed,
    UserSessionDenied,
    UserSessionOpened,
)
from actors.policy import Policy
from actors.ports import AggregateKey
from actors.tenant import PolicyBook


class UserState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    tenant: str
    user_id: str
    version: int = 0
    sessions: dict[str, str] = {}  # open session id -> tier
    # open session id -> when it was counted (its creation follows at once: a session that does
    # not exist long after this never came to be; one that does not exist yet is in flight)
    opened_at: dict[str, float] = {}
    recent_commands: bytes = b""
    recent_digests: bytes = b""
    recent_refusals: dict[str, Rejection] = {}  # answers to recent refused commands


def decide(state: UserState, command: UserCommand, now: float, policy: Policy) -> Decision:
    if isinstance(command, GetSession):
        return Decision()
    if isinstance(command, OpenUserSession):
        if command.session_id in state.sessions:
            return Decision()  # already open (a retried creation)
        tier = policy.tier(command.tier)
        if tier is None:  # refused before anything is counted: the session could not be created
            known = ", ".join(sorted(policy.tiers))
            return Decision(rejection=Rejection(
                "validation_error", f"tier: expected one of {known}, got {command.tier!r}",
                {"field": "tier", "expected": f"one of {known}", "got": command.tier},
            ))
        limit = tier.max_sessions_per_user
        active = len(state.sessions)
        if active >= limit:
            denied = UserSessionDenied(
                at=now, session_id=command.session_id, tier=command.tier, active=active, limit=limit,
                policy_version=policy.version,
            )
            return Decision(
                events=(denied,),
                rejection=Rejection(
                    "session_limit",
                    f"user {state.user_id!r} already has {active} open sessions, the most the "
                    f"{command.tier!r} tier allows ({limit}); terminate one first",
                    {"user_id": state.user_id, "used": active, "limit": limit, "tier": command.tier,
                     "quota_type": "sessions", "resets_at": None},
                ),
            )
        opened = UserSessionOpened(
            at=now, session_id=command.session_id, tier=command.tier, policy_version=policy.version
        )
        return Decision(events=(opened,))
    if isinstance(command, RaiseAlert):
        raised = AlertRaised(
            at=now, kind=command.kind, user_id=state.user_id, session_id=command.session_id,
            detail=command.detail, value=command.value, threshold=command.threshold,
            trigger_seq=command.trigger_seq,
        )
        return Decision(events=(raised,))
    if isinstance(command, EraseUser):
        return Decision(events=(UserErased(at=now, user_id=state.user_id),))
    if isinstance(command, CloseUserSessions):
        closed = tuple(
            UserSessionClosed(at=now, session_id=sid, reason=command.reason)
            for sid in dict.fromkeys(command.session_ids)
            if sid in state.sessions
        )
        return Decision(events=closed)
    raise TypeError(f"not a user command: {command!r}")


def evolve(state: UserState, event: Event) -> UserState:
    if isinstance(event, UserSessionOpened):
        return msgspec.structs.replace(
            state, sessions={**state.sessions, event.session_id: event.tier},
            opened_at={**state.opened_at, event.session_id: event.at},
        )
    if isinstance(event, UserSessionClosed):
        sessions = {k: v for k, v in state.sessions.items() if k != event.session_id}
        opened_at = {k: v for k, v in state.opened_at.items() if k != event.session_id}
        return msgspec.structs.replace(state, sessions=sessions, opened_at=opened_at)
    if isinstance(event, (UserSessionDenied, AlertRaised, UserErased)):
        return state  # facts for the audit and the read models
    raise TypeError(f"not a user event: {event!r}")


def apply_commit(state: UserState, commit: Commit) -> UserState:
    return aggregate.apply_commit(evolve, state, commit)


class UserBehaviour(aggregate.Behaviour):
    """Binds the user aggregate's pure functions and the tenants' policies for the actor host."""

    state_type = UserState
    evolve = staticmethod(evolve)

    def __init__(self, policies: PolicyBook) -> None:
        self.policies = policies

    def initial_state(self, key: AggregateKey) -> UserState:
        return UserState(tenant=key.tenant, user_id=key.id)

    def decide(self, state: UserState, command: UserCommand, now: float) -> Decision:
        return decide(state, command, now, self.policies.policy(state.tenant))

