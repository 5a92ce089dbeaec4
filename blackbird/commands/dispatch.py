"""How a command reaches its actor: in this process (the local host) or over NATS request/reply.

Both return the same :class:`~actors.events.CommandReply`, so the session manager, the NATS
command service and the CLI share one code path for turning a reply into a result or an error.
"""

from __future__ import annotations

from typing import Any, Protocol

import structlog

from actors.events import CommandReply, Rejection, SessionCommand
from actors.host import ActorHost, ConflictRetriesExhausted, Outcome
from actors.ports import AggregateKey
from blackbird.errors import (
    BlackbirdError,
    ConcurrencyConflictError,
    error_from_code,
)
from blackbird.ids import new_id

log = structlog.get_logger("blackbird.dispatch")


class Dispatcher(Protocol):
    async def dispatch(
        self, tenant: str, session_id: str, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply: ...


def raise_for_rejection(reply: CommandReply) -> None:
    """Raise the typed error a rejected reply stands for."""
    if reply.rejection is not None:
        r = reply.rejection
        raise error_from_code(r.code, r.message, dict(r.fields))


def rejection_from_error(exc: BlackbirdError) -> Rejection:
    fields = {
        k: v if isinstance(v, str | int | float | bool | type(None)) else str(v)
        for k, v in getattr(exc, "fields", {}).items()
    }
    return Rejection(exc.code, exc.message, fields)


async def ask_or_raise(
    host: ActorHost, key: AggregateKey, command: Any, command_id: str | None, principal: str
) -> Outcome:
    """Run a command on a local actor (``command_id`` None: a new one); a refusal or a lost
    race is raised as its typed error."""
    try:
        outcome = await host.ask(key, command, command_id or new_id(), principal)
    except ConflictRetriesExhausted as exc:
        raise ConcurrencyConflictError(
            f"{key.kind} {key.id!r}: {exc}; retry with the same command id", id=key.id
        ) from None
    if outcome.rejection is not None:
        r = outcome.rejection
        raise error_from_code(r.code, r.message, dict(r.fields))
    return outcome


class LocalDispatcher:
    """Runs commands on the actor host in this process."""

    def __init__(self, host: ActorHost) -> None:
        self._host = host

    async def dispatch(
        self, tenant: str, session_id: str, command: SessionCommand, command_id: str, principal: str
    ) -> CommandReply:
        key = AggregateKey(tenant, "session", session_id)
        try:
            outcome = await self._host.ask(key, command, command_id, principal)
        except ConflictRetriesExhausted as exc:
            return CommandReply(
                rejection=Rejection(
                    "concurrency_conflict",
                    f"session {session_id!r}: {exc}; retry with the same command id",
                    {"session_id": session_id, "attempts": exc.attempts},
                )
            )
        except BlackbirdError as exc:
            return CommandReply(rejection=rejection_from_error(exc))
        state = outcome.state
        view = state.view(outcome.sequence) if state.exists else None
        return CommandReply(
            session=view,
            rejection=outcome.rejection,
            sequence=outcome.sequence,
            duplicate=outcome.duplicate,
            events=outcome.events,
        )
