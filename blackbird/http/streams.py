"""Streams over HTTP (Server-Sent Events): session streams, stream tokens, presence, monitor, broadcast.

For browsers and other non-NATS clients.

``GET /v1/sessions/{session_id}/events`` streams a session's channel messages
(:mod:`blackbird.streams.subscription`): first what the log holds that the client has not had, then
live ones. Each SSE event carries ``id:`` its resume token, ``event: <channel>`` and ``data:`` the
message as JSON; a client that reconnects sends the last id back as ``Last-Event-ID`` (browsers'
EventSource do so by themselves) and gets every message it has not had, once. ``?after=<token>``
does the same explicitly, ``?channels=chat,progress`` filters. A comment line every
``heartbeat`` seconds keeps idle connections open through proxies. A resume point older than
what the log still holds gives ``event: gap`` first (``data.metadata``: ``requested``, the
sequence resumed after, and ``first``, the first sequence still held): part of the history is
gone, never skipped silently.

Who may read: an API key or bootstrap token of the session's tenant that may read the session, or
a stream token for this session (``?token=``). Another tenant's session is 404, exactly as an
unknown one. A stream token for another session is 401 (the credential is not one for this
URL; nothing is looked up).

``POST /v1/sessions/{session_id}/stream-token`` gives a browser such a token: ``{"token",
"expires_at", "url"}``, ``url`` being the stream's path relative to this server
(``/v1/sessions/<id>/events?token=...``; a page on another origin prefixes the API's base URL
and needs ``serve --http-cors-origin``). An EventSource that reconnects after the token expired
gets 401 and stops: the page asks for a new token.

Presence: while a ``user`` API key holds a session's stream open, the session gets a message on
channel ``presence`` when it joins and when it leaves (metadata ``user_id``, ``state``
"joined"/"left", ``connections``: how many streams that user holds open on this server). Counted
in memory per server; a failure to post it is logged, never fails the stream.

``GET /v1/events`` (admin): every session of the caller's tenant as one stream (``event:`` the
channel, ``id:`` ``"<sequence>-<index>"``, resumable with ``Last-Event-ID`` / ``?after=``, in
log order), abuse alerts among them as ``event: alert``; ``?channels=`` keeps those channels
(``alert`` among them for alerts), ``?user_id=`` one user's sessions and alerts. A resume point
older than what the log holds gives ``event: gap`` first (``data``: ``requested``, ``first``).

``POST /v1/broadcast`` (admin): ``{"text", "metadata"?}`` posted on channel ``notification`` of
every active session of the tenant (as the activity read model has them); returns how many.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import anyio
import msgspec
import structlog

from actors.events import AlertRaised, MessagePosted, QuotaDenied, RateDenied, SlotDenied
from blackbird.errors import BlackbirdError, SessionNotFoundError
from blackbird.http.auth import ADMIN, Caller, Unauthorized
from blackbird.http.routes import Call, Endpoint, HttpContext
from blackbird.http.tokens import DEFAULT_TTL, MAX_TTL
from blackbird.sessions.gateway import acting_principal
from blackbird.streams.subscription import GAP, StreamEvent, first_held

log = structlog.get_logger("blackbird.http")

RETRY_MS = 1000  # what an EventSource waits before reconnecting
PRESENCE = "presence"
ALERT = "alert"
DENIAL = "denial"  # a refused quota, rate window or concurrency slot, as the monitor shows it
PRESENCE_TIMEOUT = 5.0  # seconds a presence post may take (a "left" one runs shielded from the disconnect)
BROADCAST_CONCURRENCY = 32
MONITOR_BUFFER = 256  # entries a monitor holds for a slow client before the log waits


class StreamQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    after: str | None = None  # a resume token (Last-Event-ID takes precedence)
    channels: str | None = None  # comma-separated channel names
    token: str | None = None  # a stream token (for EventSource, which cannot send headers)
    # "message": every event unnamed (EventSource's onmessage gets them all; the channel is in
    # the data) instead of ``event: <channel>``, which a page must listen for by name
    events: Literal["channel", "message"] = "channel"


class MonitorQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    after: str | None = None  # "<sequence>-<index>" of the last event had (Last-Event-ID takes precedence)
    since: Literal["now", "start"] = "now"  # without a resume point: live from now, or the whole log
    channels: str | None = None  # comma-separated channel names ("alert" for alerts)
    user_id: str | None = None  # only this user's sessions and alerts


class StreamTokenRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttl: Annotated[float, msgspec.Meta(ge=1, le=MAX_TTL)] = DEFAULT_TTL  # seconds the token lives


class StreamToken(msgspec.Struct, frozen=True):
    token: str
    expires_at: float  # seconds since the epoch
    url: str  # the stream's path with the token, relative to this server


class MonitorEvent(msgspec.Struct, frozen=True):
    """One event of the tenant monitor: a session's message, or an alert (``channel`` "alert",
    ``text`` its detail, ``metadata`` its kind, value, threshold and trigger sequence)."""

    id: str  # "<sequence>-<index>"
    sequence: int
    session_id: str | None
    user_id: str | None
    channel: str
    text: str
    metadata: dict[str, Any]
    at: float


class Broadcast(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: Annotated[str, msgspec.Meta(min_length=1)]
    metadata: dict[str, Any] | None = None


class BroadcastResult(msgspec.Struct, frozen=True):
    sessions: int  # active sessions the notification was posted to
    skipped: int  # active when listed, but ended (or refused the post) before it landed


def sse(event_id: str, event: str, data: bytes) -> bytes:
    """One Server-Sent Event."""
    return b"id: %s\nevent: %s\ndata: %s\n\n" % (event_id.encode(), event.encode(), data)


KEEP_ALIVE = b": keep-alive\n\n"


def _channels(raw: str | None) -> list[str] | None:
    return None if raw is None else [c for c in raw.split(",") if c]


class Presence:
    """How many streams each (tenant, session, user) holds open on this server; posts the
    joins and leaves as ``presence`` messages."""

    def __init__(self, bb: Any) -> None:
        self._bb = bb
        self._open: dict[tuple[str, str, str], int] = {}

    async def joined(self, caller: Caller, session_id: str) -> None:
        await self._change(caller, session_id, +1, "joined")

    async def left(self, caller: Caller, session_id: str) -> None:
        with anyio.CancelScope(shield=True):  # runs as the disconnect cancels the stream
            await self._change(caller, session_id, -1, "left")

    async def _change(self, caller: Caller, session_id: str, delta: int, state: str) -> None:
        assert caller.user_id is not None
        key = (caller.tenant, session_id, caller.user_id)
        count = self._open.get(key, 0) + delta
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)
        token = acting_principal.set(caller.principal)
        try:
            with anyio.move_on_after(PRESENCE_TIMEOUT) as scope:
                await self._bb.session_manager.send_message(
                    f"{caller.user_id} {state}", session_id=session_id, channel=PRESENCE, tenant=caller.tenant,
                    metadata={"user_id": caller.user_id, "state": state, "connections": count},
                )
            if scope.cancelled_caught:
                log.warning("presence_not_posted", session_id=session_id, state=state, error="timeout")
        except Exception as exc:  # presence is a courtesy: the stream goes on without it
            log.warning("presence_not_posted", session_id=session_id, state=state, error=repr(exc))
        finally:
            acting_principal.reset(token)


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The streaming endpoints, served with ``ctx``."""
    from starlette.responses import StreamingResponse

    from blackbird.streams.backlog import Position, parse_resume
    from blackbird.streams.subscription import check_channels
    from blackbird.subjects import validate_token

    bb = ctx.bb
    presence = Presence(bb)
    encode = msgspec.json.Encoder().encode

    def streaming(body: AsyncIterator[bytes]) -> Any:
        return StreamingResponse(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def readable(caller: Caller, session_id: str) -> None:
        session = await bb.session_manager.get_session(session_id, tenant=caller.tenant)
        if session is None or not caller.may_read(session.user_id, getattr(session, "participants", {}), session_id):
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)

    async def events(call: Call) -> Any:
        caller = call.caller
        session_id = call.path["session_id"]
        if caller.role == "stream" and caller.session_id != session_id:
            raise Unauthorized("the stream token is for another session")
        last_event_id = call.headers.get("last-event-id")
        after = last_event_id or call.query.after
        channels = _channels(call.query.channels)
        # everything a stream could refuse is checked before the 200 goes out
        parse_resume(after, "Last-Event-ID" if last_event_id else "after")
        if channels is not None:
            check_channels(channels)
        await readable(caller, session_id)
        present = caller.role == "user" and caller.user_id is not None

        async def body() -> AsyncIterator[bytes]:
            yield f"retry: {RETRY_MS}\n\n".encode()
            try:
                async with bb.streams.subscribe(
                    session_id, tenant=caller.tenant, after=after, channels=channels
                ) as stream:
                    if present:
                        await presence.joined(caller, session_id)
                    try:
                        while True:
                            message = await stream.get(timeout=ctx.heartbeat)
                            if message is None:
                                yield KEEP_ALIVE
                                continue
                            name = message.channel if call.query.events == "channel" else "message"
                            yield sse(message.resume, name, encode(message))
                    finally:
                        if present:
                            await presence.left(caller, session_id)
            except Exception as exc:  # the 200 went out: end the stream, the client resumes where it was
                log.warning("sse_ended", tenant=caller.tenant, session_id=session_id, error=repr(exc))

        log.debug("sse_opened", tenant=caller.tenant, session_id=session_id, after=after)
        return streaming(body())

    async def stream_token(call: Call) -> StreamToken:
        caller = call.caller
        session_id = call.path["session_id"]
        await readable(caller, session_id)
        token, expires_at = ctx.stream_tokens.issue(caller.tenant, session_id, call.body.ttl)
        return StreamToken(token, round(expires_at, 3), f"/v1/sessions/{session_id}/events?token={token}")

    async def monitor(call: Call) -> Any:
        caller = call.caller
        caller.require(ADMIN, "follow every session of the tenant")  # stream tokens included
        last_event_id = call.headers.get("last-event-id")
        resume = parse_resume(last_event_id or call.query.after, "Last-Event-ID" if last_event_id else "after")
        raw_channels = _channels(call.query.channels)
        channels = None if raw_channels is None else check_channels(raw_channels)
        user_id = None if call.query.user_id is None else validate_token(call.query.user_id, "user_id")
        journal = bb.journal
        owners: dict[str, str | None] = {}  # session id -> user id (only with ?user_id=)

        async def owner(session_id: str) -> str | None:
            if session_id not in owners:
                session = await bb.session_manager.get_session(session_id, tenant=caller.tenant)
                owners[session_id] = None if session is None else session.user_id
                if len(owners) > 100_000:  # bounded: a long-lived monitor forgets the oldest
                    del owners[next(iter(owners))]
            return owners[session_id]

        async def mapped(seq: int, subject: str, commit: Any) -> list[MonitorEvent]:
            parts = subject.split(".")
            kind, aggregate = (parts[2], parts[3]) if len(parts) == 4 else (parts[2], None)
            out: list[MonitorEvent] = []
            index = 0
            for event in commit.events:
                if isinstance(event, MessagePosted) and kind == "session":
                    item = MonitorEvent(
                        f"{seq}-{index}", seq, aggregate, None, event.channel, event.text,
                        dict(event.metadata), event.at,
                    )
                elif isinstance(event, QuotaDenied | RateDenied | SlotDenied) and kind == "session":
                    item = MonitorEvent(
                        f"{seq}-{index}", seq, aggregate, None, DENIAL, _denial_text(event),
                        {"type": type(event).__name__, **msgspec.structs.asdict(event)}, commit.at,
                    )
                elif isinstance(event, AlertRaised) and kind == "user":
                    item = MonitorEvent(
                        f"{seq}-{index}", seq, event.session_id, event.user_id, ALERT, event.detail,
                        {"kind": event.kind, "value": event.value, "threshold": event.threshold,
                         "trigger_seq": event.trigger_seq}, event.at,
                    )
                else:
                    continue
                position = Position(seq, index)
                index += 1
                if not resume.due(position) or (channels is not None and item.channel not in channels):
                    continue
                if user_id is not None:
                    who = item.user_id if item.channel == ALERT else await owner(aggregate or "")
                    if who != user_id:
                        continue
                    item = msgspec.structs.replace(item, user_id=who)
                out.append(item)
            return out

        if last_event_id is None and call.query.after is None and call.query.since == "now":
            # live from here: a resume point at the tenant's last commit
            resume = parse_resume(str(await journal.last_seq_of(journal.subjects.tenant_filter(caller.tenant))))
        held = await first_held(journal) if resume.after.sequence > 0 else 0

        async def body() -> AsyncIterator[bytes]:
            yield f"retry: {RETRY_MS}\n\n".encode()
            if held > resume.after.sequence + 1:
                gap = {"requested": resume.after.sequence, "first": held}
                yield sse(str(held - 1), GAP, encode(gap))
            send, receive = anyio.create_memory_object_stream[MonitorEvent](MONITOR_BUFFER)

            async def on_entry(entry: Any) -> None:
                for item in await mapped(entry.seq, entry.subject, entry.commit):
                    await send.send(item)

            async def follow() -> None:
                start = resume.after.sequence
                await journal.follow_with(
                    journal.subjects.tenant_filter(caller.tenant), max(start - 1, 0), on_entry
                )

            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                try:
                    while True:
                        with anyio.move_on_after(ctx.heartbeat):
                            item = await receive.receive()
                            yield sse(item.id, item.channel, encode(item))
                            continue
                        yield KEEP_ALIVE
                finally:
                    tg.cancel_scope.cancel()

        return streaming(body())

    async def broadcast(call: Call) -> BroadcastResult:
        caller = call.caller
        sessions = await active_sessions(bb, caller.tenant)
        posted = 0
        limiter = anyio.Semaphore(BROADCAST_CONCURRENCY)

        async def post(session_id: str) -> None:
            nonlocal posted
            async with limiter:
                try:
                    await bb.session_manager.send_message(
                        call.body.text, session_id=session_id, channel="notification", tenant=caller.tenant,
                        metadata={**(call.body.metadata or {}), "broadcast": True},
                    )
                    posted += 1
                except BlackbirdError as exc:  # ended since it was listed: skipped, not a failure
                    log.info("broadcast_skipped", session_id=session_id, why=exc.code)

        async with anyio.create_task_group() as tg:
            for session_id in sessions:
                tg.start_soon(post, session_id)
        log.info("broadcast", tenant=caller.tenant, sessions=posted, listed=len(sessions))
        return BroadcastResult(posted, len(sessions) - posted)

    return [
        Endpoint(
            "GET", "/v1/sessions/{session_id}/events", events, "follow a session's channel messages (SSE)",
            query=StreamQuery, response=StreamEvent, stream=True, tag="streams",
        ),
        Endpoint(
            "POST", "/v1/sessions/{session_id}/stream-token", stream_token,
            "a short-lived token to read one session's stream (for EventSource)",
            body=StreamTokenRequest, response=StreamToken, tag="streams",
        ),
        Endpoint(
            "GET", "/v1/events", monitor, "follow every session of the tenant, alerts included (SSE)",
            query=MonitorQuery, response=MonitorEvent, roles=ADMIN, stream=True, tag="streams",
        ),
        Endpoint(
            "POST", "/v1/broadcast", broadcast, "post a notification to every active session of the tenant",
            body=Broadcast, response=BroadcastResult, roles=ADMIN, tag="streams",
        ),
    ]


async def active_sessions(bb: Any, tenant: str) -> list[str]:
    """The ids of ``tenant``'s active sessions, from the activity read model once it has read
    the whole log as it is now."""
    from blackbird.sessions.analytics import ACTIVITY

    runner = await bb.projections.caught_up(ACTIVITY, await bb.journal.stream_last_seq())
    model = runner.model.tenants.get(tenant)
    if model is None:
        return []
    clock: Callable[[], float] = getattr(bb, "_clock", time.time)  # the actors' clock (tests control it)
    now = clock()
    return [row.session_id for row in model.sessions.values() if row.active_at(now)]


def _denial_text(event: QuotaDenied | RateDenied | SlotDenied) -> str:
    """A refusal in words, as the monitor shows it."""
    if isinstance(event, QuotaDenied):
        return f"{event.operation}: {event.resource_type} quota {event.used:g}/{event.limit:g}, asked {event.amount:g}"
    if isinstance(event, RateDenied):
        return f"{event.operation}: {event.limit_type} limit {event.limit}, retry after {event.retry_after:.1f}s"
    return f"{event.operation}: {event.scope} slots {event.active}/{event.limit}"
