"""How a command reaches its actor: in this process (the local host) or over NATS request/reply.

Both return the same :class:`~actors.events.CommandReply`, so the session manager, the NATS
command service and the CLI share one code path for turning a reply into a result or an error.

:class:`LocalDispatcher` is the host-side boundary every entry point reaches (the SDK in process,
raw NATS requests and remote SDK clients through the command service): it validates each
command (:func:`actors.validation.validate`) before anything is decided, and keeps the count of
each user's open sessions, so no entry point can skip either.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from actors.events import (
    CloseUserSessions,
    CommandReply,
    CreateSession,
    GetSession,
    OpenUserSession,
    Rejection,
    SessionCommand,
    SessionStatus,
    TerminateSession,
    UserCommand,
    UserSessionOpened,
)
from actors.host import ActorHost, ConflictRetriesExhausted, Outcome, QueueTimeout
from actors.ports import AggregateKey
from actors.session import expiry_reason
from actors.validation import Invalid, validate
from blackbird._validate import error_of
from blackbird.errors import (
    BlackbirdError,
    CommandTimeoutError,
    ConcurrencyConflictError,
    SessionLimitError,
    ValidationError,
    error_from_code,
)
from blackbird.ids import new_id

log = structlog.get_logger("blackbird.dispatch")

#: seconds after which a session counted for its user but still not created is taken to have
#: never come to exist (its creation's append is retried for command_timeout at most)
CREATION_GRACE = 120.0


class Dispatcher(Protocol):
    async def dispatch(
        self, tenant: str, session_id: str, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply: ...


class UserCommands(Protocol):
    async def __call__(
        self, tenant: str, user_id: str, command: UserCommand, command_id: str | None
    ) -> Outcome:
        """Run a command on the user's actor; refusals raise their typed error."""
        ...


def raise_for_rejection(reply: CommandReply) -> None:
    """Raise the typed error a rejected reply stands for."""
    if reply.rejection is not None:
        raise error_of_rejection(reply.rejection)


def error_of_rejection(r: Rejection) -> BlackbirdError:
    """The typed error a rejection (from an actor, or over the wire) stands for."""
    return error_from_code(r.code, r.message, dict(r.fields))


def rejection_from_error(exc: BlackbirdError) -> Rejection:
    fields = {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        for k, v in getattr(exc, "fields", {}).items()
    }
    return Rejection(exc.code, exc.message, fields)


def rejection_from_invalid(problem: Invalid) -> Rejection:
    """The rejection a broken rule of :mod:`actors.validation` is answered with."""
    return Rejection(
        problem.code, problem.message, {"field": problem.field, "expected": problem.expected, "got": problem.got}
    )


async def ask_or_raise(
    host: ActorHost, key: AggregateKey, command: Any, command_id: str | None, principal: str
) -> Outcome:
    """Validate a command and run it on a local actor (``command_id`` None: a new one); bad
    input, a refusal or a lost race is raised as its typed error."""
    try:
        command = validate(command)
    except Invalid as problem:
        raise error_of(problem) from None
    outcome = await _ask(host, key, command, command_id or new_id(), principal)
    if outcome.rejection is not None:
        raise error_of_rejection(outcome.rejection)
    return outcome


async def _ask(host: ActorHost, key: AggregateKey, command: Any, command_id: str, principal: str) -> Outcome:
    """``host.ask`` with what it raises as typed errors: a lost append race, a command that
    waited in its actor's mailbox past its deadline."""
    try:
        return await host.ask(key, command, command_id, principal)
    except ConflictRetriesExhausted as exc:
        if key.kind == "session":
            raise ConcurrencyConflictError(
                f"session {key.id!r}: {exc}; retry with the same command id",
                session_id=key.id, attempts=exc.attempts,
            ) from None
        raise ConcurrencyConflictError(
            f"{key.kind} {key.id!r}: {exc}; retry with the same command id", id=key.id
        ) from None
    except QueueTimeout as exc:
        raise _timed_out(exc) from None


class LocalDispatcher:
    """Runs session commands on the actor host in this process, after validating them.

    With ``users`` (the user aggregates' command path), a session's creation is counted against
    its user's ``max_sessions_per_user`` first (so two hosts cannot both open the last place),
    given back if the creation is refused, and closed when the session is terminated; when the
    limit is reached, the user's sessions that lapsed (by ``clock``) or never came to exist are
    closed first. Without ``users`` nothing is counted per user.
    """

    def __init__(
        self, host: ActorHost, users: UserCommands | None = None, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._host = host
        self._users = users
        self._clock = clock

    async def dispatch(
        self, tenant: str, session_id: str, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply:
        try:
            command = validate(command)
        except Invalid as problem:
            return CommandReply(rejection=rejection_from_invalid(problem))
        key = AggregateKey(tenant, "session", session_id)
        if self._users is None:
            return await self._answer(key, command, command_id, principal)
        try:
            if isinstance(command, CreateSession):
                return await self._create(self._users, key, command, command_id, principal)
            reply = await self._answer(key, command, command_id, principal)
            if isinstance(command, TerminateSession) and reply.rejection is None and reply.session is not None:
                await self._close_for_user(
                    self._users, tenant, reply.session.user_id, [session_id], "terminated", None
                )
            return reply
        except BlackbirdError as exc:  # from the user's actor (SessionLimitError, ...)
            return CommandReply(rejection=rejection_from_error(exc))

    async def _run(self, key: AggregateKey, command: SessionCommand, command_id: str, principal: str) -> Outcome:
        return await _ask(self._host, key, command, command_id, principal)

    async def _answer(
        self, key: AggregateKey, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply:
        try:
            outcome = await self._run(key, command, command_id, principal)
        except BlackbirdError as exc:
            return CommandReply(rejection=rejection_from_error(exc))
        return self._reply(outcome)

    @staticmethod
    def _reply(outcome: Outcome) -> CommandReply:
        state = outcome.state
        view = state.view(outcome.sequence) if state.exists else None
        return CommandReply(
            session=view,
            rejection=outcome.rejection,
            sequence=outcome.sequence,
            duplicate=outcome.duplicate,
            events=outcome.events,
        )

    async def _create(
        self, users: UserCommands, key: AggregateKey, command: CreateSession, command_id: str, principal: str
    ) -> CommandReply:
        """Count the session against its user's limit, then create it; give the place back if
        the creation was refused (nothing of it was appended)."""
        existing = await self._run(key, GetSession(), new_id(), principal)
        if existing.state.exists:  # a retry (the first answer again) or a taken id: no new place
            return await self._answer(key, command, command_id, principal)
        opened = await self._open_for_user(users, key, command, command_id, principal)
        try:
            outcome = await self._run(key, command, command_id, principal)
        except ValidationError:  # too large to append: certainly not created
            if opened:
                await self._close_for_user(users, key.tenant, command.user_id, [key.id], "not_created", None)
            raise
        # Any other error leaves it uncertain whether the session was created: its place stays
        # taken until the reconciliation below finds that the session does not exist.
        if outcome.rejection is not None and opened:
            await self._close_for_user(
                users, key.tenant, command.user_id, [key.id], "not_created", f"{command_id}:undo"
            )
        return self._reply(outcome)

    async def _open_for_user(
        self, users: UserCommands, key: AggregateKey, command: CreateSession, command_id: str, principal: str
    ) -> bool:
        """Count the session against its user's limit; True if this call opened it. When the
        limit is reached, sessions that lapsed or never came to exist are closed first."""
        tenant, user_id = key.tenant, command.user_id
        open_ = OpenUserSession(session_id=key.id, tier=command.tier)
        try:
            outcome = await users(tenant, user_id, open_, f"{command_id}:user")
        except SessionLimitError:
            listed = (await users(tenant, user_id, GetSession(), None)).state
            stale = [
                other for other in listed.sessions
                if await self._lapsed(AggregateKey(tenant, "session", other), listed.opened_at.get(other), principal)
            ]
            if not stale:
                raise
            await self._close_for_user(users, tenant, user_id, stale, "expired", None)
            outcome = await users(tenant, user_id, open_, f"{command_id}:user-retry")
        return any(isinstance(e, UserSessionOpened) for e in outcome.events)

    async def _lapsed(self, key: AggregateKey, opened_at: float | None, principal: str) -> bool:
        """Whether a session its user's count holds can give its place back: it ended or
        lapsed, or it never came to exist (counted more than CREATION_GRACE ago: a creation
        still in flight, on this host or another, keeps its place)."""
        state = (await self._run(key, GetSession(), new_id(), principal)).state
        now = self._clock()
        if not state.exists:
            return opened_at is None or now - opened_at > CREATION_GRACE
        return bool(state.status is not SessionStatus.ACTIVE or expiry_reason(state, now) is not None)

    @staticmethod
    async def _close_for_user(
        users: UserCommands, tenant: str, user_id: str, sids: list[str], reason: str, command_id: str | None
    ) -> None:
        try:
            await users(tenant, user_id, CloseUserSessions(session_ids=tuple(sids), reason=reason), command_id)
        except BlackbirdError as exc:  # the next reconciliation closes them
            log.warning("user_session_close_failed", tenant=tenant, user_id=user_id, error=str(exc))


def _timed_out(exc: QueueTimeout) -> CommandTimeoutError:
    key = exc.key
    return CommandTimeoutError(
        f"{exc}; retry with the same command id",
        subject=f"{key.tenant}.{key.kind}.{key.id}", command_id=exc.command_id,
    )
