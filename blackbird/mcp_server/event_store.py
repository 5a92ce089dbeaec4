"""The MCP SDK's ``EventStore`` (streamable-HTTP resumability) kept in a JetStream stream.

The SDK ships only an in-memory store, which a restart of ``serve`` empties and which one host
cannot share with another. Here every event a server sends on a streamable-HTTP stream is a
message on ``bbmcp.<tenant>.<session_id>.<connection>.<stream>`` in the stream ``BB_MCP``
(created by the service identity, kept ``max_age`` seconds, 24 h by default), and its event id
is the message's JetStream sequence: ordered, unique, and still valid after a restart.

Whose events a replay may return: the SDK names a stream after a JSON-RPC request id, which
every MCP connection starts again from 0, so the subject also carries the connection (a key the
HTTP mount makes when a connection opens) and the Blackbird session. A replay answers only the
events after ``Last-Event-ID`` on that same subject, and only to the tenant, session and
principal that stored them; any other id (unknown, expired, someone else's) replays nothing.
Priming events (no message: a cursor the SDK hands out) are stored but never replayed.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import nats.js.errors
import structlog
from mcp.server.streamable_http import EventCallback, EventId, EventMessage, EventStore, StreamId
from mcp_types import JSONRPCMessage, jsonrpc_message_adapter
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

__all__ = ["Connection", "JetStreamEventStore", "bound_connection"]

log = structlog.get_logger("blackbird.mcp")

STREAM = "BB_MCP"
PREFIX = "bbmcp"
MAX_AGE = 24 * 3600.0  # seconds an event can be replayed
MAX_EVENT = 1024 * 1024  # bytes of one stored event (the HTTP mount's body limit is 4 MiB)
_PRINCIPAL = "Bb-Principal"


class Connection(msgspec.Struct, frozen=True, kw_only=True):
    """Whose events are stored and replayed: one MCP connection to one session."""

    tenant: str
    session_id: str
    key: str  # the connection (hex), made by the HTTP mount
    principal: str = ""


_UNBOUND = Connection(tenant="_", session_id="_", key="_")
_connection: contextvars.ContextVar[Connection] = contextvars.ContextVar("blackbird_mcp_connection", default=_UNBOUND)


@contextlib.contextmanager
def bound_connection(connection: Connection) -> Iterator[None]:
    """Events stored and replayed in this context belong to ``connection`` (the SDK stores a
    stream's events in the context of the request that opened the MCP connection or carried the
    request, and replays in the context of the resuming request)."""
    token = _connection.set(connection)
    try:
        yield
    finally:
        _connection.reset(token)


def new_connection_key() -> str:
    """A fresh connection key."""
    return uuid.uuid4().hex


class JetStreamEventStore(EventStore):
    """The SDK's event store over the JetStream stream ``stream`` (see the module docstring).

    ``journal`` is the client's :class:`~blackbird.journal.Journal` (``bb.journal``: the service
    identity). Call :meth:`open` once before use: it creates the stream if missing."""

    def __init__(
        self, journal: Any, *, stream: str = STREAM, prefix: str = PREFIX, max_age: float = MAX_AGE,
        replicas: int = 1,
    ) -> None:
        self._journal = journal
        self.stream = stream
        self.prefix = prefix
        self.max_age = max_age
        self.replicas = replicas

    async def open(self) -> JetStreamEventStore:
        """Create the stream if it does not exist (an existing one is used as it is)."""
        config = StreamConfig(
            name=self.stream, subjects=[f"{self.prefix}.>"], storage=StorageType.FILE,
            num_replicas=self.replicas, max_age=self.max_age, max_msg_size=MAX_EVENT,
            discard=DiscardPolicy.OLD, allow_direct=True,
        )
        try:
            await self._journal.retrying(
                f"read stream {self.stream}", lambda js: js.stream_info(self.stream),
                expected=(nats.js.errors.NotFoundError,),
            )
        except nats.js.errors.NotFoundError:
            try:
                await self._journal.retrying(
                    f"create stream {self.stream}", lambda js: js.add_stream(config),
                    expected=(nats.js.errors.BadRequestError,),
                )
                log.info("stream_created", stream=self.stream, replicas=self.replicas, max_age=self.max_age)
            except nats.js.errors.BadRequestError:  # another host created it meanwhile
                pass
        return self

    def _subject(self, connection: Connection, stream_id: StreamId) -> str:
        name = stream_id.encode().hex() or "00"
        return f"{self.prefix}.{connection.tenant}.{connection.session_id}.{connection.key}.{name}"

    async def store_event(self, stream_id: StreamId, message: JSONRPCMessage | None) -> EventId:
        """Store one event of ``stream_id`` for the bound connection; its id is its sequence."""
        connection = _connection.get()
        subject = self._subject(connection, stream_id)
        payload = b"" if message is None else message.model_dump_json(by_alias=True, exclude_unset=True).encode()
        headers = {_PRINCIPAL: connection.principal or "-", "Nats-Msg-Id": uuid.uuid4().hex}
        ack = await self._journal.retrying(
            f"store MCP event on {subject}",
            lambda js: js.publish(subject, payload, stream=self.stream, headers=headers),
        )
        return str(ack.seq)

    async def replay_events_after(self, last_event_id: EventId, send_callback: EventCallback) -> StreamId | None:
        """Send the bound connection's events after ``last_event_id`` on the same stream, in
        order; the stream's id, or None when the id is not one of this connection's events."""
        connection = _connection.get()
        if not last_event_id.isdigit() or not 0 < len(last_event_id) <= 19:
            log.info("mcp_replay_refused", reason="not an event id", last_event_id=last_event_id[:40])
            return None
        seq = int(last_event_id)
        try:
            first = await self._get(seq, None)
        except nats.js.errors.NotFoundError:
            log.info("mcp_replay_refused", reason="unknown or expired event", last_event_id=seq)
            return None
        head = f"{self.prefix}.{connection.tenant}.{connection.session_id}.{connection.key}."
        owner = (first.headers or {}).get(_PRINCIPAL, "-")
        if not first.subject.startswith(head) or owner != (connection.principal or "-"):
            log.info("mcp_replay_refused", reason="another connection's event", last_event_id=seq)
            return None
        try:
            stream_id = bytes.fromhex(first.subject[len(head):]).decode()
        except ValueError:
            return None
        while True:
            try:
                msg = await self._get(seq + 1, first.subject)
            except nats.js.errors.NotFoundError:
                return stream_id
            seq = int(msg.seq)
            if msg.data:  # a priming event carries no message
                message = jsonrpc_message_adapter.validate_json(msg.data)
                await send_callback(EventMessage(message, str(seq)))

    async def _get(self, seq: int, subject: str | None) -> Any:
        """The message at ``seq`` (``subject``: the first on it at or after ``seq``)."""
        if subject is None:
            return await self._journal.retrying(
                "read MCP event", lambda js: js.get_msg(self.stream, seq=seq),
                expected=(nats.js.errors.NotFoundError,),
            )
        return await self._journal.retrying(
            "read MCP events", lambda js: js.get_msg(self.stream, seq=seq, subject=subject, next=True),
            expected=(nats.js.errors.NotFoundError,),
        )
