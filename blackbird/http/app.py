"""The HTTP API of ``blackbird serve --http``, assembled as one Starlette app.

It serves JSON endpoints, session streams (SSE), the OpenAPI document and the web console.
The endpoints are data (:mod:`blackbird.http.routes`): :mod:`blackbird.http.api` (sessions,
usage, limits, memory, messages, audits, keys) and :mod:`blackbird.http.streams` (SSE streams,
stream tokens, admin monitoring, broadcast). Each request is authenticated
(:mod:`blackbird.http.auth`), checked against the endpoint's roles, its body and query decoded into
the endpoint's msgspec types (400 naming the field), and run with the caller as the principal of
what it causes. ``/openapi.json`` is generated from the same table; ``/docs`` reads it; ``/`` is
the console (static files shipped in the package, no build step). ``cors_origins`` lets pages
from those origins call the API (preflight included).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

import msgspec
import structlog

from blackbird.errors import BlackbirdError, ValidationError
from blackbird.http.auth import Caller, KeyVerifier, TokenVerifier, authenticate
from blackbird.http.routes import (
    HEARTBEAT,
    Call,
    Endpoint,
    HttpContext,
    decode_body,
    decode_query,
    error_payload,
    error_status,
    openapi,
    retry_after,
)
from blackbird.sessions.gateway import acting_principal

log = structlog.get_logger("blackbird.http")

MAX_BODY = 1024 * 1024  # bytes of a request body


def http_app(
    bb: Any,
    tokens: Mapping[str, str],
    *,
    cors_origins: Sequence[str] = (),
    heartbeat: float = HEARTBEAT,
    keys: KeyVerifier | None = None,
    stream_tokens: TokenVerifier | None = None,
) -> Any:
    """The ASGI app serving ``bb`` over HTTP; ``tokens`` maps bootstrap tokens to tenants.
    ``keys`` and ``stream_tokens`` default to ``bb``'s API keys and stream tokens."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    from blackbird.http import api, graph_api, keys_api, participants_api, streams
    from blackbird.http.tokens import StreamTokens

    if keys is None:
        keys = getattr(bb, "api_keys", None)
    tokens_service = stream_tokens if stream_tokens is not None else StreamTokens.for_client(bb)
    ctx = HttpContext(bb=bb, bootstrap=dict(tokens), keys=keys, stream_tokens=tokens_service, heartbeat=heartbeat)
    endpoints: list[Endpoint] = [
        *api.endpoints(ctx), *graph_api.endpoints(ctx), *participants_api.endpoints(ctx), *keys_api.endpoints(ctx),
        *streams.endpoints(ctx),
    ]

    def failure(exc: BaseException) -> Response:
        status = error_status(exc)
        if isinstance(exc, BlackbirdError):
            body = error_payload(exc)
        else:
            log.error("http_handler_failed", error=repr(exc))
            body = {"error": {"code": "internal_error", "message": "the server failed to answer; see its log"}}
        headers = {}
        if status == 429 and (after := retry_after(exc)) is not None:
            headers["Retry-After"] = after
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="blackbird"'
        return Response(msgspec.json.encode(body), status_code=status, media_type="application/json", headers=headers)

    def route(endpoint: Endpoint) -> Route:
        async def handle(request: Request) -> Response:
            try:
                caller: Caller = authenticate(
                    request.headers, request.query_params, keys=ctx.keys, bootstrap=ctx.bootstrap,
                    stream_tokens=ctx.stream_tokens if endpoint.stream else None,
                )
                if caller.role != "stream":
                    caller.require(endpoint.roles, endpoint.summary)
                raw = await request.body() if endpoint.body is not None else b""
                if len(raw) > MAX_BODY:
                    raise ValidationError(
                        f"body: at most {MAX_BODY} bytes, got {len(raw)}", field="body",
                        expected=f"at most {MAX_BODY} bytes", got=len(raw),
                    )
                call = Call(
                    caller=caller,
                    path=dict(request.path_params),
                    body=decode_body(raw, endpoint.body) if endpoint.body is not None else None,
                    query=decode_query(dict(request.query_params), endpoint.query) if endpoint.query else None,
                    headers={k.lower(): v for k, v in request.headers.items()},
                )
                if caller.key_id is not None and ctx.keys is not None and hasattr(ctx.keys, "used"):
                    ctx.keys.used(caller.key_id)
                token = acting_principal.set(caller.principal)
                try:
                    result = await endpoint.handler(call)
                finally:
                    acting_principal.reset(token)
            except Exception as exc:  # every failure answers as its status, none escapes as a 500 page
                return failure(exc)
            if isinstance(result, Response):
                return result
            return Response(msgspec.json.encode(result), status_code=endpoint.status, media_type="application/json")

        return Route(endpoint.path, handle, methods=[endpoint.method])

    version = getattr(bb, "version", None) or _version()
    document = openapi(endpoints, title="Blackbird HTTP API", version=version)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    console = resources.files("blackbird.http") / "console"

    async def docs(request: Request) -> Response:
        return HTMLResponse((console / "docs.html").read_text())

    routes: list[Any] = [route(e) for e in endpoints]
    mcp = _mcp_mount(ctx, failure)
    if mcp is not None:  # the MCP server: its own protocol, authenticated the same way
        from blackbird.http.mcp_api import MCP_PATH, openapi_path

        routes.append(Route(MCP_PATH, mcp, methods=["GET", "POST", "DELETE"]))
        document["paths"][MCP_PATH] = openapi_path()
    routes += [Route("/openapi.json", openapi_json), Route("/docs", docs)]
    if console.is_dir():
        routes.append(Mount("/", app=StaticFiles(directory=str(console), html=True), name="console"))
    middleware = []
    if cors_origins:
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Last-Event-ID"], max_age=600,
        ))
    return Starlette(routes=routes, middleware=middleware, lifespan=mcp.lifespan if mcp is not None else None)


def _mcp_mount(ctx: HttpContext, failure: Any) -> Any:
    """The MCP endpoint (:mod:`blackbird.http.mcp_api`), or None for a client without the service
    identity (its tools need memory, which only the service identity reaches)."""
    if getattr(ctx.bb, "tenant_credentials", False) or not hasattr(ctx.bb, "memory"):
        return None
    from blackbird.http.mcp_api import McpMount

    return McpMount(ctx, failure)


def sse_app(bb: Any, tokens: Mapping[str, str], *, heartbeat: float = HEARTBEAT) -> Any:
    """The HTTP app with bootstrap ``tokens`` only (kept for callers of the first version)."""
    return http_app(bb, tokens, heartbeat=heartbeat)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("blackbird-sdk")
    except PackageNotFoundError:
        return "0"


def load_tokens(raw: str, where: str) -> dict[str, str]:
    """``{"<token>": "<tenant>", ...}`` from JSON text; ValidationError naming ``where``."""
    from blackbird.subjects import validate_token

    try:
        tokens = msgspec.json.decode(raw, type=dict[str, str])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValidationError(
            f"{where}: expected a JSON object of token -> tenant ({exc})", field=where,
            expected='{"<token>": "<tenant>"}',
        ) from None
    for token, tenant in tokens.items():
        validate_token(tenant, where)
        if len(token) < 16:
            raise ValidationError(
                f"{where}: a token must be at least 16 characters (one for tenant {tenant!r} is "
                f"{len(token)})", field=where, expected="tokens of 16+ characters", got=len(token),
            )
    return tokens


def http_server(app: Any, host: str, port: int) -> Any:
    """A uvicorn server for ``app`` that leaves SIGINT/SIGTERM to its owner (``blackbird serve``
    stops it by setting ``should_exit``); open streams get a second to end on shutdown. It runs
    the app's lifespan (the MCP session manager's task group) around serving."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

        async def serve(self, sockets: list[socket.socket] | None = None) -> None:
            if sockets is None:
                sockets = [listening_socket(host, port)]
            for sock in sockets:
                no_delay(sock)
            await super().serve(sockets=sockets)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="on",
        timeout_graceful_shutdown=1, access_log=False,
    )
    return _Server(config)


def no_delay(sock: socket.socket) -> None:
    """Small answers leave at once (TCP_NODELAY, inherited by accepted connections): without it a
    keep-alive connection waits ~40 ms per answer for the client's delayed ACK (measured)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    no_delay(sock)
    try:
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
