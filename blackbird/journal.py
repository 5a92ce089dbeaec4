"""The log: one JetStream stream of commits, plus the snapshot KV bucket.

Implements :class:`actors.ports.Journal` and :class:`actors.ports.SnapshotStore`.
An append is one message (one commit) carrying ``Nats-Expected-Last-Subject-Sequence``
(optimistic concurrency) and ``Nats-Msg-Id`` = command id (idempotency within the stream's
duplicate window; beyond it, the aggregate's own memory of recent command ids).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

import anyio
import anyio.abc
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.kv import KeyValue

from actors.events import Commit, upcast
from actors.ports import AggregateKey, AppendConflict, AppendResult, CommitUnencodable
from blackbird.config import Settings
from blackbird.errors import LogError, PayloadTooLargeError
from blackbird.subjects import Subjects

log = structlog.get_logger("blackbird.journal")

WRONG_LAST_SEQUENCE = 10071  # JetStream err_code for a failed expected-last-subject-sequence
STREAM_NAME_IN_USE = 10058  # stream exists with a different configuration


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
    single sweeper expires overdue requests instead.
    """

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._pending: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._counter = 0

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        task_status.started()
        try:
            while True:
                await anyio.sleep(0.25)
                self._expire(time.monotonic())
        finally:
            self._expire(float("inf"))
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._pending.pop(msg.subject[len(self._prefix) :], None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)

    def _expire(self, now: float) -> None:
        overdue = [token for token, (_, deadline) in self._pending.items() if deadline <= now]
        for token in overdue:
            future, _ = self._pending.pop(token)
            if not future.done():
                future.set_exception(TimeoutError())

    async def request(self, subject: str, payload: bytes, headers: dict[str, str], timeout: float) -> Msg:
        self._counter += 1
        token = str(self._counter)
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._pending[token] = (future, time.monotonic() + timeout)
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            return await future
        finally:
            self._pending.pop(token, None)


class Entry(NamedTuple):
    seq: int
    subject: str
    commit: Commit


_DIRECT_READS = 8  # commits read by direct gets before a catch-up switches to a consumer


class Journal:
    """The JetStream-backed event log. Use ``async with Journal.open(nc, settings) as journal``."""

    def __init__(self, nc: NATS, settings: Settings) -> None:
        self._nc = nc
        self._js = nc.jetstream(timeout=settings.command_timeout)
        self._settings = settings
        self.subjects = Subjects(settings.subject_prefix)
        self.stream = settings.stream
        # Reads of an aggregate's tail: on a single replica the direct-get API answers from the
        # one copy, so it is read-your-writes and much cheaper; with replicas a follower could
        # answer stale, so they go to the leader.
        self._direct = settings.replicas == 1
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder(Commit).decode
        self._decode_ack = msgspec.json.Decoder(_PubAck).decode
        self._kv: KeyValue | None = None
        self._acks = _AckInbox(nc)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, nc: NATS, settings: Settings, *, configure: bool = True
    ) -> AsyncIterator[Journal]:
        """Open the log; with ``configure`` also create/update the stream and snapshot bucket."""
        journal = cls(nc, settings)
        if configure:
            await journal._ensure_stream()
            await journal._ensure_snapshot_bucket()
        async with anyio.create_task_group() as tg:
            await tg.start(journal._acks.run)
            try:
                yield journal
            finally:
                tg.cancel_scope.cancel()

    def _stream_config(self) -> StreamConfig:
        s = self._settings
        return StreamConfig(
            name=self.stream,
            subjects=self.subjects.stream_subjects,
            storage=StorageType.FILE,
            num_replicas=s.replicas,
            duplicate_window=s.duplicate_window,
            max_msg_size=s.max_payload + 4096,
            discard=DiscardPolicy.NEW,
            allow_direct=True,
        )

    async def _ensure_stream(self) -> None:
        """Create the stream, or update it to this configuration; idempotent."""
        config = self._stream_config()
        try:
            await self._js.add_stream(config)
            log.info("stream_ready", stream=self.stream, subjects=config.subjects)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != STREAM_NAME_IN_USE:
                raise LogError(f"could not create stream {self.stream}: {exc.description}") from None
            await self._js.update_stream(config)
            log.info("stream_updated", stream=self.stream)

    async def _ensure_snapshot_bucket(self) -> None:
        bucket = self._settings.snapshot_bucket
        try:
            self._kv = await self._js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            self._kv = await self._js.create_key_value(
                bucket=bucket, history=1, replicas=self._settings.replicas
            )

    @property
    def jetstream(self) -> Any:
        """The JetStream context this journal uses (for buckets beside the stream)."""
        return self._js

    # ------------------------------------------------------------------ Journal port

    async def append(
        self, key: AggregateKey, commit: Commit, *, expected_seq: int, msg_id: str
    ) -> AppendResult:
        try:
            payload = self._encode(commit)
        except Exception as exc:  # a lone surrogate, a type JSON has no form for: the commands' fault
            raise CommitUnencodable(f"{type(exc).__name__}: {exc}") from exc
        if len(payload) > self._settings.max_payload:
            raise PayloadTooLargeError(
                f"command: encoded commit is {len(payload)} bytes, expected at most "
                f"{self._settings.max_payload} (max_payload)",
                field="command",
                expected=f"at most {self._settings.max_payload} bytes",
                got=len(payload),
            )
        headers = {
            "Nats-Expected-Last-Subject-Sequence": str(expected_seq),
            "Nats-Msg-Id": msg_id,
        }
        subject = self.subjects.aggregate(key)
        try:
            msg = await self._acks.request(subject, payload, headers, self._settings.command_timeout)
        except TimeoutError:
            raise LogError(
                f"append to {subject}: no acknowledgement within {self._settings.command_timeout}s"
            ) from None
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            raise LogError(f"append to {subject}: no stream {self.stream} captures it")
        ack = self._decode_ack(msg.data)
        if ack.error is not None:
            if ack.error.err_code == WRONG_LAST_SEQUENCE:
                raise AppendConflict(ack.error.description)
            raise LogError(f"append to {subject} failed: {ack.error.description}")
        return AppendResult(ack.seq, ack.duplicate)

    async def last_seq(self, key: AggregateKey) -> int:
        return await self.last_seq_of(self.subjects.aggregate(key), direct=self._direct)

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int:
        """Sequence of the last message on ``subject`` (wildcards allowed; 0 if none)."""
        try:
            msg = await self._js.get_last_msg(self.stream, subject, direct=direct)
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
            msg = await self._js.get_msg(
                self.stream, seq=after_seq + 1, subject=subject, next=True, direct=self._direct
            )
            seq = int(msg.seq or 0)
            if not after_seq < seq <= until_seq:
                break
            out.append((seq, upcast(self._decode(msg.data or b""))))
            after_seq = seq
        if after_seq < until_seq:
            out += [(e.seq, e.commit) for e in await self._collect(subject, after_seq, until_seq)]
        return out

    # ------------------------------------------------------------------ reading

    async def stream_last_seq(self) -> int:
        info = await self._js.stream_info(self.stream)
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

        Resuming with the last sequence seen gives every later commit once, in order.
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
                    seq = msg.metadata.sequence.stream
                    yield Entry(seq, msg.subject, upcast(self._decode(msg.data)))
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
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
                seq = msg.metadata.sequence.stream
                await on_entry(Entry(seq, msg.subject, upcast(self._decode(msg.data))))
            except Exception as exc:  # handed to the following task, not to nats-py
                failed.append(exc)
                stop.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            await stop.wait()
        finally:
            stop.set()
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
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
        decode = self._decode

        async def deliver(msg: Msg) -> None:
            nonlocal last
            if done.is_set():
                return
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq <= until_seq:
                try:
                    on_entry(seq, msg.subject, upcast(decode(msg.data)))
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
                with anyio.move_on_after(self._settings.command_timeout):
                    await done.wait()
                if not done.is_set() and last == seen:
                    raise LogError(
                        f"replay of {subject_filter} stalled at sequence {last} before {until_seq}"
                    )
                seen = last
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        if failure:
            raise failure[0]
        return last

    async def _collect(self, subject_filter: str, after_seq: int, until_seq: int) -> list[Entry]:
        """A bounded replay, decoded inside the delivery callback: no hand-off between tasks per
        message (that wake-up per message, not decoding, is what bounds a replay's speed)."""
        entries: list[Entry] = []
        done = anyio.Event()

        async def deliver(msg: Msg) -> None:
            if done.is_set():
                return
            seq = msg.metadata.sequence.stream
            if seq <= until_seq:
                entries.append(Entry(seq, msg.subject, upcast(self._decode(msg.data))))
            if seq >= until_seq:
                done.set()

        sub = await self._subscribe_ordered(subject_filter, after_seq, deliver)
        try:
            with anyio.fail_after(self._settings.command_timeout):
                await done.wait()
        except TimeoutError:
            got = entries[-1].seq if entries else after_seq
            raise LogError(
                f"replay of {subject_filter} stalled at sequence {got} before {until_seq}"
            ) from None
        finally:
            with anyio.CancelScope(shield=True):
                await sub.unsubscribe()
        return entries

    async def _subscribe_ordered(
        self, subject_filter: str, after_seq: int, deliver: Callable[[Msg], Awaitable[None]]
    ) -> Any:
        return await self._js.subscribe(
            subject_filter,
            stream=self.stream,
            cb=deliver,
            ordered_consumer=True,
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after_seq + 1
            ),
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )

    # ------------------------------------------------------------------ SnapshotStore port

    @staticmethod
    def _kv_key(key: AggregateKey) -> str:
        # KV keys allow only [-/_=.a-zA-Z0-9]; ids may hold other characters.
        raw = f"{key.tenant}\x00{key.kind}\x00{key.id}".encode()
        return base64.urlsafe_b64encode(raw).decode()

    async def load(self, key: AggregateKey) -> bytes | None:
        assert self._kv is not None
        try:
            entry = await self._kv.get(self._kv_key(key))
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value

    async def save(self, key: AggregateKey, data: bytes) -> None:
        assert self._kv is not None
        await self._kv.put(self._kv_key(key), data)

    async def purge_snapshots(self) -> None:
        """Delete every snapshot (they are caches; the log is the truth)."""
        assert self._kv is not None
        await self._kv.purge_deletes()
        for k in await self._safe_keys():
            await self._kv.purge(k)

    async def _safe_keys(self) -> list[str]:
        assert self._kv is not None
        try:
            return await self._kv.keys()
        except nats.js.errors.NoKeysError:
            return []
