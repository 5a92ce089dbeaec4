"""The log: one JetStream stream of commits, plus the snapshot KV bucket.

Implements :class:`actors.ports.Journal` and :class:`actors.ports.SnapshotStore`.
An append is one message (one commit) carrying ``Nats-Expected-Last-Subject-Sequence``
(optimistic concurrency) and ``Nats-Msg-Id`` = command id (idempotency within the stream's
duplicate window; beyond it, the aggregate's own memory of recent command ids).

Failover. Every operation rides out a NATS failover until its deadline (``command_timeout``
seconds from its start) and then raises a typed error, never a raw nats-py one:

* an append whose acknowledgement does not come within a short per-try timeout (0.5 s, growing
  to 1 s) is sent again under the same ``Nats-Msg-Id`` (the stream's deduplication and the
  expected sequence make that safe), and so is one answered "no responders" or a 5xx status
  (a stream electing a leader), after a short pause. While the connection is down nothing is
  re-sent (nats-py buffers what was published); on reconnection everything pending is re-sent
  at once. So commands flow again as soon as a new stream leader answers.
* After the deadline, an append raises :class:`~blackbird.errors.CommandTimeoutError` if one of
  its tries may have been stored (its acknowledgement never came: retry with the same command
  id to find out), or :class:`~blackbird.errors.LogError` if every try was refused (nothing was
  stored). If a re-sent try is answered "duplicate" or "wrong last sequence", the log is read to
  tell our own earlier try (then it is our success) from another writer's commit.
* Reads (last sequence, message gets, snapshot gets, consumers for replay and follow) are retried
  the same way (see :mod:`blackbird._retry`) and raise LogError after the deadline.

The stream and buckets are created with ``replicas`` replicas; an existing stream is never
shrunk or loosened: only subjects it lacks are added, other differences are logged, and the
stream's own configuration decides how it is read (direct gets only on one replica).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    ObjectStoreConfig,
    StorageType,
    StreamConfig,
    StreamInfo,
)
from nats.js.object_store import ObjectStore

from actors.events import Commit, upcast
from actors.ports import AggregateKey, AppendConflict, AppendResult, CommitUnencodable
from blackbird._nats import Connection
from blackbird._retry import (
    Bucket,
    Contexts,
    RoundTrips,
    backoff,
    describe,
    retrying,
    status_code,
    transient,
    try_timeout,
    typed,
)
from blackbird.config import Settings
from blackbird.errors import ClosedError, CommandTimeoutError, LogError, PayloadTooLargeError
from blackbird.subjects import Subjects

T = TypeVar("T")

log = structlog.get_logger("blackbird.journal")

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code for a failed expected-last-subject-sequence
STREAM_NAME_IN_USE = 10058  # stream exists with a different configuration
_API = "$JS.API"
_HEADROOM = 4096  # bytes of a message beyond the commit, in the max_msg_size of a stream we create
# A snapshot larger than this goes to an object store (a KV value is one message, at most the
# server's max_payload, 1 MiB by default); the KV entry then holds the marker and the object's name.
_INLINE_SNAPSHOT = 512 * 1024
_LARGE_SNAPSHOT = b"\xc1"  # a byte msgpack never writes: no snapshot starts with it
_LARGE_SNAPSHOTS = "bb_snapshots_large"
_HEADERS = 512  # bytes our headers take at most (message id, expected sequence), in a stream's limit
_SWEEP = 0.1  # seconds between two looks at the appends waiting for their acknowledgement
_BACKLOG = 256 * 1024  # bytes waiting in nats-py's outgoing buffer: the server is not reading
_HEARTBEAT = 1.0  # seconds: a consumer silent for two of these is recreated by nats-py
_FIRST_TRY = try_timeout(0)
_CONSUMER_TRY = 2.0  # seconds one try to create a consumer waits (also when nats-py recreates it)


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _PubAck(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


class _AckInbox:
    """Pipelined request/reply for appends over one wildcard reply subscription.

    Why not ``js.publish_async``: nats-py 2.16 never completes its future when the ack is an API
    error (the reply handler raises instead), so an OCC conflict would hang. Why not
    ``nc.request``: it arms a timer per request, the top cost of an append under load. Here a
    single sweeper expires overdue tries instead.

    Every try of one append uses the append's token as reply subject, so a late answer to an
    earlier try still completes the current one. The sweeper expires a try at its own deadline
    while connected; while disconnected only at its append's final deadline (nothing can be
    re-sent meanwhile); on reconnection at once (what the old connection carried may be lost).
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._prefix_length = len(self._prefix.encode())
        # token -> (the current try's future: the answer's payload, the try's deadline, the
        # append's deadline)
        self._pending: dict[str, tuple[asyncio.Future[bytes], float, float]] = {}
        self._counter = 0
        self._connected = True
        self._earliest = float("inf")  # no try is due before this (a lower bound)
        self._closed = False
        # how long an answered try took, from the call to its answer (an average of the recent
        # ones): in a saturated process the message waits for the flusher's turn and the answer
        # for the reader's, a full pass of the event loop's ready queue each
        self.trips = RoundTrips()

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        if isinstance(self._nc, Connection):  # answers complete their futures from the reader
            self._nc.deliver_directly(sub, self._on_answer)
        task_status.started()
        try:
            while True:
                await anyio.sleep(_SWEEP)
                self._sweep(time.monotonic())
        finally:
            self._closed = True
            for future, _, _ in self._pending.values():
                if not future.done():
                    future.set_exception(ClosedError("the journal was closed before the append was acknowledged"))
            self._pending.clear()
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg.data or b"")  # empty: a status (503 no responders)

    def _on_answer(self, subject: bytes, data: bytes) -> None:
        # runs in the client's reader: it must not raise (a token is ASCII; anything else matches none)
        entry = self._pending.pop(subject[self._prefix_length :].decode("utf-8", "replace"), None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(data)

    def _sweep(self, now: float) -> None:
        connected = self._nc.is_connected
        reconnected = connected and not self._connected
        self._connected = connected
        if reconnected:
            self._expire(lambda _: True)
        elif now >= self._earliest:  # else no try can be due: skip the scan
            self._earliest = float("inf")
            if connected:
                self._expire(lambda entry: entry[1] <= now)
            else:  # only appends whose own deadline has come: nothing can be re-sent now
                self._expire(lambda entry: entry[2] <= now)

    def _expire(self, due: Callable[[tuple[asyncio.Future[bytes], float, float]], bool]) -> None:
        overdue = []
        earliest = self._earliest
        for token, entry in self._pending.items():
            if due(entry):
                overdue.append(token)
            elif entry[1] < earliest:
                earliest = entry[1]
        self._earliest = earliest
        for token in overdue:
            future = self._pending.pop(token)[0]
            if not future.done():
                future.set_exception(TimeoutError())

    def token(self) -> str:
        """A new reply token, for all the tries of one append."""
        self._counter += 1
        return str(self._counter)

    @property
    def backed_up(self) -> bool:
        """Whether sending more would only pile up: disconnected, or the server not reading."""
        return not self._nc.is_connected or self._nc.pending_data_size > _BACKLOG

    async def request(
        self, token: str, subject: str, payload: bytes, headers: dict[str, str],
        try_deadline: float, deadline: float, *, send: bool = True,
    ) -> bytes:
        """Publish (unless ``send`` is False: wait on for an earlier try) and wait for the answer
        to ``token``: its payload (empty for a status); TimeoutError at the try's deadline (see
        the class docstring)."""
        if self._closed:
            raise ClosedError("the journal is closed (its client was closed)")
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        started = time.monotonic()
        # a try is not given up before its answer could come through our own queues (RoundTrips)
        try_deadline = min(max(try_deadline, started + self.trips.floor()), deadline)
        self._pending[token] = (future, try_deadline, deadline)
        if try_deadline < self._earliest:
            self._earliest = try_deadline
        try:
            if send:
                await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            answer = await future
            self.trips.observe(time.monotonic() - started)
            return answer
        finally:
            self._pending.pop(token, None)


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a message a consumer delivered, read straight from its reply
    subject (``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...``, or with a domain and
    an account hash after ``ACK``): what ``msg.metadata.sequence.stream`` gives, without
    building the whole metadata (a datetime and three objects) for every commit a follower
    reads."""
    tokens = (msg.reply or "").split(".")
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[5])
    if len(tokens) >= 11 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[7])
    return int(msg.metadata.sequence.stream)  # raises NotJSMessageError, as nats-py does


class Entry(NamedTuple):
    seq: int
    subject: str
    commit: Commit


class LogReader(Protocol):
    """Reading the log, as audits, streams and the policy book do: :class:`Journal` straight from
    JetStream, :class:`blackbird.commands.logs.RemoteLog` through the hosts (tenant credentials)."""

    subjects: Subjects
    stream: str

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int: ...

    def follow(self, subject_filter: str, after_seq: int = 0) -> AsyncIterator[Entry]: ...

    async def follow_with(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[Entry], Awaitable[None]]
    ) -> None: ...

    async def replay(
        self,
        subject_filter: str,
        after_seq: int,
        on_entry: Callable[[int, str, Commit], None],
        until_seq: int | None = None,
    ) -> int: ...


_DIRECT_READS = 8  # commits read by direct gets before a catch-up switches to a consumer


class Journal:
    """The JetStream-backed event log. Use ``async with Journal.open(nc, settings) as journal``."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=settings.command_timeout)
        self.contexts = Contexts(nc)
        """JetStream contexts by per-try timeout, for :meth:`retrying`."""
        self._settings = settings
        self._timeout = settings.command_timeout
        self.subjects = Subjects(settings.subject_prefix)
        self.stream = settings.stream
        # Reads of an aggregate's tail: on a single replica the direct-get API answers from the
        # one copy, so it is read-your-writes and much cheaper; with replicas a follower could
        # answer stale, so they go to the leader. Decided by the stream's real configuration
        # once it is known (see _adopt); leader reads until then.
        self._direct = False
        self.replicas: int | None = None
        """The stream's real number of replicas (None until known: no stream yet)."""
        self._max_payload = settings.max_payload
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(Commit).decode
        self._decode_ack = msgspec.json.Decoder(_PubAck).decode
        self._kv: Bucket | None = None
        self._large: Callable[[JetStreamContext], ObjectStore] | None = None  # snapshots too big for a message
        self._acks = _AckInbox(nc)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, nc: NATS, settings: Settings, *, configure: bool = True
    ) -> AsyncIterator[Journal]:
        """Open the log; with ``configure`` also create the stream and snapshot bucket if missing
        (an existing stream only gains the subjects it lacks: see :meth:`_ensure_stream`)."""
        journal = cls(nc, settings)
        if configure:
            await journal._ensure_stream()
            journal._kv = await journal.bucket(settings.snapshot_bucket, create=True, direct_ok=True)
        else:
            info = await journal._stream_info(journal.stream)
            if info is not None:
                journal._adopt(info.config)
        async with anyio.create_task_group() as tg:
            await tg.start(journal._acks.run)
            try:
                yield journal
            finally:
                tg.cancel_scope.cancel()

    # ------------------------------------------------------------------ configuration

    def _stream_config(self) -> StreamConfig:
        s = self._settings
        return StreamConfig(
            name=self.stream,
            subjects=self.subjects.stream_subjects,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window,
            max_msg_size=s.max_payload + _HEADROOM,
            discard=DiscardPolicy.NEW,
            allow_direct=True,
        )

    async def _ensure_stream(self) -> None:
        """Create the stream with this client's configuration if it does not exist.

        An existing stream is shared: another client may have made it bigger on purpose (three
        replicas, a longer duplicate window). So this only adds the subjects it lacks and never
        lowers anything; every other difference is logged, and the stream is used as it is.
        """
        wanted = self._stream_config()
        info = await self._stream_info(self.stream)
        if info is None:
            try:
                info = await self.retrying(
                    f"create stream {self.stream}", lambda js: js.add_stream(wanted),
                    expected=(nats.js.errors.BadRequestError,),
                )
                log.info("stream_created", stream=self.stream, subjects=wanted.subjects, replicas=wanted.num_replicas)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise LogError(f"could not create stream {self.stream}: {exc.description}") from None
                info = await self._stream_info(self.stream)  # created meanwhile by another client
                if info is None:
                    raise LogError(f"stream {self.stream} was created and deleted meanwhile") from None
        else:
            info = await self._reconcile(info, wanted)
        self._adopt(info.config)

    async def _reconcile(self, info: StreamInfo, wanted: StreamConfig) -> StreamInfo:
        have = info.config
        for setting, ours, theirs, more in (
            ("num_replicas", wanted.num_replicas, have.num_replicas, _more(have.num_replicas, wanted.num_replicas)),
            ("max_msg_size", wanted.max_msg_size, have.max_msg_size, _more(have.max_msg_size, wanted.max_msg_size)),
            ("duplicate_window", wanted.duplicate_window, have.duplicate_window,
             _more(have.duplicate_window, wanted.duplicate_window)),
            ("storage", wanted.storage, have.storage, False),
            ("discard", wanted.discard, have.discard, False),
            ("allow_direct", wanted.allow_direct, have.allow_direct, False),
        ):
            if ours != theirs:  # the stream is kept as it is; more than configured is no concern
                (log.info if more else log.warning)(
                    "stream_setting_differs", stream=self.stream, setting=setting,
                    configured=str(ours), actual=str(theirs), kept="actual",
                )
        missing = [s for s in wanted.subjects or [] if s not in (have.subjects or [])]
        if not missing:
            return info
        # The update carries the server's own configuration (every field, also those this
        # nats-py does not know) with the missing subjects added: nothing else changes.
        raw = await self._api(f"STREAM.INFO.{self.stream}", b"", f"read stream {self.stream}")
        config = raw["config"]
        config["subjects"] = list(config.get("subjects") or []) + missing
        await self._api(
            f"STREAM.UPDATE.{self.stream}", msgspec.json.encode(config), f"add subjects to stream {self.stream}"
        )
        log.info("stream_subjects_added", stream=self.stream, subjects=missing)
        updated = await self._stream_info(self.stream)
        if updated is None:
            raise LogError(f"stream {self.stream} was deleted while its subjects were added")
        return updated

    async def _api(self, endpoint: str, body: bytes, what: str) -> dict[str, Any]:
        """A raw JetStream API request (JSON in, JSON out), retried; its error as LogError."""

        async def call(js: JetStreamContext) -> Any:
            msg = await self._nc.request(f"{_API}.{endpoint}", body, timeout=try_timeout(0) * 2)
            if not msg.data and msg.headers and status_code(msg.headers.get("Status")) >= 500:
                raise nats.js.errors.ServiceUnavailableError
            return msgspec.json.decode(msg.data)

        answer = await self.retrying(what, call)
        if not isinstance(answer, dict):
            raise LogError(f"{what}: unexpected answer {answer!r:.200}")
        error = answer.get("error")
        if error:
            raise LogError(f"{what}: {error.get('description') or error}")
        return answer

    def _adopt(self, config: StreamConfig) -> None:
        """Read the stream as it really is configured."""
        self.replicas = config.num_replicas or 1
        self._direct = bool(config.allow_direct) and self.replicas == 1
        limit = config.max_msg_size
        if limit is not None and limit > 0:  # the stream's limit counts headers too
            self._max_payload = min(self._settings.max_payload, limit - _HEADERS)

    async def _stream_info(self, name: str) -> StreamInfo | None:
        """The stream's info, None if it does not exist."""
        try:
            return await self.retrying(
                f"read stream {name}", lambda js: js.stream_info(name), expected=(nats.js.errors.NotFoundError,)
            )
        except nats.js.errors.NotFoundError:
            return None

    async def _store_stream(
        self,
        stream: str,
        what: str,
        replicas: int | None,
        create: Callable[[JetStreamContext], Awaitable[object]] | None,
    ) -> StreamInfo | None:
        """The info of ``stream``, the stream behind the store ``what`` (a replica count that differs
        from ``replicas``, default the setting, is logged); None if it is missing, after creating it
        with ``create`` if given (one that another client created meanwhile counts as created)."""
        info = await self._stream_info(stream)
        if info is not None:
            self._log_replicas(stream, info.config.num_replicas, replicas)
            return info
        if create is not None:
            try:
                await self.retrying(f"create {what}", create, expected=(nats.js.errors.BadRequestError,))
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != STREAM_NAME_IN_USE:
                    raise LogError(f"could not create {what}: {exc.description}") from None
        return None

    async def bucket(
        self, name: str, *, create: bool, replicas: int | None = None, history: int = 1, direct_ok: bool = False
    ) -> Bucket | None:
        """The KV bucket ``name``; created with ``replicas`` replicas (default: the setting) if
        missing and ``create`` (else None). An existing bucket is used as it is (a replica count that differs from the
        setting is logged). ``direct_ok``: its reads may be answered by a replica that lags (for
        caches such as snapshots); otherwise with several replicas they go to the leader."""
        stream = f"KV_{name}"
        config = KeyValueConfig(
            bucket=name, history=history, replicas=replicas or self._settings.replicas, storage=StorageType.FILE
        )
        info = await self._store_stream(
            stream, f"bucket {name}", replicas, (lambda js: js.create_key_value(config=config)) if create else None
        )
        if info is None:
            if not create:
                return None
            info = await self._stream_info(stream)
            if info is None:
                raise LogError(f"bucket {name} was created and deleted meanwhile")
        actual = info.config.num_replicas or 1
        return Bucket(name, direct=bool(info.config.allow_direct) and (direct_ok or actual == 1))

    async def object_store(
        self, name: str, *, create: bool, replicas: int | None = None
    ) -> Callable[[JetStreamContext], ObjectStore] | None:
        """The object store ``name`` as a handle maker for :meth:`retrying`; created with
        ``replicas`` replicas (default: the setting) if missing and ``create`` (else None)."""
        stream = f"OBJ_{name}"
        config = ObjectStoreConfig(bucket=name, replicas=replicas or self._settings.replicas, storage=StorageType.FILE)
        info = await self._store_stream(
            stream, f"object store {name}", replicas,
            (lambda js: js.create_object_store(name, config=config)) if create else None,
        )
        if info is None and not create:
            return None

        def handle(js: JetStreamContext) -> ObjectStore:
            return ObjectStore(name=name, stream=stream, js=js)

        return handle

    def _log_replicas(self, stream: str, actual: int | None, configured: int | None) -> None:
        wanted = configured or self._settings.replicas
        if (actual or 1) != wanted:
            (log.info if (actual or 1) > wanted else log.warning)(
                "stream_setting_differs", stream=stream, setting="num_replicas",
                configured=str(wanted), actual=str(actual), kept="actual",
            )

    @property
    def jetstream(self) -> Any:
        """The JetStream context this journal uses (for buckets beside the stream); its requests
        time out after ``command_timeout`` and are not retried (see :meth:`retrying`)."""
        return self._js

    @property
    def timeout(self) -> float:
        """Seconds an operation is retried through a failover before its typed error."""
        return self._timeout

    async def retrying(
        self,
        what: str,
        op: Callable[[JetStreamContext], Awaitable[T]],
        *,
        per_try: float | None = None,
        expected: tuple[type[BaseException], ...] = (),
    ) -> T:
        """``op(js)`` retried through failovers for ``command_timeout`` seconds (see
        :func:`blackbird._retry.retrying`)."""
        return await retrying(
            what, op, self.contexts, timeout=self._timeout, per_try=per_try, expected=expected,
            trips=self._acks.trips,  # one average of the process's answer times, appends and reads
        )

    # ------------------------------------------------------------------ Journal port

    async def append(
        self, key: AggregateKey, commit: Commit, *, expected_seq: int, msg_id: str, deadline: float | None = None
    ) -> AppendResult:
        try:
            payload = self._encode(commit)
        except Exception as exc:  # a lone surrogate, a type JSON has no form for: the commands' fault
            raise CommitUnencodable(f"{type(exc).__name__}: {exc}") from exc
        if len(payload) > self._max_payload:
            raise PayloadTooLargeError(
                f"command: encoded commit is {len(payload)} bytes, expected at most "
                f"{self._max_payload} (max_payload)",
                field="command",
                expected=f"at most {self._max_payload} bytes",
                got=len(payload),
            )
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            "Nats-Msg-Id": msg_id,
        }
        subject = self.subjects.aggregate(key)
        acks = self._acks
        token = acks.token()
        now = time.monotonic()
        # the caller's deadline (a command that waited behind others has less time left)
        deadline = now + self._timeout if deadline is None else min(deadline, now + self._timeout)
        try_deadline = min(now + _FIRST_TRY, deadline)
        attempt = 0
        uncertain = False  # a try went unanswered: it may have been stored
        why = ""
        send = True
        while True:
            try:
                answer = await acks.request(token, subject, payload, headers, try_deadline, deadline, send=send)
            except TimeoutError:
                uncertain, why = True, "no acknowledgement"
                attempt += 1
                send = not acks.backed_up  # else wait on: what was sent is still on its way
                now = time.monotonic()
                if now >= deadline:
                    raise self._unstored(subject, commit, msg_id, why, uncertain) from None
                try_deadline = min(now + try_timeout(attempt), deadline)
                continue
            except nats.errors.MaxPayloadError:
                raise PayloadTooLargeError(
                    f"command: encoded commit is {len(payload)} bytes, more than the NATS server accepts",
                    field="command", expected="at most the server's max_payload", got=len(payload),
                ) from None
            except nats.errors.Error as exc:  # publishing failed (e.g. disconnected, buffer full)
                if not transient(exc):
                    raise typed(exc, f"append to {subject}") from None
                why = describe(exc)
            else:
                result = await self._answer(answer, subject, expected_seq, payload, uncertain)
                if isinstance(result, AppendResult):
                    return result
                why = result
            # Refused at once (not connected, no responders, 5xx): send again after a short pause.
            send = True
            next_try = await _pause(attempt, deadline)
            attempt += 1
            if next_try is None:
                raise self._unstored(subject, commit, msg_id, why, uncertain)
            try_deadline = next_try

    async def _answer(
        self, answer: bytes, subject: str, expected_seq: int, payload: bytes, uncertain: bool
    ) -> AppendResult | str:
        """What an answer to an append (its payload) says: its result, or why the stream refused
        it for now (to be sent again). A conflict raises AppendConflict, any other refusal
        LogError. ``uncertain``: an earlier try went unanswered, so a "duplicate" or "wrong last
        sequence" may be that try, stored: the log tells."""
        if not answer:  # a status: 503 no responders (no leader yet, or no stream)
            return "no responders: the stream has no leader (an election?) or does not capture the subject"
        ack = self._decode_ack(answer)
        if ack.error is None:
            if ack.duplicate and uncertain and await self._stored_as(subject, expected_seq, payload) == ack.seq:
                return AppendResult(ack.seq, False)  # our own earlier try: this call's success
            return AppendResult(ack.seq, ack.duplicate)
        if ack.error.err_code == WRONG_LAST_SEQUENCE:
            if uncertain and (stored := await self._stored_as(subject, expected_seq, payload)):
                return AppendResult(stored, False)  # our own earlier try was stored
            raise AppendConflict(ack.error.description)
        if ack.error.code < 500:
            raise LogError(f"append to {subject} failed: {ack.error.description}")
        return ack.error.description  # the stream is not ready (e.g. recovering)

    def _unstored(self, subject: str, commit: Commit, msg_id: str, why: str, uncertain: bool) -> Exception:
        ids = commit.command_ids
        what = f"command {ids[0]!r}" if len(ids) == 1 else f"a commit of {len(ids)} commands ({', '.join(ids[:3])}...)"
        if uncertain:
            return CommandTimeoutError(
                f"append of {what} to {subject}: not acknowledged within {self._timeout:g}s ({why}); it "
                "may or may not have been applied: retry with the same command id to find out",
                subject=subject, command_id=ids[0] if len(ids) == 1 else msg_id,
            )
        return LogError(f"append of {what} to {subject}: refused for {self._timeout:g}s ({why}); nothing was stored")

    async def _stored_as(self, subject: str, expected_seq: int, payload: bytes) -> int:
        """The sequence of ``payload`` if it is the commit right after ``expected_seq`` on
        ``subject`` (an earlier try of this append was stored), else 0."""
        try:
            msg = await self._next_on(subject, expected_seq + 1)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0) if msg.data == payload else 0

    async def _next_on(self, subject: str, start: int) -> Any:
        """The first message on ``subject`` at or after sequence ``start`` (NotFoundError if none)."""
        return await self.retrying(
            f"read {subject}",
            lambda js: js.get_msg(self.stream, seq=start, subject=subject, next=True, direct=self._direct),
            expected=(nats.js.errors.NotFoundError,),
        )

    async def last_seq(self, key: AggregateKey) -> int:
        return await self.last_seq_of(self.subjects.aggregate(key), direct=self._direct)

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int:
        """Sequence of the last message on ``subject`` (wildcards allowed; 0 if none)."""
        try:
            msg = await self.retrying(
                f"read the last sequence of {subject}",
                lambda js: js.get_last_msg(self.stream, subject, direct=direct),
                expected=(nats.js.errors.NotFoundError,),
            )
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    async def read(
        self, key: AggregateKey, after_seq: int, until_seq: int | None = None
    ) -> list[tuple[int, Commit]]:
        subject = self.subjects.aggregate(key)
        if until_seq is None:
            until_seq = await self.last_seq_of(subject)
        out: list[tuple[int, Commit]] = []
        # A few commits behind (a lost append race, a query's catch-up): get them one by one,
        # a round trip each, instead of creating a consumer (several round trips). A host that
        # lost a race is back with a fresh decision sooner, so it rarely loses the next one.
        while after_seq < until_seq and len(out) < _DIRECT_READS:
            try:
                msg = await self._next_on(subject, after_seq + 1)
            except nats.js.errors.NotFoundError:
                raise LogError(f"{subject}: no commit after sequence {after_seq}, expected up to {until_seq}") from None
            seq = int(msg.seq or 0)
            if not after_seq < seq <= until_seq:
                break
            out.append((seq, self._commit(msg.data or b"", subject, seq)))
            after_seq = seq
        if after_seq < until_seq:
            out += [(e.seq, e.commit) for e in await self._collect(subject, after_seq, until_seq, strict=True)]
        return out

    def _commit(self, data: bytes, subject: str, seq: int) -> Commit:
        try:
            return upcast(self._decode(data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise LogError(f"{subject} at sequence {seq} is not a Blackbird commit: {exc}") from None

    def _entry(self, msg: Msg) -> Entry | None:
        """A delivered message as an Entry; None (logged) for one that is not a commit: someone
        published junk on a stream subject, which must not stop a reader."""
        return self._entry_of(stream_seq(msg), msg.subject, msg.data or b"")

    def _entry_of(self, seq: int, subject: str, data: bytes) -> Entry | None:
        try:
            return Entry(seq, subject, upcast(self._decode(data)))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.error("commit_undecodable", subject=subject, seq=seq, error=str(exc))
            return None

    async def next_entry(self, subject: str, start: int) -> tuple[int, Entry | None] | None:
        """The first message on ``subject`` at or after sequence ``start``, one round trip: its
        sequence and its commit (None, logged, for a message that is not a commit); None if
        there is none."""
        try:
            msg = await self._next_on(subject, start)
        except nats.js.errors.NotFoundError:
            return None
        seq = int(msg.seq or 0)
        return seq, self._entry_of(seq, subject, msg.data or b"")

    # ------------------------------------------------------------------ reading

    async def stream_last_seq(self) -> int:
        info = await self.retrying(f"read stream {self.stream}", lambda js: js.stream_info(self.stream))
        return int(info.state.last_seq)

    async def entries(
        self, subject_filter: str, after_seq: int = 0, until_seq: int | None = None
    ) -> AsyncIterator[Entry]:
        """Commits on ``subject_filter`` with ``after_seq < seq <= until_seq`` (default: up to now).

        Uses an ordered consumer (no acks, recreated on a gap), the fastest way to replay.
        """
        last = await self.last_seq_of(subject_filter)
        until_seq = last if until_seq is None else min(until_seq, last)
        if until_seq <= after_seq:
            return
        for entry in await self._collect(subject_filter, after_seq, until_seq):
            yield entry

    async def follow(self, subject_filter: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        """Replay ``subject_filter`` from ``after_seq`` and keep yielding new commits live.

        Resuming with the last sequence seen gives every later commit once, in order. Once
        subscribed, a lost consumer (a server restart, a failover) is recreated from the last
        sequence delivered; LogError if the subscription cannot be made within
        ``command_timeout``. A message that is not a commit is skipped (logged).
        """
        # Delivery goes through a bounded buffer; a slow reader blocks delivery and JetStream's
        # flow control holds the rest on the server.
        send, receive = anyio.create_memory_object_stream[Msg](max_buffer_size=4096)

        async def deliver(msg: Msg) -> None:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                await send.send(msg)  # after the reader stopped, stragglers are dropped

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            with receive:
                async for msg in receive:
                    entry = self._entry(msg)
                    if entry is not None:
                        yield entry
        finally:
            await _unsubscribe(sub)
            send.close()

    async def follow_with(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[Entry], Awaitable[None]]
    ) -> None:
        """Like :meth:`follow`, but each commit is decoded and handed to ``on_entry`` (awaited,
        in order) from the delivery callback itself: no hand-off to another task per commit.
        Runs until cancelled; an error ``on_entry`` raises ends it with that error. While
        ``on_entry`` waits, delivery waits (JetStream flow control holds the rest)."""
        failed: list[BaseException] = []
        stop = anyio.Event()

        async def deliver(msg: Msg) -> None:
            if stop.is_set():
                return
            try:
                entry = self._entry(msg)
                if entry is not None:
                    await on_entry(entry)
            except Exception as exc:  # handed to the following task, not to nats-py
                failed.append(exc)
                stop.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            await stop.wait()
        finally:
            stop.set()
            await _unsubscribe(sub)
        raise failed[0]

    async def follow_now(self, subject_filter: str, after_seq: int, on_entry: Callable[[Entry], None]) -> None:
        """Like :meth:`follow_with`, for an ``on_entry`` that does not wait: each commit is
        decoded and handed on by the client's reader as it is read (see
        :meth:`blackbird._nats.Connection.deliver_ordered_directly`), with no message object,
        queue or task hop; what the reader cannot take that way comes through
        :meth:`follow_with`'s path, in the same order. ``on_entry`` runs in the reader: an
        error it raises ends the follow with that error."""
        failed: list[BaseException] = []
        stop = anyio.Event()

        def take(subject: bytes, seq: int, data: bytes) -> None:
            if stop.is_set():
                return
            try:
                entry = self._entry_of(seq, subject.decode(), data)
                if entry is not None:
                    on_entry(entry)
            except Exception as exc:  # handed to the following task, not to the reader
                failed.append(exc)
                stop.set()

        async def deliver(msg: Msg) -> None:  # nats-py's way: a commit after a new consumer, say
            try:
                seq = stream_seq(msg)
            except Exception as exc:  # not a JetStream delivery: as follow_with, the end
                failed.append(exc)
                stop.set()
                return
            take(msg.subject.encode(), seq, msg.data or b"")

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        nc = self._nc
        direct = isinstance(nc, Connection) and nc.deliver_ordered_directly(sub, take)
        try:
            await stop.wait()
        finally:
            stop.set()
            if direct:
                assert isinstance(nc, Connection)
                nc.stop_ordered_delivery(sub)
            await _unsubscribe(sub)
        raise failed[0]

    async def replay(
        self,
        subject_filter: str,
        after_seq: int,
        on_entry: Callable[[int, str, Commit], None],
        until_seq: int | None = None,
    ) -> int:
        """Call ``on_entry(seq, subject, commit)`` for every commit on ``subject_filter`` after
        ``after_seq`` (up to ``until_seq``, else up to what the stream holds when the replay
        reaches its end), inside the delivery callback: no hand-off between tasks per message,
        the fastest way to rebuild a read model. Returns the last sequence delivered (or
        ``after_seq``). Raises LogError if delivery stalls for ``command_timeout`` seconds.
        """
        last_on_filter = await self.last_seq_of(subject_filter)
        until_seq = last_on_filter if until_seq is None else min(until_seq, last_on_filter)
        if until_seq <= after_seq:
            return after_seq
        done = anyio.Event()
        last = after_seq
        failure: list[BaseException] = []
        entry_of = self._entry

        async def deliver(msg: Msg) -> None:
            nonlocal last
            if done.is_set():
                return
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq <= until_seq:
                entry = entry_of(msg)
                if entry is not None:
                    try:
                        on_entry(seq, entry.subject, entry.commit)
                    except BaseException as exc:  # handed to the replaying task, not nats-py
                        failure.append(exc)
                        done.set()
                        return
                last = seq
            if seq >= until_seq or meta.num_pending == 0:
                done.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            seen = last
            while not done.is_set():
                with anyio.move_on_after(self._timeout):
                    await done.wait()
                if not done.is_set() and last == seen:
                    raise LogError(
                        f"replay of {subject_filter} stalled at sequence {last} before {until_seq}"
                    )
                seen = last
        finally:
            await _unsubscribe(sub)
        if failure:
            raise failure[0]
        return last

    @contextlib.asynccontextmanager
    async def published(self, subject: str) -> AsyncIterator[AsyncIterator[Commit]]:
        """Commits as they are published on ``subject`` from now on, over core NATS: no consumer,
        so cheap to open per request. Best effort: one JetStream then refused (a lost append race)
        shows up too, and none published while disconnected does; read the log for certainty."""
        sub = await self._nc.subscribe(subject)

        async def commits() -> AsyncIterator[Commit]:
            async for msg in sub.messages:
                try:
                    yield upcast(self._decode(msg.data))
                except (msgspec.DecodeError, msgspec.ValidationError):
                    continue

        try:
            yield commits()
        finally:
            await _unsubscribe(sub)

    async def page(
        self, subject_filter: str, after_seq: int, *, until_seq: int | None, limit: int, max_bytes: int, wait: float
    ) -> tuple[list[tuple[int, str, bytes]], int]:
        """Up to ``limit`` raw commits (``max_bytes`` in all, at least one) on ``subject_filter``
        after ``after_seq`` (and up to ``until_seq``), and the filter's last sequence. When there is
        none yet, waits up to ``wait`` seconds for the first one (a long poll: what a client that
        may not read the stream itself follows a log with). The wait costs a core subscription, not
        a consumer: one is made only once there is something to read."""
        if limit == 0 or (until_seq is not None and until_seq <= after_seq):
            return [], await self.last_seq_of(subject_filter)
        deadline = anyio.current_time() + wait
        woken = False
        while True:
            # subscribed before the check, so a commit landing in between still wakes the wait
            wake = await self._nc.subscribe(subject_filter, max_msgs=1) if wait > 0 else None
            try:
                last = await self.last_seq_of(subject_filter)
                remaining = deadline - anyio.current_time()
                if last > after_seq or woken:
                    # a publish seen may not be stored yet (or may have been refused): give it a moment
                    within = self._timeout if last > after_seq else max(0.0, min(remaining, 1.0))
                    records = await self._records(subject_filter, after_seq, until_seq, limit, max_bytes, within)
                    if records:
                        return records, max(last, records[-1][0])
                    if last > after_seq:
                        raise LogError(f"read of {subject_filter} after sequence {after_seq} stalled")
                    remaining = deadline - anyio.current_time()
                if wake is None or remaining <= 0:
                    return [], last
                try:
                    await wake.next_msg(timeout=remaining)
                except nats.errors.TimeoutError:
                    return [], last
                woken = True
            finally:
                if wake is not None:
                    await _unsubscribe(wake)

    async def _records(
        self, subject_filter: str, after_seq: int, until_seq: int | None, limit: int, max_bytes: int, within: float
    ) -> list[tuple[int, str, bytes]]:
        """Raw commits after ``after_seq`` as :meth:`page` returns them; empty if the first does not
        come ``within`` seconds."""
        records: list[tuple[int, str, bytes]] = []
        size = 0
        done = anyio.Event()

        async def deliver(msg: Msg) -> None:
            nonlocal size
            if done.is_set():
                return
            meta = msg.metadata
            seq = meta.sequence.stream
            if until_seq is not None and seq > until_seq:
                done.set()
                return
            data = msg.data or b""
            records.append((seq, msg.subject, data))
            size += len(data)
            if len(records) >= limit or size >= max_bytes or meta.num_pending == 0 or seq == until_seq:
                done.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            with anyio.move_on_after(within):
                await done.wait()
        finally:
            done.set()
            await _unsubscribe(sub)
        return records

    async def _collect(
        self, subject_filter: str, after_seq: int, until_seq: int, *, strict: bool = False
    ) -> list[Entry]:
        """A bounded replay, decoded inside the delivery callback: no hand-off between tasks per
        message (that wake-up per message, not decoding, is what bounds a replay's speed).
        ``strict``: a message that is not a commit is an error (LogError), not skipped."""
        entries: list[Entry] = []
        done = anyio.Event()
        failure: list[LogError] = []

        async def deliver(msg: Msg) -> None:
            if done.is_set():
                return
            seq = stream_seq(msg)
            if seq <= until_seq:
                if strict:
                    try:
                        entries.append(Entry(seq, msg.subject, self._commit(msg.data, msg.subject, seq)))
                    except LogError as exc:
                        failure.append(exc)
                        done.set()
                elif (entry := self._entry(msg)) is not None:
                    entries.append(entry)
            if seq >= until_seq:
                done.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            with anyio.fail_after(self._timeout):
                await done.wait()
        except TimeoutError:
            got = entries[-1].seq if entries else after_seq
            raise LogError(
                f"replay of {subject_filter} stalled at sequence {got} before {until_seq}"
            ) from None
        finally:
            await _unsubscribe(sub)
        if failure:
            raise failure[0]
        return entries

    async def _subscribe_ordered(
        self, subject_filter: str, after_seq: int, deliver: Callable[[Msg], Awaitable[None]]
    ) -> Any:
        async def subscribe(js: JetStreamContext) -> Any:
            # a fresh config per try: nats-py fills in (and keeps) the delivery subject
            return await js.subscribe(
                subject_filter,
                stream=self.stream,
                cb=deliver,
                ordered_consumer=True,
                idle_heartbeat=_HEARTBEAT,
                config=ConsumerConfig(
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
                ),
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )

        try:
            # nats-py recreates a lost consumer with the timeout of the context it was made with:
            # a longer one than a read's, or a busy cluster could refuse it every time
            return await self.retrying(
                f"subscribe to {subject_filter}", subscribe, per_try=_CONSUMER_TRY,
                expected=(nats.js.errors.NotFoundError,),
            )
        except nats.js.errors.NotFoundError:
            raise LogError(f"subscribe to {subject_filter}: stream {self.stream} does not exist") from None

    # ------------------------------------------------------------------ SnapshotStore port

    @staticmethod
    def _kv_key(key: AggregateKey) -> str:
        # KV keys allow only [-/_=.a-zA-Z0-9]; ids may hold other characters.
        raw = f"{key.tenant}\x00{key.kind}\x00{key.id}".encode()
        return base64.urlsafe_b64encode(raw).decode()

    async def load(self, key: AggregateKey) -> bytes | None:
        kv = self._snapshots()
        name = self._kv_key(key)
        try:
            entry = await self.retrying(
                "read a snapshot", lambda js: kv(js).get(name), expected=(nats.js.errors.KeyNotFoundError,)
            )
        except nats.js.errors.KeyNotFoundError:
            return None
        value: bytes | None = entry.value
        if value and value[:1] == _LARGE_SNAPSHOT:  # the snapshot is an object; this, its name
            return await self._large_snapshot(value[1:].decode())
        return value

    async def save(self, key: AggregateKey, data: bytes) -> None:
        kv = self._snapshots()
        name = self._kv_key(key)
        if len(data) > _INLINE_SNAPSHOT:  # beyond a message's size (a memory scope of ~10k facts)
            objects = await self._snapshot_objects()
            await self.retrying(
                "write a large snapshot", lambda js: objects(js).put(name, data), per_try=self._timeout
            )
            data = _LARGE_SNAPSHOT + name.encode()
        await self.retrying("write a snapshot", lambda js: kv(js).put(name, data))

    async def _snapshot_objects(self) -> Callable[[JetStreamContext], ObjectStore]:
        if self._large is None:
            made = await self.object_store(_LARGE_SNAPSHOTS, create=True)
            assert made is not None  # created when missing
            self._large = made
        return self._large

    async def _large_snapshot(self, name: str) -> bytes | None:
        objects = await self._snapshot_objects()

        async def get(js: JetStreamContext) -> bytes:
            buffer = io.BytesIO()  # nats-py appends chunks to bytes otherwise (quadratic)
            with anyio.fail_after(self._timeout):  # its ordered consumer has no timeout
                await objects(js).get(name, writeinto=buffer)
            return buffer.getvalue()

        try:
            return await self.retrying(
                "read a large snapshot", get, per_try=self._timeout,
                expected=(nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError),
            )
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None  # a snapshot is a shortcut: the log replays without it

    async def purge_snapshots(self) -> None:
        """Delete every snapshot (they are caches; the log is the truth)."""
        kv = self._snapshots()
        long = self._timeout
        await self.retrying("purge deleted snapshots", lambda js: kv(js).purge_deletes(), per_try=long)
        try:
            keys = await self.retrying(
                "list snapshots", lambda js: kv(js).keys(), per_try=long, expected=(nats.js.errors.NoKeysError,)
            )
        except nats.js.errors.NoKeysError:
            keys = []
        for k in keys:
            await self._purge(kv, k)
        objects = await self._snapshot_objects()

        async def delete_large(js: JetStreamContext) -> None:
            for info in await objects(js).list(ignore_deletes=True):
                await objects(js).delete(info.name)

        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.retrying("purge large snapshots", delete_large, per_try=long,
                                expected=(nats.js.errors.NotFoundError,))

    async def _purge(self, kv: Bucket, key: str) -> None:
        await self.retrying("purge a snapshot", lambda js: kv(js).purge(key))

    def _snapshots(self) -> Bucket:
        if self._kv is None:
            raise LogError("this journal was opened without configure: it has no snapshot bucket")
        return self._kv


async def _pause(attempt: int, deadline: float) -> float | None:
    """Wait a little after a fast refusal (see :func:`~blackbird._retry.backoff`); the deadline
    of the next try, or None if ``deadline`` has come."""
    await anyio.sleep(min(backoff(attempt), max(0.0, deadline - time.monotonic())))
    now = time.monotonic()
    return None if now >= deadline else min(now + try_timeout(attempt + 1), deadline)


def _more(have: float | None, wanted: float | None) -> bool:
    """Whether a stream's limit ``have`` is above ``wanted`` (a negative one is unlimited)."""
    return have is not None and (have < 0 or have > (wanted or 0))


async def _unsubscribe(sub: Any) -> None:
    """Unsubscribe, whatever the connection's state (a closed connection has no subscriptions)."""
    with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
        await sub.unsubscribe()
