"""Session streams over HTTP as Server-Sent Events, for browsers and other non-NATS clients.

``GET /v1/sessions/{session_id}/events`` streams a session's channel messages
(:mod:`blackbird.streams.subscription`): first what the log holds that the client has not had, then live
ones. Each SSE event carries ``id:`` its resume token, ``event: <channel>`` and ``data:`` the
message as JSON; a client that reconnects sends the last id back as ``Last-Event-ID`` (browsers'
EventSource do so by themselves) and gets every message it has not had, once. ``?after=<token>``
does the same explicitly, ``?channels=chat,progress`` filters. A comment line every
``heartbeat`` seconds keeps idle connections open through proxies.

Tenants are walls: every request names its tenant by ``Authorization: Bearer <token>``, a token
the host was given for that tenant, and sees only that tenant's sessions (another tenant's
session is 404, exactly as an unknown one). Errors are JSON ``{"error": {"code", "message",
...fields}}`` with 400 (bad ``after``/``channels``, naming the field), 401 and 404.
"""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import msgspec
import structlog

from blackbird.errors import BlackbirdError, SessionNotFoundError, ValidationError

log = structlog.get_logger("blackbird.http")

HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle stream
RETRY_MS = 1000  # what an EventSource waits before reconnecting


def sse_app(bb: Any, tokens: Mapping[str, str], *, heartbeat: float = HEARTBEAT) -> Any:
    """The ASGI (Starlette) app serving ``bb``'s session streams; ``tokens`` maps a bearer
    token to the one tenant it may read."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from blackbird.streams.backlog import parse_resume
    from blackbird.streams.subscription import check_channels

    def error(status: int, exc: BlackbirdError | None, code: str, message: str) -> Response:
        fields = {} if exc is None else {k: v for k, v in exc.fields.items() if _jsonable(v)}
        return JSONResponse({"error": {"code": code, "message": message, **fields}}, status_code=status)

    def tenant_of(request: Request) -> str | None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        for known, tenant in tokens.items():  # constant-time compare, no early exit on a hit
            if hmac.compare_digest(known.encode(), token.strip().encode()):
                return tenant
        return None

    async def events(request: Request) -> Response:
        tenant = tenant_of(request)
        if tenant is None:
            return error(401, None, "unauthorized", "expected Authorization: Bearer <a token of this host>")
        session_id = request.path_params["session_id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after")
        raw_channels = request.query_params.get("channels")
        channels = None if raw_channels is None else [c for c in raw_channels.split(",") if c]
        try:  # everything a stream could refuse is checked before the 200 goes out
            parse_resume(after, "after" if "last-event-id" not in request.headers else "Last-Event-ID")
            if channels is not None:
                check_channels(channels)
            session = await bb.session_manager.get_session(session_id, tenant=tenant)
        except ValidationError as exc:
            return error(400, exc, exc.code, str(exc))
        except SessionNotFoundError as exc:
            return error(404, exc, exc.code, str(exc))
        if session is None:
            return error(404, None, "session_not_found", f"session {session_id!r} not found")

        async def body() -> AsyncIterator[bytes]:
            yield f"retry: {RETRY_MS}\n\n".encode()
            async with bb.streams.subscribe(session_id, tenant=tenant, after=after, channels=channels) as stream:
                while True:
                    message = await stream.get(timeout=heartbeat)
                    if message is None:
                        yield b": keep-alive\n\n"
                        continue
                    data = msgspec.json.encode(message).decode()
                    yield f"id: {message.resume}\nevent: {message.channel}\ndata: {data}\n\n".encode()

        log.debug("sse_opened", tenant=tenant, session_id=session_id, after=after)
        return StreamingResponse(
            body(), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    return Starlette(routes=[Route("/v1/sessions/{session_id}/events", events)])


def _jsonable(value: Any) -> bool:
    return isinstance(value, str | int | float | bool | type(None) | list | dict)


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
    stops it by setting ``should_exit``); open streams get a second to end on shutdown."""
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", lifespan="off",
        timeout_graceful_shutdown=1, access_log=False,
    )
    return _Server(config)
