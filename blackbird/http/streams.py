"""Session streams over HTTP as Server-Sent Events, for browsers and other non-NATS clients.

``GET /v1/sessions/{session_id}/events`` streams a session's channel messages
(:mod:`blackbird.streams.subscription`): first what the log holds that the client has not had, then
live ones. Each SSE event carries ``id:`` its resume token, ``event: <channel>`` and ``data:`` the
message as JSON; a client that reconnects sends the last id back as ``Last-Event-ID`` (browsers'
EventSource do so by themselves) and gets every message it has not had, once. ``?after=<token>``
does the same explicitly, ``?channels=chat,progress`` filters. A comment line every
``heartbeat`` seconds keeps idle connections open through proxies.

Who may read: an API key or bootstrap token of the session's tenant that may read the session, or
a stream token for this session (``?token=``). Another tenant's session is 404, exactly as an
unknown one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import structlog

from blackbird.errors import SessionNotFoundError
from blackbird.http.routes import Call, Endpoint, HttpContext
from blackbird.streams.subscription import StreamEvent

log = structlog.get_logger("blackbird.http")

RETRY_MS = 1000  # what an EventSource waits before reconnecting


class StreamQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    after: str | None = None  # a resume token (Last-Event-ID takes precedence)
    channels: str | None = None  # comma-separated channel names
    token: str | None = None  # a stream token (for EventSource, which cannot send headers)


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The streaming endpoints, served with ``ctx``."""
    from starlette.responses import StreamingResponse

    from blackbird.streams.backlog import parse_resume
    from blackbird.streams.subscription import check_channels

    bb = ctx.bb

    async def events(call: Call) -> Any:
        caller = call.caller
        session_id = call.path["session_id"]
        last_event_id = call.headers.get("last-event-id")
        after = last_event_id or call.query.after
        channels = None if call.query.channels is None else [c for c in call.query.channels.split(",") if c]
        # everything a stream could refuse is checked before the 200 goes out
        parse_resume(after, "Last-Event-ID" if last_event_id else "after")
        if channels is not None:
            check_channels(channels)
        session = await bb.session_manager.get_session(session_id, tenant=caller.tenant)
        if session is None or not caller.may_read(session.user_id, getattr(session, "participants", {}), session_id):
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)

        async def body() -> AsyncIterator[bytes]:
            yield f"retry: {RETRY_MS}\n\n".encode()
            async with bb.streams.subscribe(session_id, tenant=caller.tenant, after=after, channels=channels) as stream:
                while True:
                    message = await stream.get(timeout=ctx.heartbeat)
                    if message is None:
                        yield b": keep-alive\n\n"
                        continue
                    data = msgspec.json.encode(message).decode()
                    yield f"id: {message.resume}\nevent: {message.channel}\ndata: {data}\n\n".encode()

        log.debug("sse_opened", tenant=caller.tenant, session_id=session_id, after=after)
        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    return [
        Endpoint(
            "GET", "/v1/sessions/{session_id}/events", events, "follow a session's channel messages (SSE)",
            query=StreamQuery, response=StreamEvent, stream=True, tag="streams",
        ),
    ]
