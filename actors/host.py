"""The actor host: one mailbox per aggregate, one command at a time, persist then reply.

* Activation: an actor is loaded on its first message from its latest snapshot (if any) and
  the commits after it.
* Each command: ``decide`` on the current state; if it produced events they are appended with
  ``expected_seq`` = the last sequence this actor applied (optimistic concurrency) and
  ``msg_id`` = the command id (idempotency); only after JetStream acknowledged the append is
  the state evolved and the caller answered.
* Group commit: many actors' appends are in flight at once (each actor drains its mailbox in
  its own task), so throughput comes from pipelining, not from skipping durability.
* A conflict (another host wrote first) reloads the tail and re-decides: at least
  ``max_retries`` times, and on for ``retry_for`` seconds, so a host is not starved by a peer
  that keeps writing the same aggregate (it wins once the peer pauses).
* Idle actors are passivated; every ``snapshot_every`` commits a snapshot is written.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup

from actors.events import Applied, Commit, Event, Rejection
from actors.ports import AggregateKey, AppendConflict, CommitTooLarge, Journal, SnapshotStore

S = TypeVar("S")

log = structlog.get_logger("blackbird.actors")


class Behaviour(Protocol[S]):
    """The pure logic of one aggregate kind."""

    @property
    def state_type(self) -> type[S]: ...

    def initial_state(self, key: AggregateKey) -> S: ...

    def decide(self, state: S, command: Any, now: float) -> Any: ...  # -> Decision

    def apply_commit(self, state: S, commit: Commit) -> S: ...

    def apply_commands(self, state: S, applied: tuple[Applied, ...]) -> S: ...

    def has_seen(self, state: S, command_id: str) -> bool: ...

    def refusal(self, state: S, command_id: str) -> Rejection | None: ...

    def version(self, state: S) -> int: ...


class Outcome(msgspec.Struct, gc=False):
    """The host's answer to one command: the state after it and, if refused, why."""

    state: Any  # the aggregate's state; a host serves one behaviour, of any state type
    sequence: int
    rejection: Rejection | None = None
    duplicate: bool = False
    events: tuple[Event, ...] = ()  # what this command caused (none for a duplicate)


def _msg_id(commit: Commit) -> str:
    """JetStream's dedup id for a commit: its command id, or a digest of a batch's ids."""
    if len(commit.commands) == 1:
        return commit.commands[0].command_id
    return hashlib.sha256("\x00".join(commit.command_ids).encode()).hexdigest()


class ConflictRetriesExhausted(Exception):
    def __init__(self, key: AggregateKey, attempts: int) -> None:
        super().__init__(f"{key.kind} {key.id!r}: lost the append race {attempts} times")
        self.key = key
        self.attempts = attempts


class _Snapshot(msgspec.Struct, Generic[S]):
    seq: int
    state: S


class _Request:
    __slots__ = ("command", "command_id", "done", "error", "outcome", "principal")

    def __init__(self, command: Any, command_id: str, principal: str) -> None:
        self.command = command
        self.command_id = command_id
        self.principal = principal
        self.done: anyio.Event | None = None  # only for requests that wait in a mailbox
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None


class _Actor:
    __slots__ = ("busy", "key", "last_used", "log", "mailbox", "seq", "since_snapshot", "state")

    def __init__(self, key: AggregateKey) -> None:
        self.key = key
        self.state: Any = None
        self.seq = 0
        self.mailbox: deque[_Request] = deque()
        self.busy = False
        self.last_used = 0.0
        self.since_snapshot = 0
        self.log = log.bind(tenant=key.tenant, kind=key.kind, id=key.id)


class ActorHost:
    """Hosts actors of one behaviour. Use as ``async with ActorHost(...) as host``."""

    def __init__(
        self,
        behaviour: Behaviour[Any],
        journal: Journal,
        snapshots: SnapshotStore,
        *,
        snapshot_every: int = 500,
        passivate_after: float = 300.0,
        max_retries: int = 8,
        retry_for: float = 5.0,
        max_batch: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._behaviour = behaviour
        self._journal = journal
        self._snapshots = snapshots
        self._snapshot_every = snapshot_every
        self._passivate_after = passivate_after
        self._max_retries = max_retries
        self._retry_for = retry_for
        self._max_batch = max_batch
        self._clock = clock
        self._actors: dict[AggregateKey, _Actor] = {}
        self._tg: TaskGroup | None = None
        self._snapshot_codec = msgspec.msgpack.Encoder()
        # a type chosen at run time: mypy reads a subscript as a static type, and cannot here
        self._snapshot_decoder = msgspec.msgpack.Decoder(_Snapshot[behaviour.state_type])  # type: ignore[name-defined]

    async def __aenter__(self) -> Self:
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._passivation_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        return await self._tg.__aexit__(exc_type, exc, tb)

    @property
    def active_actors(self) -> int:
        return len(self._actors)

    async def ask(self, key: AggregateKey, command: Any, command_id: str, principal: str) -> Outcome:
        """Run ``command`` on the actor for ``key`` and return its outcome once it is durable.

        Commands to one actor run one at a time in arrival order; commands to different actors
        run concurrently. Raises :class:`ConflictRetriesExhausted` if other writers keep winning.
        """
        if self._tg is None:
            raise RuntimeError("ActorHost is not running; use it as an async context manager")
        actor = self._actors.get(key)
        if actor is None:
            actor = self._actors[key] = _Actor(key)
        actor.last_used = time.monotonic()
        request = _Request(command, command_id, principal)
        if actor.busy:
            request.done = anyio.Event()
            actor.mailbox.append(request)
            await request.done.wait()
        else:
            # The actor is idle: run the command in the caller's task (no task spawn, no event).
            actor.busy = True
            try:
                await self._run(actor, [request])
            except BaseException:
                # The caller was cancelled mid-command: its append may or may not have landed.
                # Forget the state, so the next command reloads it from the log. (A stale
                # decision could not be appended anyway: its expected sequence would conflict.)
                actor.state = None
                raise
            finally:
                if actor.mailbox:
                    self._tg.start_soon(self._drain, actor)
                else:
                    actor.busy = False
        if request.error is not None:
            raise request.error
        assert request.outcome is not None
        return request.outcome

    async def _drain(self, actor: _Actor) -> None:
        try:
            while actor.mailbox:
                # Everything that queued up while the previous append was in flight goes into
                # one commit: one round trip for the lot, each still answered individually.
                batch = [actor.mailbox.popleft() for _ in range(min(len(actor.mailbox), self._max_batch))]
                try:
                    await self._run(actor, batch)
                finally:
                    for request in batch:
                        assert request.done is not None
                        request.done.set()
        finally:
            actor.busy = False
            actor.last_used = time.monotonic()

    async def _run(self, actor: _Actor, batch: list[_Request]) -> None:
        try:
            await self._handle(actor, batch)
        except CommitTooLarge as exc:
            if len(batch) == 1:  # one command alone is too large: its caller gets the error
                batch[0].error = exc
                return
            # The commands that queued up do not fit in one message together: halve the batch.
            # Nothing was appended (the append failed whole), so each half decides afresh.
            half = len(batch) // 2
            await self._run(actor, batch[:half])
            await self._run(actor, batch[half:])
            return
        except Exception as exc:  # the callers get it; the actor reloads from the log next time
            actor.state = None
            for request in batch:
                request.error = exc
        if actor.since_snapshot >= self._snapshot_every and actor.state is not None:
            actor.since_snapshot = 0
            assert self._tg is not None  # set on entry, before any command could run
            self._tg.start_soon(self._save_snapshot, actor, actor.seq, actor.state)

    async def _handle(self, actor: _Actor, batch: list[_Request]) -> None:
        """Decide every request of ``batch`` in order, append their events as one commit, and
        only then set each request's outcome."""
        b = self._behaviour
        fresh = actor.state is None
        if fresh:
            await self._activate(actor)
        started = time.monotonic()
        attempt = -1
        while (attempt := attempt + 1) < self._max_retries or time.monotonic() - started < self._retry_for:
            now = self._clock()
            state = actor.state
            applied: list[Applied] = []
            # per request: state after it, why it was refused, duplicate, its events
            answers: list[tuple[Any, Rejection | None, bool, tuple[Event, ...]]] = []
            for request in batch:
                if b.has_seen(state, request.command_id):  # a retry: the first answer again
                    answers.append((state, b.refusal(state, request.command_id), True, ()))
                    continue
                decision = b.decide(state, request.command, now)
                if decision.events:
                    record = Applied(
                        request.command_id, request.principal, decision.events, decision.rejection
                    )
                    state = b.apply_commands(state, (record,))
                    applied.append(record)
                answers.append((state, decision.rejection, False, decision.events))
            if not applied:
                # Queries and refusals append nothing, so no conflict would tell us that another
                # host wrote since we last looked: check (read-your-writes) and, if the aggregate
                # moved, decide again on the fresh state.
                if not fresh and await self._catch_up(actor):
                    fresh = True
                    continue
                for request, (after, rejection, duplicate, events) in zip(batch, answers, strict=True):
                    request.outcome = Outcome(after, actor.seq, rejection, duplicate, events)
                return
            # A write needs no such check: it carries the sequence it was decided on, and a
            # stale decision comes back as a conflict.
            commit = Commit(at=now, version=b.version(actor.state) + 1, commands=tuple(applied))
            try:
                result = await self._journal.append(
                    actor.key, commit, expected_seq=actor.seq, msg_id=_msg_id(commit)
                )
            except AppendConflict:
                actor.log.debug("append_conflicted", expected_seq=actor.seq, attempt=attempt)
                # Back off a random, growing moment so two hosts racing on one actor do not
                # collide in lockstep, then reload what the winner wrote and decide again.
                await anyio.sleep(random.uniform(0, min(0.001 * 2**attempt, 0.1)))
                await self._catch_up(actor)
                fresh = True
                continue
            if result.duplicate:  # this very commit was stored before: adopt it, decide again
                await self._catch_up(actor)
                fresh = True
                continue
            final = msgspec.structs.replace(state, version=commit.version)
            actor.state, actor.seq = final, result.seq
            actor.since_snapshot += 1
            for request, (after, rejection, duplicate, events) in zip(batch, answers, strict=True):
                if after is state:
                    after = final
                elif after is not actor.state:
                    after = msgspec.structs.replace(after, version=commit.version)
                request.outcome = Outcome(after, result.seq, rejection, duplicate, events)
            return
        raise ConflictRetriesExhausted(actor.key, attempt)

    async def _activate(self, actor: _Actor) -> None:
        started = time.perf_counter()
        state = self._behaviour.initial_state(actor.key)
        seq = 0
        raw = await self._snapshots.load(actor.key)
        if raw is not None:
            try:
                snapshot = self._snapshot_decoder.decode(raw)
                state, seq = snapshot.state, snapshot.seq
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                # a snapshot is only a shortcut (say, written by a version whose state had
                # another shape): the log alone gives the same state
                actor.log.warning("snapshot_unreadable", error=str(exc))
        actor.state, actor.seq = state, seq
        replayed = await self._catch_up(actor)
        actor.since_snapshot = replayed
        actor.log.debug(
            "actor_activated",
            snapshot_seq=seq,
            replayed=replayed,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )

    async def _catch_up(self, actor: _Actor) -> int:
        last = await self._journal.last_seq(actor.key)
        if last <= actor.seq:
            return 0
        commits = await self._journal.read(actor.key, actor.seq, last)
        state = actor.state
        for seq, commit in commits:
            state = self._behaviour.apply_commit(state, commit)
            actor.seq = seq
        actor.state = state
        return len(commits)

    async def _save_snapshot(self, actor: _Actor, seq: int, state: Any) -> None:
        data = self._snapshot_codec.encode(_Snapshot(seq=seq, state=state))
        try:
            await self._snapshots.save(actor.key, data)
        except Exception as exc:  # a missed snapshot only slows the next activation
            actor.log.warning("snapshot_failed", seq=seq, error=str(exc))

    async def snapshot_all(self) -> None:
        """Snapshot every active actor that has commits since its last snapshot."""
        for actor in list(self._actors.values()):
            if actor.state is not None and actor.since_snapshot:
                actor.since_snapshot = 0
                await self._save_snapshot(actor, actor.seq, actor.state)

    def passivate_idle(self, idle_for: float) -> int:
        """Drop actors idle for ``idle_for`` seconds; they reactivate from the log on demand."""
        cutoff = time.monotonic() - idle_for
        idle = [k for k, a in self._actors.items() if not a.busy and a.last_used <= cutoff]
        for key in idle:
            del self._actors[key]
        return len(idle)

    async def _passivation_loop(self) -> None:
        if not math.isfinite(self._passivate_after):
            return
        while True:
            await anyio.sleep(max(self._passivate_after / 4, 0.05))
            dropped = self.passivate_idle(self._passivate_after)
            if dropped:
                log.debug("actors_passivated", count=dropped, active=len(self._actors))
