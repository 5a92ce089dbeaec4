"""Reading a tenant's log through the hosts: ``<prefix>svc.<tenant>.log`` (request/reply, long poll).

A client on tenant credentials has no JetStream: its account reaches Blackbird only through the
service imports (see :mod:`blackbird.server.access`). So audits, session streams and the
tenant's policy are read through the hosts: a :class:`LogRead` names a subject filter inside the
tenant and a sequence to read after; the answer, a :class:`LogPage`, holds the commits as
they are in the log (``commit`` is the commit's own JSON) and the filter's last sequence. When
nothing is there yet, a read may wait (``wait`` seconds) for the next commit: following a log
is a loop of such reads, each resuming after the last sequence it got, so nothing is lost or
repeated across reconnects, and a slow reader only asks less often.

The host checks the filter against the identity the server vouches for (a tenant's own
subjects only; a user-bound credential its user's sessions and records) before reading.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated

import anyio
import anyio.abc
import msgspec
import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from actors.events import Commit, GetSession, Rejection, upcast
from blackbird._retry import backoff, describe, transient, typed
from blackbird.commands.dispatch import Dispatcher, error_of_rejection, rejection_from_error
from blackbird.commands.identity import Identity, authorize_session, identity_of
from blackbird.commands.service import serve_requests
from blackbird.errors import AccessDeniedError, BlackbirdError, CommandTimeoutError, LogError, ValidationError
from blackbird.ids import new_id
from blackbird.journal import Entry, Journal
from blackbird.subjects import Subjects, validate_token

__all__ = ["LogPage", "LogRead", "LogRecord", "LogService", "RemoteLog"]

log = structlog.get_logger("blackbird.logs")

MAX_LIMIT = 1000
MAX_WAIT = 30.0
_MAX_PAGE_BYTES = 512 * 1024  # a page fits the server's default 1 MB max payload
_FOLLOW_WAIT = 3.0  # seconds one read of a follow waits for the next commit (a host that died with it costs this)
_TRY_MARGIN = 2.0  # seconds a try waits for an answer beyond the read's own wait


class LogRead(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of a request on ``<prefix>svc.<tenant>.log``."""

    filter: str  # a subject filter inside the tenant, e.g. "bb.acme.session.s1" or "bb.acme.>"
    after: Annotated[int, msgspec.Meta(ge=0)] = 0
    until: Annotated[int, msgspec.Meta(ge=0)] | None = None
    limit: Annotated[int, msgspec.Meta(ge=0, le=MAX_LIMIT)] = 500  # 0: only the last sequence
    wait: Annotated[float, msgspec.Meta(ge=0, le=MAX_WAIT)] = 0.0


class LogRecord(msgspec.Struct, frozen=True):
    seq: int
    subject: str
    commit: msgspec.Raw  # the commit's JSON, as stored


class LogPage(msgspec.Struct, frozen=True):
    records: list[LogRecord] = []
    last: int = 0  # the filter's last sequence when read
    rejection: Rejection | None = None


class LogService:
    """Answers log reads for the tenants (queue-grouped like the command service) until cancelled."""

    def __init__(
        self, nc: NATS, journal: Journal, dispatcher: Dispatcher, queue: str, accounts: Mapping[str, str] | None = None
    ) -> None:
        self._accounts = accounts
        self._nc = nc
        self._journal = journal
        self._subjects = journal.subjects
        self._dispatcher = dispatcher
        self._queue = queue
        self._decode = msgspec.json.Decoder(LogRead).decode
        self._encode = msgspec.json.Encoder().encode

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        subject = f"{self._subjects.service_prefix}.*.log"
        await serve_requests(self._nc, subject, self._queue, self._handle, task_status=task_status)

    async def _handle(self, msg: Msg) -> None:
        try:
            page = await self._answer(msg)
        except BlackbirdError as exc:
            page = LogPage(rejection=rejection_from_error(exc))
        try:
            await self._nc.publish(msg.reply, self._encode(page))
        except Exception as exc:  # the reader may have gone
            log.warning("log_reply_failed", subject=msg.subject, error=str(exc))

    async def _answer(self, msg: Msg) -> LogPage:
        tenant = validate_token(msg.subject.split(".")[1], "tenant")
        identity = identity_of(msg.headers, tenant, "service", self._accounts)
        try:
            request = self._decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, RecursionError) as exc:
            raise ValidationError(
                f"body: expected a JSON LogRead ({exc})", field="body", expected="a JSON LogRead"
            ) from None
        await self._authorize(identity, tenant, request.filter)
        records, last = await self._journal.page(
            request.filter, request.after, until_seq=request.until, limit=request.limit,
            max_bytes=_MAX_PAGE_BYTES, wait=request.wait,
        )
        return LogPage(records=[LogRecord(s, subj, msgspec.Raw(data)) for s, subj, data in records], last=last)

    async def _authorize(self, identity: Identity, tenant: str, subject_filter: str) -> None:
        """The filter must lie inside ``tenant``; a user-bound identity may read its user's
        sessions and records and the tenant's policy only."""
        p = self._subjects.prefix
        parts = subject_filter.split(".") if isinstance(subject_filter, str) else []
        rest = parts[2:]
        inside = len(parts) >= 3 and parts[0] == p and parts[1] == tenant and (
            rest in (["tenant"], [">"])
            or len(rest) == 2 and rest[0] in ("session", "user", "memory") and _literal(rest[1])
        )
        if not inside:
            raise ValidationError(
                f"filter: expected {p}.{tenant}.> or {p}.{tenant}.<session|user|memory>.<id> or "
                f"{p}.{tenant}.tenant, got {subject_filter!r:.200}",
                field="filter", expected=f"a subject filter inside tenant {tenant!r}", got=str(subject_filter)[:200],
            )
        if identity.user_id is None or rest == ["tenant"]:
            return
        if rest == ["user", identity.user_id]:
            return
        if rest[0] == "session":
            reply = await self._dispatcher.dispatch(tenant, rest[1], GetSession(), new_id(), identity.principal)
            if reply.session is None:
                raise error_of_rejection(reply.rejection) if reply.rejection else LogError("no session")
            authorize_session(identity, reply.session.user_id, "read")
            return
        raise AccessDeniedError(
            f"{identity.principal!r} may read the records of user {identity.user_id!r} only",
            principal=identity.principal, action="read", tenant=tenant,
        )


def _literal(token: str) -> bool:
    try:
        validate_token(token, "filter")
    except ValidationError:
        return False
    return True


class Reconnects:
    """Wakes the reads waiting for an answer when the connection comes back: a request sent
    before a server restarted has lost its answer, so it is sent again at once rather than after
    its try's timeout (a long poll's is the wait plus 2 s)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def current(self) -> anyio.Event:
        """Set at the next reconnection."""
        return self._event

    def happened(self) -> None:
        self._event.set()
        self._event = anyio.Event()


class RemoteLog:
    """The log of one tenant, read through the hosts' :class:`LogService` (a
    :class:`~blackbird.journal.LogReader`)."""

    def __init__(
        self, nc: NATS, subjects: Subjects, tenant: str, timeout: float, *, reconnects: Reconnects | None = None
    ) -> None:
        self._reconnects = reconnects or Reconnects()
        self._nc = nc
        self.subjects = subjects
        self.stream = f"{subjects.service_prefix}.{tenant}.log"
        self._subject = self.stream
        self._timeout = timeout
        self._encode = msgspec.json.Encoder().encode
        self._decode_page = msgspec.json.Decoder(LogPage).decode
        self._decode_commit = msgspec.json.Decoder(Commit).decode

    async def _read(self, request: LogRead, *, patient: bool = False) -> LogPage:
        """One read. Sent again when no host answers a try (the wait plus 2 s: a host or the server
        may have restarted) or none serves the subject, until ``timeout`` (``patient``: for as long
        as the caller waits, as a live subscription does across outages)."""
        body = self._encode(request)
        deadline = None if patient else time.monotonic() + self._timeout + request.wait
        per_try = request.wait + min(self._timeout, _TRY_MARGIN)
        attempt = 0
        why = "no answer"
        while deadline is None or (remaining := deadline - time.monotonic()) > 0.01:
            try:
                msg = await self._request(body, per_try if deadline is None else min(per_try, remaining))
            except nats.errors.TimeoutError:
                why = "no answer"
                continue
            except nats.errors.Error as exc:
                if not transient(exc):
                    raise typed(exc, f"read of {request.filter}") from None
                why = describe(exc)
                pause = backoff(attempt)
                await anyio.sleep(pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic())))
                attempt += 1
                continue
            if msg is None:  # reconnected meanwhile: the answer is lost, ask again
                why = "reconnected"
                continue
            try:
                page = self._decode_page(msg.data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise LogError(f"read of {request.filter}: the answer is not a LogPage ({exc})") from None
            if page.rejection is not None:
                raise error_of_rejection(page.rejection)
            return page
        raise CommandTimeoutError(
            f"read of {request.filter} on {self._subject}: no actor host answered within {self._timeout:g}s "
            f"({why}); is `blackbird serve` running?",
            subject=self._subject, command_id="",
        )

    async def _request(self, body: bytes, timeout: float) -> Msg | None:
        """The answer to one try, or None if the connection came back meanwhile; raises what the
        request raised (as itself, not in an exception group)."""
        reconnected = self._reconnects.current()
        answer: list[Msg] = []
        failed: list[Exception] = []
        async with anyio.create_task_group() as tg:

            async def ask() -> None:
                try:
                    answer.append(await self._nc.request(self._subject, body, timeout=timeout))
                except Exception as exc:  # handed to the caller below
                    failed.append(exc)
                tg.cancel_scope.cancel()

            tg.start_soon(ask)
            await reconnected.wait()
            tg.cancel_scope.cancel()
        if failed:
            raise failed[0]
        return answer[0] if answer else None

    def _entry(self, record: LogRecord) -> Entry:
        try:
            return Entry(record.seq, record.subject, upcast(self._decode_commit(record.commit)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise LogError(f"{record.subject} at sequence {record.seq} is not a Blackbird commit: {exc}") from None

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int:
        return (await self._read(LogRead(filter=subject, limit=0))).last

    async def replay(
        self,
        subject_filter: str,
        after_seq: int,
        on_entry: Callable[[int, str, Commit], None],
        until_seq: int | None = None,
    ) -> int:
        """Like :meth:`Journal.replay`: every commit after ``after_seq`` up to ``until_seq`` (else
        up to the filter's last sequence when the replay starts)."""
        last = await self.last_seq_of(subject_filter)
        until = last if until_seq is None else min(until_seq, last)
        while after_seq < until:
            page = await self._read(LogRead(filter=subject_filter, after=after_seq, until=until))
            if not page.records:
                break
            for record in page.records:
                entry = self._entry(record)
                on_entry(entry.seq, entry.subject, entry.commit)
                after_seq = entry.seq
        return after_seq

    async def follow(self, subject_filter: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        """Every commit after ``after_seq``, then new ones as they come (until cancelled)."""
        while True:
            page = await self._read(LogRead(filter=subject_filter, after=after_seq, wait=_FOLLOW_WAIT), patient=True)
            for record in page.records:
                entry = self._entry(record)
                after_seq = entry.seq
                yield entry

    async def follow_with(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[Entry], Awaitable[None]]
    ) -> None:
        async for entry in self.follow(subject_filter, after_seq):
            await on_entry(entry)
