"""The MCP server over streamable HTTP at ``/v1/sessions/{session_id}/mcp``.

One :class:`~mcp.server.streamable_http_manager.StreamableHTTPSessionManager` serves every
session; its task group lives in the HTTP app's lifespan (:meth:`McpMount.lifespan`), so every
MCP connection's task ends with the app. Each request is authenticated like the rest of the API
(``Authorization: Bearer <API key>``): a session the caller may not read (another tenant's, or
for a user key one it takes no part in) is 404, and a user key must be the session's own user
(the tools act in that user's memory). The request then runs with its session and principal
bound (:func:`blackbird.mcp_server.bound_target`), and an MCP connection belongs to the
credential and session that opened it (the SDK answers 404 to anyone else).

Resumability: the manager stores every event in JetStream
(:class:`blackbird.mcp_server.JetStreamEventStore`), under a key per MCP connection that this
mount makes when the connection opens and finds again from its ``mcp-session-id``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import structlog
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.streamable_http import MCP_SESSION_ID_HEADER
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from blackbird.errors import AccessDeniedError, SessionNotFoundError
from blackbird.http.auth import authenticate
from blackbird.http.routes import HttpContext
from blackbird.mcp_server import JetStreamEventStore, Target, bound_target, mcp_server
from blackbird.mcp_server.event_store import Connection, bound_connection, new_connection_key

__all__ = ["MCP_PATH", "McpMount", "openapi_path"]

log = structlog.get_logger("blackbird.http")

MCP_PATH = "/v1/sessions/{session_id}/mcp"
MAX_CONNECTIONS = 10_000  # open MCP connections remembered (the SDK's own default limit)


class McpMount:
    """The ASGI endpoint of :data:`MCP_PATH`; ``failure(exc)`` is the app's error response."""

    def __init__(self, ctx: HttpContext, failure: Callable[[BaseException], Any]) -> None:
        self._ctx = ctx
        self._failure = failure
        bb = ctx.bb
        self.server = mcp_server(bb)
        self.store = JetStreamEventStore(bb.journal, replicas=bb.settings.replicas)
        # The API requires a bearer credential on every request, which a page of another origin
        # cannot send without CORS: the SDK's DNS-rebinding guard (Host allow-list) is not needed
        # and would refuse every host name but localhost.
        self.server.streamable_http_app(
            event_store=self.store,
            transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        )
        self.manager: StreamableHTTPSessionManager = self.server.session_manager
        self._opened = False
        self._open_lock = anyio.Lock()
        self._connections: OrderedDict[str, str] = OrderedDict()  # mcp-session-id -> connection key

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Runs the session manager (its task group holds every MCP connection) for the app's life."""
        async with self.manager.run():
            yield

    async def _open_store(self) -> None:
        if self._opened:
            return
        async with self._open_lock:
            if not self._opened:
                await self.store.open()
                self._opened = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        ctx = self._ctx
        try:
            caller = authenticate(
                request.headers, {}, keys=ctx.keys, bootstrap=ctx.bootstrap, stream_tokens=None
            )
            session_id = str(scope["path_params"]["session_id"])
            session = await ctx.bb.session_manager.get_session(session_id, tenant=caller.tenant)
            if session is None or not caller.may_read(
                session.user_id, getattr(session, "participants", {}), session.session_id
            ):
                raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
            if caller.role == "user" and caller.user_id != session.user_id:
                raise AccessDeniedError(
                    f"session {session_id!r}: only the session's own user may use its MCP tools with a user key",
                    principal=caller.principal, action="mcp", tenant=caller.tenant,
                )
            if caller.key_id is not None and ctx.keys is not None and hasattr(ctx.keys, "used"):
                ctx.keys.used(caller.key_id)
            await self._open_store()
        except Exception as exc:  # answered like every other endpoint's failure
            await self._failure(exc)(scope, receive, send)
            return

        mcp_id = request.headers.get(MCP_SESSION_ID_HEADER)
        key = self._connections.get(mcp_id) if mcp_id else None
        opening = key is None
        if key is None:
            key = new_connection_key()
        # The SDK binds an MCP connection to the identity that opened it: here the credential's
        # principal and the session, so neither another key nor another session's path can use it.
        scope["user"] = AuthenticatedUser(AccessToken(
            token="-", client_id=caller.principal, scopes=[], subject=f"{caller.tenant}/{session_id}",
        ))

        async def remember_connection(message: Message) -> None:
            if opening and message["type"] == "http.response.start":
                for name, value in message.get("headers", []):
                    if name.decode("latin-1").lower() == MCP_SESSION_ID_HEADER:
                        self._connections[value.decode("latin-1")] = key
                        while len(self._connections) > MAX_CONNECTIONS:
                            self._connections.popitem(last=False)
            await send(message)

        target = Target(tenant=caller.tenant, session_id=session_id, principal=caller.principal)
        connection = Connection(tenant=caller.tenant, session_id=session_id, key=key, principal=caller.principal)
        with bound_target(target), bound_connection(connection):
            await self.manager.handle_request(scope, receive, remember_connection)
        if request.method == "DELETE" and mcp_id:
            self._connections.pop(mcp_id, None)


def openapi_path() -> dict[str, Any]:
    """The OpenAPI entry of :data:`MCP_PATH` (the protocol itself is MCP's, not described here)."""

    def operation(method: str, summary: str) -> dict[str, Any]:
        return {
            "operationId": f"mcp_{method}",
            "summary": summary,
            "tags": ["mcp"],
            "parameters": [{"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {
                "200": {"description": "an MCP answer (JSON or an SSE stream)"},
                "401": {"description": "no or bad credentials"},
                "404": {"description": "no such session for this caller, or an unknown MCP session"},
            },
        }

    return {
        "post": operation("post", "MCP streamable HTTP: send a JSON-RPC message to the session's MCP server"),
        "get": operation("get", "MCP streamable HTTP: the server's stream (resumes with Last-Event-ID)"),
        "delete": operation("delete", "MCP streamable HTTP: end the MCP session"),
    }
