"""The session manager: the seed's session API, one implementation (async).

Every argument is validated here, before anything is sent, so bad input gets a
:class:`~blackbird.errors.ValidationError` naming the field and appends nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, Protocol

import structlog

from actors.events import (
    ChangeTier,
    CloseUserSessions,
    CommandReply,
    CreateSession,
    GetSession,
    OpenUserSession,
    PostMessage,
    SessionCommand,
    TerminateSession,
    TouchSession,
    UserCommand,
    UserSessionOpened,
)
from actors.host import Outcome
from actors.tenant import PolicyBook
from blackbird.sessions.analytics import AnalyticsMethods
from blackbird.commands.dispatch import Dispatcher, raise_for_rejection
from blackbird._projections import Projections
from blackbird.sessions.quotas import QuotaMethods, TenantCommands
from blackbird._validate import check_metadata, check_text
from blackbird.errors import (
    BlackbirdError,
    SessionLimitError,
    SessionNotFoundError,
    ValidationError,
)
from blackbird.subjects import validate_token
from blackbird.types import Session

log = structlog.get_logger("blackbird.sessions")

MAX_MESSAGE_LENGTH = 65536


class UserCommands(Protocol):
    async def __call__(
        self, tenant: str, user_id: str, command: UserCommand, command_id: str | None
    ) -> Outcome:
        """Run a command on the user's actor; refusals raise their typed error."""
        ...

class AsyncSessionManager(QuotaMethods, AnalyticsMethods):
    """Sessions and their limits: create, read, touch, re-tier and terminate sessions; quotas,
    rate limits, concurrency slots and admission (see :class:`QuotaMethods`). Every write is
    durable when it returns."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        policies: PolicyBook,
        tenant_commands: TenantCommands,
        user_commands: UserCommands,
        *,
        tenant: str,
        principal: str,
        projections: Projections,
        analytics_k: int = 5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock)
        self._projections = projections
        self._analytics_k = analytics_k
        self._written = 0  # the last sequence this client wrote (read-your-writes)
        self._dispatcher = dispatcher
        self._policies = policies
        self._tenant_commands = tenant_commands
        self._user_commands = user_commands
        self._tenant = validate_token(tenant, "tenant")
        self._current: tuple[str, str] | None = None  # the last session this client created
        self._principal = principal

    def _tenant_of(self, tenant: str | None) -> str:
        if tenant is None or tenant == self._tenant:
            return self._tenant  # validated once, in __init__
        return validate_token(tenant, "tenant")

    def _tier(self, tier: Any, tenant: str | None) -> str:
        tiers = self._policies.policy(self._tenant_of(tenant)).tiers
        expected = "one of " + ", ".join(sorted(tiers))
        value = getattr(tier, "value", tier)  # accept a str Enum
        if not isinstance(value, str) or value not in tiers:
            got = value if isinstance(value, str) else type(value).__name__
            raise ValidationError(f"tier: expected {expected}, got {got!r}", field="tier", expected=expected, got=got)
        return value

    async def _dispatch(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> CommandReply:
        """Send ``command`` to the session's actor and return the reply; a refusal is raised as
        its typed error, an unknown session as SessionNotFoundError."""
        tenant = self._tenant_of(tenant)
        session_id = validate_token(session_id, "session_id")
        if command_id is not None:
            validate_token(command_id, "command_id")
        reply = await self._dispatcher.dispatch(
            tenant, session_id, command, command_id or os.urandom(16).hex(), self._principal
        )
        self._written = max(self._written, reply.sequence)
        raise_for_rejection(reply)
        if reply.session is None:  # decide() refuses commands on unknown sessions; belt and braces
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return reply

    async def _request(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> tuple[Session, CommandReply]:
        """Like :meth:`_dispatch`, with the session after the command."""
        reply = await self._dispatch(tenant, session_id, command, command_id)
        assert reply.session is not None
        return Session.from_view(reply.session), reply

    async def _send_existing(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> Session:
        return (await self._request(tenant, session_id, command, command_id))[0]

    async def create_session(
        self,
        user_id: str,
        tier: str = "free",
        metadata: dict[str, Any] | None = None,
        *,
        tenant: str | None = None,
        session_id: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Create a session for ``user_id`` under ``tier`` and return it once it is durable.

        ``session_id`` defaults to a new random id. Passing the same ``command_id`` again
        (a retry) returns the session without creating a second one. Raises ValidationError
        (naming the field) for a bad user_id, tier, metadata or id; SessionExistsError if
        ``session_id`` is taken; SessionLimitError if the user already holds the tier's
        ``max_sessions_per_user`` open sessions (terminated and lapsed ones do not count).
        """
        user_id = validate_token(user_id, "user_id")
        tier = self._tier(tier, tenant)
        command = CreateSession(user_id=user_id, tier=tier, metadata=check_metadata(metadata))
        tenant = self._tenant_of(tenant)
        sid = validate_token(os.urandom(16).hex() if session_id is None else session_id, "session_id")
        if command_id is not None:
            validate_token(command_id, "command_id")
        command_id = command_id or os.urandom(16).hex()
        # The user's actor counts the session first, so two hosts cannot both open the last one.
        opened = await self._open_for_user(tenant, user_id, sid, tier, command_id)
        try:
            session = await self._send_existing(tenant, sid, command, command_id)
        except BlackbirdError:
            if opened:  # give the place back: this session was never created
                await self._close_for_user(tenant, user_id, [sid], "not_created", f"{command_id}:undo")
            raise
        self._current = (session.tenant, session.session_id)
        return session

    async def _open_for_user(self, tenant: str, user_id: str, sid: str, tier: str, command_id: str) -> bool:
        """Count ``sid`` against the user's limit; True if this call opened it. When the limit
        is reached, sessions that lapsed or never came to exist are closed first."""
        open_ = OpenUserSession(session_id=sid, tier=tier)
        try:
            outcome = await self._user_commands(tenant, user_id, open_, f"{command_id}:user")
        except SessionLimitError:
            listed = await self._user_commands(tenant, user_id, GetSession(), None)
            stale = []
            for other in listed.state.sessions:
                session = await self.get_session(other, tenant=tenant)
                if session is None or not session.active_at(self._clock()):
                    stale.append(other)
            if not stale:
                raise
            await self._close_for_user(tenant, user_id, stale, "expired", None)
            outcome = await self._user_commands(tenant, user_id, open_, f"{command_id}:user-retry")
        return any(isinstance(e, UserSessionOpened) for e in outcome.events)

    async def _close_for_user(
        self, tenant: str, user_id: str, sids: list[str], reason: str, command_id: str | None
    ) -> None:
        try:
            await self._user_commands(
                tenant, user_id, CloseUserSessions(session_ids=tuple(sids), reason=reason), command_id
            )
        except BlackbirdError as exc:  # the next reconciliation closes them
            log.warning("user_session_close_failed", tenant=tenant, user_id=user_id, error=str(exc))

    async def get_session(self, session_id: str, *, tenant: str | None = None) -> Session | None:
        """The session as it is now (read-your-writes across hosts), or None if unknown."""
        try:
            return await self._send_existing(tenant, session_id, GetSession(), None)
        except SessionNotFoundError:
            return None

    async def get_session_data(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any] | None:
        """The session as a JSON-serialisable dict (with is_active, age and idle seconds), or None."""
        session = await self.get_session(session_id, tenant=tenant)
        return None if session is None else session.to_dict()

    async def touch_session(
        self, session_id: str, operation: str = "activity", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Record activity (resets the idle timer). Raises SessionInactiveError if it lapsed."""
        command = TouchSession(operation=check_text(operation, "operation"))
        return await self._send_existing(tenant, session_id, command, command_id)

    async def change_tier(
        self, session_id: str, tier: str, *, tenant: str | None = None, command_id: str | None = None
    ) -> Session:
        """Move a session to another tier; its limits apply at once (recorded as TierChanged)."""
        return await self._send_existing(tenant, session_id, ChangeTier(tier=self._tier(tier, tenant)), command_id)

    async def terminate_session(
        self, session_id: str, reason: str = "terminated", *, tenant: str | None = None,
        command_id: str | None = None,
    ) -> Session:
        """Terminate a session; later commands on it raise SessionInactiveError. It no longer
        counts against the user's open sessions."""
        command = TerminateSession(reason=check_text(reason, "reason"))
        session = await self._send_existing(tenant, session_id, command, command_id)
        await self._close_for_user(session.tenant, session.user_id, [session.session_id], "terminated", None)
        return session

    async def send_message(
        self,
        message: str,
        *,
        session_id: str | None = None,
        channel: str = "chat",
        metadata: dict[str, Any] | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> dict[str, Any]:
        """Post ``message`` on a channel of a session (default: the session this client created
        last) as a durable MessagePosted event; returns where it landed (``sequence`` is the
        stream sequence, the event id a resuming subscriber passes back). Counts as activity.
        Raises SessionInactiveError on a lapsed session."""
        if not isinstance(message, str) or len(message) > MAX_MESSAGE_LENGTH:
            got = type(message).__name__ if not isinstance(message, str) else f"{len(message)} characters"
            raise ValidationError(
                f"message: expected a string of at most {MAX_MESSAGE_LENGTH} characters, got {got}",
                field="message", expected=f"a string of at most {MAX_MESSAGE_LENGTH} characters", got=got,
            )
        if session_id is None:
            if self._current is None:
                raise ValidationError(
                    "session_id: expected a session id (this client has created no session yet)",
                    field="session_id", expected="a session id", got=None,
                )
            tenant, session_id = self._current
        command = PostMessage(
            channel=validate_token(channel, "channel"), text=message, metadata=check_metadata(metadata)
        )
        session, reply = await self._request(tenant, session_id, command, command_id)
        assert session is not None
        return {
            "session_id": session.session_id, "tenant": session.tenant, "channel": channel,
            "message": message, "sequence": reply.sequence,
        }

    def __repr__(self) -> str:
        return f"<AsyncSessionManager tenant={self._tenant!r}>"
