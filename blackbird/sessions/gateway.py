"""Which tenant, which tier policy, which session: lookups and the command path, shared.

The session manager, quotas, analytics, memory and streams all use it.

One :class:`SessionGateway` per client, given to each of them as a constructor argument, so none
of them reaches into another's private state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, Protocol

from actors.events import CommandReply, GetSession, SessionCommand, TenantCommand
from actors.policy import MemoryPolicy, TierPolicy
from actors.tenant import PolicyBook, TenantState
from blackbird.commands.dispatch import Dispatcher, UserCommands, raise_for_rejection
from blackbird.errors import AccessDeniedError, SessionNotFoundError, ValidationError
from blackbird.ids import new_id
from blackbird.subjects import validate_token
from blackbird.types import Session


class TenantCommands(Protocol):
    async def __call__(self, tenant: str, command: TenantCommand, command_id: str | None) -> TenantState:
        """Run a tenant command durably; the tenant's state after it (refusals raise)."""
        ...


#: The principal the commands of the current task are recorded under, when not the client's own:
#: the HTTP API sets it per request to the API key's identity (see blackbird.http.auth).
acting_principal: ContextVar[str | None] = ContextVar("acting_principal", default=None)


class SessionGateway:
    """Resolves tenants, tiers and sessions for one client and sends its session commands.

    ``written`` is the highest stream sequence this client's session commands reached, which
    read models wait for (read-your-writes).
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        policies: PolicyBook,
        user_commands: UserCommands,
        tenant_commands: TenantCommands,
        *,
        tenant: str,
        principal: str,
        clock: Callable[[], float] = time.time,
        confined: bool = False,
    ) -> None:
        """``confined``: this client reaches its own tenant only (tenant credentials); naming
        another raises AccessDeniedError at once (the server would refuse it anyway)."""
        self.policies = policies
        self._confined = confined
        self.user_commands = user_commands
        self.tenant_commands = tenant_commands
        self.tenant = validate_token(tenant, "tenant")
        self.principal = principal
        self.clock = clock  # the actors' clock: windows and expiries are read against it
        self.written = 0
        self._dispatcher = dispatcher

    def tenant_of(self, tenant: str | None) -> str:
        """``tenant`` validated, or the client's own tenant when None."""
        if tenant is None or tenant == self.tenant:
            return self.tenant  # validated once, in __init__
        tenant = validate_token(tenant, "tenant")
        if self._confined:
            raise AccessDeniedError(
                f"tenant: this client's credentials reach tenant {self.tenant!r} only, not {tenant!r}",
                principal=self.principal, action="reach another tenant", tenant=tenant,
            )
        return tenant

    def tier_name(self, tier: Any, tenant: str | None) -> str:
        """``tier`` (a name or a str Enum) if the tenant's policy defines it, else ValidationError."""
        tiers = self.policies.policy(self.tenant_of(tenant)).tiers
        expected = "one of " + ", ".join(sorted(tiers))
        value = getattr(tier, "value", tier)
        if not isinstance(value, str) or value not in tiers:
            got = value if isinstance(value, str) else type(value).__name__
            raise ValidationError(f"tier: expected {expected}, got {got!r}", field="tier", expected=expected, got=got)
        return value

    def tier_policy(self, session: Session) -> TierPolicy:
        """The policy of the session's tier now (tenant overrides applied)."""
        tier = self.policies.policy(session.tenant).tier(session.tier)
        if tier is None:
            raise ValidationError(
                f"tier: session {session.session_id!r} is on tier {session.tier!r}, which the "
                "tenant's policy no longer defines",
                field="tier", expected="a tier of the current policy", got=session.tier,
            )
        return tier

    def memory_policy(self, session: Session) -> MemoryPolicy:
        """The memory policy of the session's tier (the defaults if the tier is gone)."""
        tier = self.policies.policy(session.tenant).tier(session.tier)
        return tier.memory if tier is not None else MemoryPolicy()

    async def dispatch(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> CommandReply:
        """Send ``command`` to the session's actor and return the reply; a refusal is raised as
        its typed error, an unknown session as SessionNotFoundError."""
        tenant = self.tenant_of(tenant)
        session_id = validate_token(session_id, "session_id")
        if command_id is not None:
            validate_token(command_id, "command_id")
        reply = await self._dispatcher.dispatch(
            tenant, session_id, command, command_id or new_id(), acting_principal.get() or self.principal
        )
        self.written = max(self.written, reply.sequence)
        raise_for_rejection(reply)
        if reply.session is None:  # decide() refuses commands on unknown sessions; belt and braces
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return reply

    async def request(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> tuple[Session, CommandReply]:
        """Like :meth:`dispatch`, with the session after the command."""
        reply = await self.dispatch(tenant, session_id, command, command_id)
        assert reply.session is not None  # dispatch raised otherwise
        return Session.from_view(reply.session), reply

    async def send(
        self, tenant: str | None, session_id: Any, command: SessionCommand, command_id: str | None
    ) -> Session:
        """Like :meth:`dispatch`; the session after the command."""
        return (await self.request(tenant, session_id, command, command_id))[0]

    async def find(self, session_id: Any, tenant: str | None) -> Session | None:
        """The session as it is now (read-your-writes across hosts), or None if unknown."""
        try:
            return await self.send(tenant, session_id, GetSession(), None)
        except SessionNotFoundError:
            return None

    async def existing(self, session_id: Any, tenant: str | None) -> Session:
        """The session as it is now; SessionNotFoundError if unknown."""
        session = await self.find(session_id, tenant)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
        return session
