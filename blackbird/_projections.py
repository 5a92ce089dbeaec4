"""Projections at the edge: durable checkpoints in NATS and the runners a client owns.

The session manager's read-model queries are answered from these runners.

Checkpoints: a KV bucket holds, per projection, ``{seq, object}`` and is updated with
compare-and-swap on its revision; the model itself (which can be megabytes) is an object in a
JetStream object store, written before the KV entry points at it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.abc
import msgspec
import nats.js.errors
import structlog
from nats.js import JetStreamContext
from nats.js.object_store import ObjectStore

from actors.events import PostMessage
from blackbird._retry import Bucket, keep_running
from blackbird.errors import ProjectionTimeoutError
from blackbird.journal import Journal
from blackbird.streams.feeds import SharedLog
from projections.abuse import Alert
from projections.runner import Checkpoint, Projection, ProjectionRunner, ProjectionTimeout

log = structlog.get_logger("blackbird.projections")

CHECKPOINT_BUCKET = "bb_projections"
SNAPSHOT_STORE = "bb_projection_models"


class _Pointer(msgspec.Struct):
    seq: int
    object: str


class NatsCheckpoints:
    """Checkpoints in a KV bucket (compare-and-swap) pointing at objects in an object store.

    Every operation is retried through NATS failovers for the journal's ``command_timeout``
    and then raises LogError (never a raw nats-py error)."""

    def __init__(
        self, journal: Journal, kv: Bucket, objects: Callable[[JetStreamContext], ObjectStore]
    ) -> None:
        self._journal = journal
        self._kv = kv
        self._objects = objects

    @classmethod
    async def open(cls, journal: Journal, replicas: int | None = None, *, create: bool) -> NatsCheckpoints | None:
        """Bind to the checkpoint bucket and object store, created with ``replicas`` replicas
        (default: the journal's setting) when missing and ``create``; None if missing and not
        ``create``. Existing ones are used as they are."""
        kv = await journal.bucket(CHECKPOINT_BUCKET, create=create, replicas=replicas)
        objects = await journal.object_store(SNAPSHOT_STORE, create=create, replicas=replicas)
        if kv is None or objects is None:
            return None
        return cls(journal, kv, objects)

    async def _entry(self, name: str) -> Any | None:
        """The KV entry of ``name`` (None if there is none)."""
        kv = self._kv
        try:
            return await self._journal.retrying(
                f"read checkpoint {name}", lambda js: kv(js).get(name), expected=(nats.js.errors.KeyNotFoundError,)
            )
        except nats.js.errors.KeyNotFoundError:
            return None

    async def peek(self, name: str) -> tuple[int, Any] | None:
        entry = await self._entry(name)
        if entry is None or not entry.value:
            return None
        return msgspec.json.decode(entry.value, type=_Pointer).seq, entry.revision

    async def load(self, name: str) -> Checkpoint | None:
        # Another worker may replace the checkpoint (and delete the object read here) while we
        # read it: then read the newer pointer again.
        for _ in range(5):
            entry = await self._entry(name)
            if entry is None or not entry.value:
                return None
            pointer = msgspec.json.decode(entry.value, type=_Pointer)
            data = await self._object(pointer.object)
            if data is not None:
                return Checkpoint(pointer.seq, data, entry.revision)
        return None

    async def _object(self, obj: str) -> bytes | None:
        objects = self._objects

        async def get(js: JetStreamContext) -> bytes:
            buffer = io.BytesIO()  # nats-py appends chunks to bytes otherwise (quadratic)
            with anyio.fail_after(self._journal.timeout):  # its ordered consumer has no timeout
                await objects(js).get(obj, writeinto=buffer)
            return buffer.getvalue()

        try:
            return await self._journal.retrying(
                f"read checkpoint object {obj}", get, per_try=self._journal.timeout,
                expected=(nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError),
            )
        except (nats.js.errors.ObjectNotFoundError, nats.js.errors.ObjectDeletedError):
            return None

    async def save(self, name: str, seq: int, data: bytes, token: Any) -> Any | None:
        obj = f"{name}-{seq}-{os.urandom(6).hex()}"  # two workers never write one object
        objects, kv, journal = self._objects, self._kv, self._journal
        await journal.retrying(f"write checkpoint object {obj}", lambda js: objects(js).put(obj, data), per_try=2.0)
        pointer = msgspec.json.encode(_Pointer(seq=seq, object=obj))
        lost = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError,
                nats.js.errors.BadRequestError)
        previous = None
        try:
            if token is None:
                revision = await journal.retrying(
                    f"create checkpoint {name}", lambda js: kv(js).create(name, pointer), expected=lost
                )
            else:
                old = await self._entry(name)
                previous = msgspec.json.decode(old.value, type=_Pointer).object if old and old.value else None
                revision = await journal.retrying(
                    f"update checkpoint {name}", lambda js: kv(js).update(name, pointer, last=token), expected=lost
                )
        except lost:
            # Another worker checkpointed since we last looked (ours is not needed) - unless the
            # pointer stored is ours: a try whose answer was lost in a failover did land.
            current = await self._entry(name)
            if current is not None and current.value and (
                msgspec.json.decode(current.value, type=_Pointer).object == obj
            ):
                revision = current.revision
            else:
                await self._delete(obj)
                return None
        if previous is not None and previous != obj:
            await self._delete(previous)
        return revision

    async def _delete(self, obj: str) -> None:
        """Delete an object no checkpoint points at; a failure only leaves it behind (logged)."""
        objects = self._objects
        try:
            await self._journal.retrying(f"delete checkpoint object {obj}", lambda js: objects(js).delete(obj))
        except Exception as exc:
            log.info("checkpoint_object_left", object=obj, error=repr(exc))


class MemoryCheckpoints:
    """Checkpoints that last as long as the process (a client that may not create buckets)."""

    def __init__(self) -> None:
        self._stored: dict[str, Checkpoint] = {}

    async def load(self, name: str) -> Checkpoint | None:
        return self._stored.get(name)

    async def peek(self, name: str) -> tuple[int, Any] | None:
        stored = self._stored.get(name)
        return None if stored is None else (stored.seq, stored.token)

    async def save(self, name: str, seq: int, data: bytes, token: Any) -> Any | None:
        current = self._stored.get(name)
        if (current.token if current else None) != token:
            return None
        self._stored[name] = Checkpoint(seq, data, (token or 0) + 1)
        return (token or 0) + 1


class Projections:
    """The runners one client owns; started on first use (or eagerly), stopped with the client."""

    def __init__(
        self, journal: Journal | SharedLog, checkpoints: Any, tg: anyio.abc.TaskGroup, timeout: float
    ) -> None:
        self._journal = journal
        self._checkpoints = checkpoints
        self._tg = tg
        self._timeout = timeout
        self._runners: dict[str, ProjectionRunner[Any]] = {}
        self._starting: dict[str, anyio.Event] = {}
        self._specs: dict[str, tuple[Projection[Any], Callable[[list[Any]], Awaitable[None]] | None]] = {}

    def register(
        self, projection: Projection[Any], on_effects: Callable[[list[Any]], Awaitable[None]] | None = None
    ) -> None:
        self._specs[projection.name] = (projection, on_effects)

    def _filter(self, projection: Projection[Any]) -> str:
        """The subjects a projection folds: ``<prefix>.<its subjects>`` (default every one)."""
        return f"{self._journal.subjects.prefix}.{getattr(projection, 'subjects', '>')}"

    @property
    def names(self) -> list[str]:
        return sorted(self._specs)

    async def runner(self, name: str) -> ProjectionRunner[Any]:
        """The running runner for ``name``, started (and caught up) on first use."""
        running = self._runners.get(name)
        if running is not None:
            return running
        starting = self._starting.get(name)
        if starting is not None:  # another task is starting it
            await starting.wait()
            return self._runners[name]
        self._starting[name] = event = anyio.Event()
        try:
            projection, on_effects = self._specs[name]
            runner = ProjectionRunner(
                projection, self._journal, self._checkpoints, self._filter(projection), on_effects=on_effects,
            )
            await self._tg.start(keep_running, f"projection {name}", runner.run)
            self._runners[name] = runner
        finally:
            del self._starting[name]
            event.set()
        return runner

    async def caught_up(self, name: str, seq: int) -> ProjectionRunner[Any]:
        """The runner once it has applied ``seq`` (read-your-writes); ProjectionTimeoutError
        if it does not within the client's timeout."""
        runner = await self.runner(name)
        try:
            await runner.wait_for(seq, self._timeout)
        except ProjectionTimeout as exc:
            raise ProjectionTimeoutError(
                f"{exc}; the read model is behind the log (lag), try again",
                projection=name, wanted=exc.wanted, applied=exc.applied,
            ) from None
        return runner

    async def lag(self) -> dict[str, int]:
        return {name: await runner.lag() for name, runner in sorted(self._runners.items())}

    async def verify(self) -> dict[str, list[str]]:
        """Rebuild every projection from zero into scratch models (up to what the live ones
        have applied) and compare: ``{name: [difference, ...]}``, empty lists when identical."""
        report: dict[str, list[str]] = {}
        for name in self.names:
            projection, _ = self._specs[name]
            runner = await self.caught_up(name, await self._journal.last_seq_of(self._filter(projection)))
            seq = runner.seq
            scratch = await runner.scratch(seq)
            live = msgspec.to_builtins(runner.model)
            rebuilt = msgspec.to_builtins(scratch)
            report[name] = list(_differences(live, rebuilt, name))
            log.info("projection_verified", projection=name, seq=seq, differences=len(report[name]))
        return report

    async def rebuild(self, name: str) -> int:
        runner = await self.runner(name)
        return await runner.rebuild()


def alert_raiser(
    user_commands: Callable[..., Awaitable[Any]], dispatcher: Any
) -> Callable[[list[Alert]], Awaitable[None]]:
    """The abuse projection's effect: each alert becomes an AlertRaised event on the user's
    aggregate and, for a session, a message on its "notification" channel. Command ids are
    derived from the alert, so workers raising the same alert append it once."""

    async def raise_alerts(alerts: list[Alert]) -> None:
        for alert in alerts:
            await user_commands(alert.tenant, alert.user_id, alert.command(), alert.command_id)
            log.warning("alert_raised", tenant=alert.tenant, user_id=alert.user_id,
                        session_id=alert.session_id, kind=alert.kind, detail=alert.detail)
            if alert.session_id is None:
                continue
            note = PostMessage(
                channel="notification", text=alert.detail,
                metadata={"alert": alert.kind, "value": alert.value, "threshold": alert.threshold,
                          "trigger_seq": alert.trigger_seq},
            )
            reply = await dispatcher.dispatch(
                alert.tenant, alert.session_id, note, f"{alert.command_id}:notify", "abuse-detector"
            )
            if reply.rejection is not None:  # e.g. the session has ended: the alert stands
                log.info("alert_not_posted", session_id=alert.session_id, why=reply.rejection.code)

    return raise_alerts


def _differences(live: Any, rebuilt: Any, path: str, limit: int = 20) -> list[str]:
    found: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if len(found) >= limit:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if key not in a or key not in b:
                    found.append(f"{where}.{key}: only in {'live' if key in a else 'rebuilt'}")
                else:
                    walk(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{where}[{i}]")
        elif a != b:
            found.append(f"{where}: live {str(a)[:80]!r} != rebuilt {str(b)[:80]!r}")

    walk(live, rebuilt, path)
    return found

