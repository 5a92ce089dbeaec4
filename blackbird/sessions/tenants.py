"""Tenant policies at the edge: runs tenant commands and keeps the policy book current.

Every process that decides (an actor host) or reports limits keeps a :class:`PolicyBook`: it
follows every tenant's log from the start (so a restarted host decides under the same
policies) and is updated at once by the tenant commands this process runs itself
(read-your-writes). Another process sees a change as soon as its follower delivers it.
"""

from __future__ import annotations

import anyio
import anyio.abc
import nats.js.errors
import structlog

from actors import tenant as tenant_logic
from actors.events import TenantCommand
from actors.host import ActorHost
from actors.ports import AggregateKey
from actors.tenant import PolicyBook, TenantState
from blackbird.commands.dispatch import ask_or_raise
from blackbird.errors import AccessDeniedError
from blackbird.journal import LogReader
from blackbird.sessions.gateway import acting_principal

log = structlog.get_logger("blackbird.tenants")


class TenantDirectory:
    def __init__(
        self, journal: LogReader, book: PolicyBook, host: ActorHost | None, principal: str, *, only: str | None = None
    ) -> None:
        """``host`` None: tenant commands are refused (a client on tenant credentials); ``only``:
        follow that one tenant's policy (the only one such a client may read)."""
        self._journal = journal
        self._book = book
        self._host = host
        self._principal = principal
        self._filter = journal.subjects.tenants_filter if only is None else journal.subjects.aggregate(
            AggregateKey(only, "tenant", only)
        )

    async def command(self, tenant: str, command: TenantCommand, command_id: str | None) -> TenantState:
        """Run a tenant command durably and return the tenant's state after it."""
        if self._host is None:
            raise AccessDeniedError(
                f"{type(command).__name__} is an operator's action: it needs the service identity, "
                "not tenant credentials", principal=self._principal, action=type(command).__name__, tenant=tenant,
            )
        key = AggregateKey(tenant, "tenant", tenant)
        outcome = await ask_or_raise(self._host, key, command, command_id, acting_principal.get() or self._principal)
        self._book.observe(outcome.state)
        return outcome.state  # type: ignore[no-any-return]

    async def follow(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Fold every tenant's commits into the book; ready once caught up with the log."""
        subjects = self._journal.subjects
        target = await self._journal.last_seq_of(self._filter)
        ready = target == 0
        if ready:
            task_status.started()
        states: dict[str, TenantState] = {}
        try:
            async for entry in self._journal.follow(self._filter):
                tenant = subjects.tenant_of(entry.subject)
                state = states.get(tenant) or TenantState(tenant=tenant)
                states[tenant] = state = tenant_logic.apply_commit(state, entry.commit)
                self._book.observe(state)
                log.debug("tenant_policy_observed", tenant=tenant, version=state.version, seq=entry.seq)
                if not ready and entry.seq >= target:
                    ready = True
                    task_status.started()
        except nats.js.errors.NotFoundError:
            # No stream yet: only a remote client that configures nothing gets here, and its
            # commands will say that no host is serving. There is no policy to follow.
            log.warning("tenant_log_missing", stream=self._journal.stream)
