"""The MCP tools of one Blackbird session, each call admitted under the session's limits first.

Every tool call is one :meth:`~blackbird.sessions.manager.AsyncSessionManager.admit` of
operation ``mcp.<tool>`` costing one ``api_calls`` unit and checking the operation's rate
windows (no concurrency slot: a call holds nothing once answered). The admission is an event
in the session's log (``UsageTracked``, or ``QuotaDenied``/``RateDenied``), so an audit shows
every call, refused or not. A refused call answers an error result naming the limit (and
``retry_after`` for a rate limit) and does nothing else; an ended session refuses every tool.

Arguments are checked by the SDK against each tool's input schema before anything runs (a wrong
type, NaN, an over-long string: an error result naming the argument, nothing admitted); the
memory service then checks them again. Blackbird's typed errors become error results carrying
``{"error": {"code", "message", ...fields}}``; nothing else escapes as a traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import structlog
from mcp.server.mcpserver import MCPServer
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from actors.policy import QuotaType
from actors.validation import MAX_ID_LENGTH, MAX_MEMORY_TEXT, MAX_NAME_LENGTH
from blackbird.audit.report import finite
from blackbird.errors import BlackbirdError, SessionNotFoundError, ValidationError
from blackbird.http.routes import error_payload
from blackbird.sessions.gateway import acting_principal

if TYPE_CHECKING:
    from blackbird.memory.service import AsyncMemory
    from blackbird.sessions.manager import AsyncSessionManager

__all__ = ["TOOLS", "Target", "bound_target", "mcp_server"]

log = structlog.get_logger("blackbird.mcp")

#: every tool the server offers, in the order it lists them
TOOLS = (
    "remember", "recall", "relate", "neighbors", "facts_about", "forget", "session_info", "quota_status",
)
INSTRUCTIONS = (
    "Long-term memory and a knowledge graph for one Blackbird session. remember stores a fact, recall "
    "finds memories by meaning and keywords, relate records a relation between two entities, neighbors "
    "and facts_about walk the graph, forget removes a memory or an entity. Every call counts one "
    "api_call against the session's quota and rate limits (quota_status shows them)."
)


class Target(msgspec.Struct, frozen=True, kw_only=True):
    """The session the tools act for, and who is calling (recorded as the principal)."""

    tenant: str
    session_id: str
    principal: str | None = None  # None: the client's own principal


_bound: contextvars.ContextVar[Target | None] = contextvars.ContextVar("blackbird_mcp_target", default=None)


@contextlib.contextmanager
def bound_target(target: Target) -> Iterator[None]:
    """Tool calls made in this context act for ``target`` (the HTTP mount sets it per request; the
    SDK runs each call in the context of the request that carried it)."""
    token = _bound.set(target)
    try:
        yield
    finally:
        _bound.reset(token)


# --------------------------------------------------------------------------- argument types

Text = Annotated[str, Field(min_length=1, max_length=MAX_MEMORY_TEXT)]
Short = Annotated[str, Field(min_length=1, max_length=MAX_NAME_LENGTH)]
Ident = Annotated[str, Field(min_length=1, max_length=MAX_ID_LENGTH)]
Scope = Annotated[str, Field(
    min_length=1, max_length=MAX_NAME_LENGTH,
    description='"session", "user", "tenant", "group:<id>" or "agent:<id>" (members only)',
)]
Scopes = Annotated[list[Scope], Field(
    min_length=1, max_length=16, description="scopes to search, in any order (default: session and user)",
)]
Instant = Annotated[float, Field(ge=0, allow_inf_nan=False, description="seconds since the epoch")]
Predicates = Annotated[list[Short], Field(min_length=1, max_length=64, description="only these predicates")]
Metadata = Annotated[dict[str, Any], Field(description="JSON object kept with it (at most 16 KiB)")]


def _result(payload: dict[str, Any]) -> CallToolResult:
    payload = finite(payload)  # an unlimited quota is infinite: null in JSON
    return CallToolResult(
        content=[TextContent(type="text", text=json.dumps(payload, default=str))], structured_content=payload,
    )


def _refusal(exc: BlackbirdError) -> CallToolResult:
    payload = error_payload(exc)
    detail = payload["error"]
    text = f"{exc.code}: {exc}"
    extras = {k: v for k, v in detail.items() if k not in ("code", "message") and v is not None}
    if extras:
        text += " " + json.dumps(extras, default=str)
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=payload, is_error=True)


def mcp_server(bb: Any, session_id: str | None = None, *, tenant: str | None = None) -> MCPServer[Any]:
    """The MCP server of ``bb`` for session ``session_id`` of ``tenant`` (default: ``bb``'s tenant).

    Without ``session_id`` each call acts for the session bound with :func:`bound_target` (the HTTP
    mount binds the one of the request's path); a call with neither is refused. ``bb`` is an open
    :class:`~blackbird.AsyncBlackbird` with the service identity (memory needs it)."""
    fixed = None if session_id is None else Target(tenant=tenant or bb.settings.tenant, session_id=session_id)
    sm: AsyncSessionManager = bb.session_manager
    # MCPServer() calls logging.basicConfig (a handler on the root logger); logging is the
    # application's choice, so the root logger is put back as it was.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    server: MCPServer[Any] = MCPServer(
        "blackbird", instructions=INSTRUCTIONS, version=getattr(bb, "version", None) or "0",
    )
    root.handlers[:] = handlers
    root.setLevel(level)

    def memory() -> AsyncMemory:
        found: AsyncMemory = bb.memory  # looked up per call: it needs the service identity
        return found

    def target() -> Target:
        found = _bound.get() or fixed
        if found is None:
            raise SessionNotFoundError("no session is bound to this MCP server", session_id="")
        return found

    async def run(tool: str, work: Callable[[Target], Awaitable[dict[str, Any]]]) -> CallToolResult:
        """Admit one ``mcp.<tool>`` call on the session, then do ``work``; typed errors as results."""
        try:
            t = target()
        except BlackbirdError as exc:
            return _refusal(exc)
        token = acting_principal.set(t.principal) if t.principal is not None else None
        try:
            await sm.admit(
                t.session_id, f"mcp.{tool}", {QuotaType.API_CALLS: 1}, slot=False, tenant=t.tenant
            )
            return _result(await work(t))
        except BlackbirdError as exc:
            log.info("mcp_tool_refused", tool=tool, session_id=t.session_id, code=exc.code)
            return _refusal(exc)
        finally:
            if token is not None:
                acting_principal.reset(token)


    def given(**options: Any) -> dict[str, Any]:
        """The options the caller gave (None: the service's default)."""
        return {k: v for k, v in options.items() if v is not None}

    writes = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False)
    reads = ToolAnnotations(read_only_hint=True, idempotent_hint=True)

    @server.tool(annotations=writes)
    async def remember(
        text: Annotated[Text, Field(description="the fact to remember, in plain words")],
        scope: Scope = "user",
        importance: Annotated[float | None, Field(ge=0, le=1, allow_inf_nan=False,
                                                  description="0 to 1 (default 0.5)")] = None,
        key: Annotated[Short | None, Field(description="a newer memory with the same key supersedes the older")] = None,
        kind: Annotated[Short | None, Field(description='its kind (default "fact"); retention is per kind')] = None,
        metadata: Metadata | None = None,
    ) -> CallToolResult:
        """Remember a fact in the session's memory; answers the stored memory (with its id)."""

        async def work(t: Target) -> dict[str, Any]:
            found = await memory().remember(
                text, session_id=t.session_id, scope=scope, tenant=t.tenant,
                **given(importance=importance, key=key, kind=kind, metadata=metadata),
            )
            return found.to_dict()

        return await run("remember", work)

    @server.tool(annotations=reads)
    async def recall(
        query: Annotated[Text, Field(description="what to look for, in plain words")],
        k: Annotated[int, Field(ge=1, le=100, description="how many memories at most")] = 5,
        scopes: Scopes | None = None,
        as_of: Annotated[Instant | None, Field(description="what was known at that instant")] = None,
        filters: Annotated[dict[str, Any] | None, Field(
            description="exact matches on kind, key, author or metadata.<field>")] = None,
        expand: Annotated[int, Field(
            ge=0, le=1, description="1: each memory also carries the graph facts one hop from its entities")] = 0,
    ) -> CallToolResult:
        """Recall the memories best matching a query (meaning and keywords), best first."""

        async def work(t: Target) -> dict[str, Any]:
            found = await memory().recall(
                query, session_id=t.session_id, k=k, tenant=t.tenant,
                **given(scopes=scopes, as_of=as_of, filters=filters, expand=expand or None),
            )
            return {"memories": [m.to_dict() for m in found]}

        return await run("recall", work)

    @server.tool(annotations=writes)
    async def relate(
        subject: Annotated[Short, Field(description="the entity the fact is about (a name)")],
        predicate: Annotated[Short, Field(description="lower snake_case relation, e.g. works_at")],
        object: Annotated[Short, Field(description="the other entity (a name)")],  # noqa: A002 (the word of the tool)
        scope: Scope = "user",
        subject_type: Annotated[Short, Field(description="e.g. person, organisation")] = "thing",
        object_type: Annotated[Short, Field(description="e.g. person, place")] = "thing",
        valid_from: Annotated[Instant | None, Field(description="when it became true")] = None,
        valid_to: Annotated[Instant | None, Field(description="when it stopped being true")] = None,
        evidence: Annotated[Text | None, Field(description="where this comes from, in words")] = None,
        metadata: Metadata | None = None,
    ) -> CallToolResult:
        """Record a relation (subject, predicate, object) in the session's knowledge graph."""

        async def work(t: Target) -> dict[str, Any]:
            found = await memory().relate(
                subject, predicate, object, session_id=t.session_id, scope=scope, subject_type=subject_type,
                object_type=object_type, tenant=t.tenant,
                **given(valid_from=valid_from, valid_to=valid_to, evidence=evidence, metadata=metadata),
            )
            return dict(found.to_dict())

        return await run("relate", work)

    @server.tool(annotations=reads)
    async def neighbors(
        entity: Annotated[Short, Field(description="an entity's name or id")],
        depth: Annotated[int, Field(ge=1, le=3, description="how many hops")] = 1,
        predicates: Predicates | None = None,
        as_of: Annotated[Instant | None, Field(description="what was known at that instant")] = None,
        valid_at: Annotated[Instant | None, Field(description="relations true at that instant")] = None,
        scopes: Scopes | None = None,
        limit: Annotated[int, Field(ge=1, le=1000)] = 100,
    ) -> CallToolResult:
        """The entities related to an entity, up to ``depth`` hops away."""

        async def work(t: Target) -> dict[str, Any]:
            found = await memory().neighbors(
                entity, session_id=t.session_id, depth=depth, limit=limit, tenant=t.tenant,
                **given(predicates=predicates, as_of=as_of, valid_at=valid_at, scopes=scopes),
            )
            return {"neighbors": [n.to_dict() for n in found]}

        return await run("neighbors", work)

    @server.tool(annotations=reads)
    async def facts_about(
        entity: Annotated[Short, Field(description="an entity's name or id")],
        predicates: Predicates | None = None,
        as_of: Annotated[Instant | None, Field(description="what was known at that instant")] = None,
        valid_at: Annotated[Instant | None, Field(description="relations true at that instant")] = None,
        history: Annotated[bool, Field(description="also relations that were superseded")] = False,
        scopes: Scopes | None = None,
    ) -> CallToolResult:
        """The relations an entity takes part in."""

        async def work(t: Target) -> dict[str, Any]:
            found = await memory().facts_about(
                entity, session_id=t.session_id, history=history, tenant=t.tenant,
                **given(predicates=predicates, as_of=as_of, valid_at=valid_at, scopes=scopes),
            )
            return {"facts": [r.to_dict() for r in found]}

        return await run("facts_about", work)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True))
    async def forget(
        memory_id: Annotated[Ident | None, Field(description="the id of a memory to forget")] = None,
        entity: Annotated[Short | None, Field(
            description="or an entity (name or id) to forget, with its relations")] = None,
        scope: Scope = "user",
    ) -> CallToolResult:
        """Forget one memory (``memory_id``) or one entity and its relations (``entity``): exactly one."""

        async def work(t: Target) -> dict[str, Any]:
            if (memory_id is None) == (entity is None):
                raise ValidationError(
                    "forget: give exactly one of memory_id or entity", field="memory_id",
                    expected="exactly one of memory_id or entity",
                    got="both" if memory_id is not None else "neither",
                )
            if memory_id is not None:
                done = await memory().forget(memory_id, session_id=t.session_id, scope=scope, tenant=t.tenant)
            elif entity is not None:
                done = await memory().forget_entity(entity, session_id=t.session_id, scope=scope, tenant=t.tenant)
            return {"forgotten": bool(done)}

        return await run("forget", work)

    @server.tool(annotations=reads)
    async def session_info() -> CallToolResult:
        """The session: its user, tier, status, participants, activity and age."""

        async def work(t: Target) -> dict[str, Any]:
            session = await sm.get_session(t.session_id, tenant=t.tenant)
            if session is None:
                raise SessionNotFoundError(f"session {t.session_id!r} not found", session_id=t.session_id)
            return dict(session.to_dict())

        return await run("session_info", work)

    @server.tool(annotations=reads)
    async def quota_status() -> CallToolResult:
        """The session's quotas (used, limit, remaining, resets_at) and rate windows now."""

        async def work(t: Target) -> dict[str, Any]:
            quotas = await sm.get_quota(t.session_id, tenant=t.tenant)
            rates = await sm.get_rate_limits(t.session_id, tenant=t.tenant)
            return {"quotas": quotas, "rate_limits": rates}

        return await run("quota_status", work)

    return server

