"""Session streams: a session's channel messages, replayed from the log and then followed live.

A message posted on a session's channel (``send_message``: chat, progress, notification, ...)
is a ``MessagePosted`` event in the log, so a subscriber replays what it missed and goes on
live. Every message has an id, ``"<stream sequence>-<index>"`` (its commit's sequence and its
place among that commit's messages), and comes with a resume token: a subscriber that resumes
``after`` the token of the last message it took gets every message it has not had, once, with
nothing lost or repeated — across disconnects, client restarts and server restarts alike. The
token is what an SSE client sends back as ``Last-Event-ID`` (see :mod:`blackbird.http.app`).

Backpressure: a slow reader holds at most ``max_pending`` messages in memory; beyond that the
log waits on the server (JetStream flow control), nothing is dropped. Among the messages
waiting, critical ones (``notification`` by default) go first; a message of a coalescing channel
(``progress`` and ``draft`` by default) replaces the earlier one of its channel still waiting, so a reader that
falls behind gets the latest progress instead of every step. The token accounts for both (see
:mod:`blackbird.streams.backlog`); a reader that keeps up gets every message in log order.

Gaps: retention (``max_age``, limits) or an operator's purge may remove commits a resuming reader
has not had. A stream never skips them silently: the reader first gets a message on channel
``gap`` (whatever ``channels`` it asked for) whose metadata holds ``requested`` (the sequence it
resumed after) and ``first`` (the first sequence the log still holds for it); its ``resume``
token goes on after the gap. A session's commits carry their aggregate version (1, 2, ...), so a
missing commit shows as a jump in versions; when the resume point's own commit is gone too, the
stream's first held sequence decides (a gap is reported if anything after the resume point is
gone, which may include commits of other sessions only: it errs towards reporting).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import anyio.abc
import msgspec
import structlog

from actors.events import MessagePosted
from blackbird._errors_group import single_error
from blackbird._validate import invalid
from blackbird.errors import LogError
from blackbird.journal import Entry, Journal, LogReader
from blackbird.sessions.gateway import SessionGateway
from blackbird.streams.backlog import WHOLE_COMMIT, Backlog, Position, parse_resume
from blackbird.streams.feeds import LiveFeeds
from blackbird.subjects import validate_token

log = structlog.get_logger("blackbird.streams")

COALESCE = ("progress", "draft")  # "draft": an agent's reply so far (blackbird.agents)
CRITICAL = ("notification",)
GAP = "gap"  # the channel of the message that says part of the history is gone


class StreamEvent(msgspec.Struct, frozen=True):
    """One message of a session's stream."""

    id: str  # "<sequence>-<index>": its position in the log
    sequence: int  # stream sequence of the commit that holds it
    index: int  # its place among that commit's messages
    tenant: str
    session_id: str
    channel: str
    text: str
    metadata: dict[str, Any]
    at: float
    resume: str = ""  # pass it back as ``after`` (or SSE Last-Event-ID) to go on after this one


class Subscription:
    """The messages of one session, in order: ``async for event in subscription``.

    Made by :meth:`AsyncStreams.subscribe` (an ``async with``, which owns the task that reads
    the log). ``backlog`` is how many messages wait for the reader; ``coalesced`` how many were
    replaced by a newer one of their channel; :meth:`caught_up` waits until every message that
    was in the log when the subscription started has been read from it.
    """

    def __init__(self, backlog: Backlog[StreamEvent], max_pending: int, until: int, stall: float = 10.0) -> None:
        self._backlog = backlog
        self._max_pending = max_pending
        self._until = until  # the log's last sequence when subscribing
        self._stall = stall  # seconds without reading a commit of the history before caught_up() gives up
        self._read = 0  # the last sequence read from the log
        self._caught_up = anyio.Event()
        # set when the other side may go on; made only when someone waits (one per message
        # would cost more than the rest of a message's way through)
        self._reader: anyio.Event | None = None
        self._writer: anyio.Event | None = None
        self._failure: BaseException | None = None

    @property
    def backlog(self) -> int:
        """How many messages wait for the reader now (at most ``max_pending``)."""
        return len(self._backlog)

    @property
    def coalesced(self) -> int:
        """How many progress messages were replaced by a later one before the reader took them."""
        return self._backlog.coalesced

    async def caught_up(self) -> None:
        """Return once the history (the log as it was at subscription) has been read.

        Raises the subscription's failure if reading the log failed, and LogError if reading
        made no progress for ``command_timeout`` seconds (the server is gone or paused)."""
        seen = -1
        while not self._caught_up.is_set() or self._failure is not None:
            if self._failure is not None:
                raise self._failure
            # no commit read for a while: the server's fault, unless the backlog is full (then
            # reading waits for this subscription's own reader)
            if self._read == seen and len(self._backlog) < self._max_pending:
                raise LogError(
                    f"stream history: no commit read for {self._stall:g}s at sequence {self._read} "
                    f"(history ends at {self._until}); is the NATS server reachable?"
                )
            seen = self._read
            with anyio.move_on_after(self._stall):
                await self._caught_up.wait()

    async def _put(self, event: StreamEvent) -> None:
        while len(self._backlog) >= self._max_pending and not self._backlog.replaces(event):
            self._writer = anyio.Event()
            await self._writer.wait()
        self._backlog.push(event)
        if self._reader is not None:
            self._reader.set()
            self._reader = None

    def _read_commit(self, seq: int) -> None:
        self._read = seq
        self._backlog.seen(Position(seq, WHOLE_COMMIT))
        if seq >= self._until:
            self._caught_up.set()

    def _fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._caught_up.set()  # wakes caught_up(), which raises it
        if self._reader is not None:
            self._reader.set()

    def __aiter__(self) -> Subscription:
        return self

    async def get(self, timeout: float | None = None) -> StreamEvent | None:
        """The next message, or None if none came within ``timeout`` seconds."""
        with anyio.move_on_after(timeout):
            return await self.__anext__()
        return None

    async def __anext__(self) -> StreamEvent:
        while not len(self._backlog):
            if self._failure is not None:
                raise self._failure
            self._reader = anyio.Event()
            await self._reader.wait()
        event, token = self._backlog.pop()
        if self._writer is not None:
            self._writer.set()
            self._writer = None
        return msgspec.structs.replace(event, resume=token)


class AsyncStreams:
    """``.streams`` on AsyncBlackbird: subscribe to a session's channel messages."""

    def __init__(
        self, gateway: SessionGateway, journal: LogReader, *, timeout: float = 10.0, feeds: LiveFeeds | None = None
    ) -> None:
        self._gateway = gateway
        self._journal = journal
        self._timeout = timeout
        self._feeds = feeds  # live commits read once per session for every subscriber (None: each reads its own)

    @contextlib.asynccontextmanager
    async def subscribe(
        self,
        session_id: str,
        *,
        channels: Sequence[str] | None = None,
        after: str | int | None = None,
        tenant: str | None = None,
        max_pending: int = 1000,
        coalesce: Sequence[str] = COALESCE,
        critical: Sequence[str] = CRITICAL,
    ) -> AsyncIterator[Subscription]:
        """``async with streams.subscribe(session_id) as messages: async for m in messages``.

        Every message of the session (or of ``channels``) not yet had by a reader that resumes
        ``after`` (the ``resume`` token of the last message it took, or a commit sequence;
        default: from the start), then live ones as they are posted. Among waiting messages,
        ``critical`` channels go first and ``coalesce`` channels keep only their latest (both
        may be empty). Scoped to the tenant: a session of another tenant is unknown
        (SessionNotFoundError). Raises ValidationError for a malformed ``after``, channel
        list or ``max_pending``."""
        resume = parse_resume(after)
        wanted = None if channels is None else check_channels(channels)
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise invalid("max_pending", "an int >= 1", repr(max_pending))
        for name, value in (("coalesce", coalesce), ("critical", critical)):
            if isinstance(value, str) or not isinstance(value, Sequence):
                raise invalid(name, "a list of channel names (may be empty)", repr(value))
            for channel in value:
                validate_token(channel, name)
        session = await self._gateway.existing(session_id, tenant)
        subject = self._journal.subjects.session(session.tenant, session.session_id)
        until = await self._journal.last_seq_of(subject)
        backlog: Backlog[StreamEvent] = Backlog(resume, critical=critical, coalesce=coalesce)
        subscription = Subscription(backlog, max_pending, until, self._timeout)
        if until <= resume.after.sequence:  # nothing of the history is due
            subscription._caught_up.set()
        bound = log.bind(tenant=session.tenant, session_id=session.session_id)

        held_from = await first_held(self._journal) if resume.after.sequence > 0 else 0
        versions = _Versions(resume.after.sequence, held_from)

        async def on_entry(entry: Entry) -> None:
            lost = versions.check(entry.seq, entry.commit.version)
            if lost is not None:
                bound.warning("stream_gap", requested=lost, first=entry.seq)
                await subscription._put(StreamEvent(
                    id=f"{entry.seq}-{GAP}", sequence=entry.seq, index=-1,
                    tenant=session.tenant, session_id=session.session_id, channel=GAP,
                    text=f"the log no longer holds this session's messages after sequence {lost} "
                    f"and before {entry.seq}",
                    metadata={"requested": lost, "first": entry.seq}, at=entry.commit.at,
                ))
            position = 0
            for applied in entry.commit.commands:
                for event in applied.events:
                    if not isinstance(event, MessagePosted):
                        continue
                    if resume.due(Position(entry.seq, position)) and (wanted is None or event.channel in wanted):
                        await subscription._put(StreamEvent(
                            id=f"{entry.seq}-{position}", sequence=entry.seq, index=position,
                            tenant=session.tenant, session_id=session.session_id,
                            channel=event.channel, text=event.text,
                            metadata=dict(event.metadata), at=event.at,
                        ))
                    position += 1
            subscription._read_commit(entry.seq)

        async def read() -> None:
            # the commit holding ``after`` is read again: its later messages are still due, and
            # its version tells whether the next commit follows it (see _Versions)
            start = resume.after
            first = max(start.sequence - 1, 0)
            try:
                if self._feeds is None:
                    await self._journal.follow_with(subject, first, on_entry)
                else:
                    await self._feeds.follow_with(subject, first, on_entry, logger=bound)
            except Exception as exc:  # the reader gets it on its next message
                bound.warning("stream_failed", error=repr(exc))
                subscription._fail(exc)

        bound.debug("stream_subscribed", after=after, channels=wanted and sorted(wanted))
        with single_error():  # the caller's own error leaves its ``async with`` as itself
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                try:
                    yield subscription
                finally:
                    tg.cancel_scope.cancel()


def check_channels(channels: Any) -> frozenset[str]:
    """The channel names, each a valid token; ValidationError naming ``channels``."""
    if isinstance(channels, str) or not isinstance(channels, Sequence) or not channels:
        raise invalid("channels", "a non-empty list of channel names", repr(channels))
    return frozenset(validate_token(c, "channels") for c in channels)


class _Versions:
    """Tells a gap from the versions of the commits a stream reads (1, 2, ... per session).

    ``check`` returns the sequence the lost part starts after (the resume point, or the commit
    before the jump), or None when nothing is missing."""

    def __init__(self, after: int, held_from: int) -> None:
        self._after = after  # the resume point (0: from the start, where no gap is reported)
        self._held_from = held_from  # the stream's first sequence (0: unknown)
        self._last: tuple[int, int] | None = None  # (sequence, version) of the last commit read

    def check(self, seq: int, version: int) -> int | None:
        last, self._last = self._last, (seq, version)
        if seq <= self._after:  # the resume point's own commit, read again
            return None
        if last is not None:
            return last[0] if version > last[1] + 1 else None
        # the first commit after the resume point, with the resume point's own commit unknown
        if self._after == 0 or version == 1:
            return None
        return self._after if self._held_from > self._after + 1 else None


async def first_held(journal: LogReader) -> int:
    """The first sequence the log still holds (0 if this reader cannot tell: a tenant client
    reads through the hosts and sees no stream state)."""
    if not isinstance(journal, Journal):
        return 0
    info = await journal.retrying(f"read stream {journal.stream}", lambda js: js.stream_info(journal.stream))
    return int(info.state.first_seq)
