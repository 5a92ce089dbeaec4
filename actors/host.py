"""The actor host: one mailbox per aggregate, one command at a time, persist then reply.

* Activation: an actor is loaded on its first message from its latest snapshot (if any) and
  the commits after it.
* Each command: ``decide`` on the current state; if it produced events they are appended with
  ``expected_seq`` = the last sequence this actor applied (optimistic concurrency) and
  ``msg_id`` = a digest of the aggregate (tenant, kind, id) and the commands' ids and digests
  (JetStream deduplicates stream-wide: a bare command id would make tenant B's command a
  "duplicate" of tenant A's); only after JetStream acknowledged the append is the state evolved
  and the caller answered.
* Idempotency: a command id the aggregate remembers is answered as before if it comes with the
  same command (a retry) and refused with code ``command_id_reused`` if it comes with another
  (see :mod:`actors.idempotency`).
* Supervision: an unexpected exception while deciding, applying, encoding or replaying one
  aggregate's commands fails only the command at fault, answered with code ``aggregate_fault``
  and logged once with the aggregate and the stage; the other commands of its batch are
  decided without it, and the host, its other actors and this actor's next commands go on. A
  snapshot that cannot be encoded or saved is skipped (it is only a shortcut).
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
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar

import anyio
import msgspec
import structlog
from anyio.abc import TaskGroup

from actors import idempotency
from actors.events import Applied, Commit, Event, Rejection
from actors.idempotency import Seen
from actors.ports import (
    AggregateKey,
    AppendConflict,
    CommitTooLarge,
    CommitUnencodable,
    Journal,
    SnapshotStore,
)

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

    def has_seen(self, state: S, command_id: str, digest: str) -> Seen: ...

    def refusal(self, state: S, command_id: str) -> Rejection | None: ...

    def version(self, state: S) -> int: ...


class Outcome(msgspec.Struct, gc=False):
    """The host's answer to one command: the state after it and, if refused, why."""

    state: Any  # the aggregate's state; a host serves one behaviour, of any state type
    sequence: int
    rejection: Rejection | None = None
    duplicate: bool = False
    events: tuple[Event, ...] = ()  # what this command caused (none for a duplicate)


_scope_codec = msgspec.json.Encoder()


def _msg_id(key: AggregateKey, commit: Commit) -> str:
    """JetStream's dedup id for a commit: a digest of its aggregate and its commands' ids and
    digests. JetStream deduplicates stream-wide, so the id is scoped to the aggregate: another
    tenant's (or aggregate's) command under the same command id is not a duplicate of this one."""
    scope = (key.tenant, key.kind, key.id, [(c.command_id, c.digest) for c in commit.commands])
    return hashlib.blake2b(_scope_codec.encode(scope), digest_size=16).hexdigest()


def _describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 300 else text[:297] + "..."


def _where(error: BaseException) -> str:
    """Where ``error`` was raised (file:line of the innermost frame), for the log line."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return ""
    return f"{tb.tb_frame.f_code.co_filename.rpartition('/')[2]}:{tb.tb_lineno}"


def _aggregate(key: AggregateKey) -> str:
    return f"{key.tenant}/{key.kind}/{key.id}"


_STAGES = {
    "decide": "deciding it",
    "apply": "applying its events",
    "encode": "encoding it",
    "replay": "rebuilding the aggregate's state from its snapshot and log",
}


class AggregateFault(Exception):
    """An unexpected exception in one aggregate's logic or encoding, at ``stage`` ("decide",
    "apply", "encode" or "replay"). The host answers the command with :meth:`rejection`
    (code ``aggregate_fault``) instead of letting it escape."""

    def __init__(self, key: AggregateKey, stage: str, error: BaseException) -> None:
        self.key = key
        self.stage = stage
        self.error = error
        super().__init__(f"{key.kind} {key.id!r} of tenant {key.tenant!r}: {stage}: {_describe(error)}")

    def rejection(self) -> Rejection:
        key = self.key
        if self.stage == "replay":
            goes_on = f"this {key.kind} cannot be loaded until that is fixed; others are served"
        else:
            goes_on = f"this {key.kind} serves other commands"
        return Rejection(
            "aggregate_fault",
            f"{key.kind} {key.id!r} (tenant {key.tenant!r}): the command failed while "
            f"{_STAGES.get(self.stage, self.stage)} ({_describe(self.error)}); nothing of it was "
            f"appended and {goes_on}; a fault in Blackbird or in the command's data: report it "
            "with the 'aggregate_fault' log line",
            {"aggregate": _aggregate(key), "stage": self.stage, "error": _describe(self.error)},
        )


# per request of a batch: state after it, why it was refused, duplicate, its events, its fault
_Answer = tuple[Any, Rejection | None, bool, tuple[Event, ...], AggregateFault | None]


def _reused(key: AggregateKey, command_id: str) -> Rejection:
    return Rejection(
        "command_id_reused",
        f"command id {command_id!r} was already used by {key.kind} {key.id!r} (tenant "
        f"{key.tenant!r}) for a different command; a retry must resend the same command, a new "
        "command needs a new id",
        {"command_id": command_id, "aggregate": _aggregate(key)},
    )


class ConflictRetriesExhausted(Exception):
    def __init__(self, key: AggregateKey, attempts: int) -> None:
        super().__init__(f"{key.kind} {key.id!r}: lost the append race {attempts} times")
        self.key = key
        self.attempts = attempts


class QueueTimeout(Exception):
    """A command waited in its actor's mailbox past its deadline: it was never decided, nothing
    of it was appended (the command before it held the actor that long)."""

    def __init__(self, key: AggregateKey, command_id: str, waited: float) -> None:
        super().__init__(
            f"{key.kind} {key.id!r}: command {command_id!r} waited {waited:.1f}s behind the "
            "aggregate's earlier commands and was not run; nothing was applied"
        )
        self.key = key
        self.command_id = command_id


class _Snapshot(msgspec.Struct, Generic[S]):
    seq: int
    state: S


class _Request:
    __slots__ = ("command", "command_id", "deadline", "digest", "done", "error", "fault", "outcome", "principal")

    def __init__(self, command: Any, command_id: str, principal: str, deadline: float) -> None:
        self.command = command
        self.command_id = command_id
        self.principal = principal
        self.deadline = deadline  # time.monotonic() by which the caller must be answered
        self.digest: str | None = None  # of the command, taken once (idempotency.digest)
        self.fault: AggregateFault | None = None  # a fault of the command itself (its digest)
        self.done: anyio.Event | None = None  # only for requests that wait in a mailbox
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None


class _Mailbox(list[_Request]):
    """An actor's queue of waiting requests: a list (56 bytes empty) rather than a deque (about
    620 bytes: it allocates a block of 64 slots up front), since every active actor has one and
    almost all of them stay empty; a batch is taken from the front in one slice."""

    __slots__ = ()


class _Actor:
    """One active aggregate. Kept small (an active host holds one per session it serves): the
    state, its sequence and the bookkeeping of the mailbox, passivation and snapshots; the
    logger bound to the aggregate is made when something is logged (:attr:`log`)."""

    __slots__ = ("busy", "key", "last_used", "mailbox", "seq", "since_snapshot", "state")

    def __init__(self, key: AggregateKey) -> None:
        self.key = key
        self.state: Any = None
        self.seq = 0
        self.mailbox = _Mailbox()
        self.busy = False
        self.last_used = 0.0
        self.since_snapshot = 0

    @property
    def log(self) -> Any:
        """The host's logger bound to this aggregate (made on use: logging is the rare path)."""
        key = self.key
        return log.bind(tenant=key.tenant, kind=key.kind, id=key.id)


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
        timeout: float = math.inf,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._behaviour = behaviour
        # every ask() answers within this many seconds: waiting behind the actor's earlier
        # commands and its own appends together (the journal gets the remaining time)
        self._timeout = timeout
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
        Answered, not raised, in ``outcome.rejection``: a fault of this aggregate (code
        ``aggregate_fault``: see :class:`AggregateFault`) and another command under a command
        id the aggregate already used (code ``command_id_reused``); neither appended anything.
        """
        if self._tg is None:
            raise RuntimeError("ActorHost is not running; use it as an async context manager")
        actor = self._actors.get(key)
        if actor is None:
            actor = self._actors[key] = _Actor(key)
        actor.last_used = started = time.monotonic()
        request = _Request(command, command_id, principal, started + self._timeout)
        if actor.busy:
            request.done = done = anyio.Event()
            actor.mailbox.append(request)
            with anyio.move_on_after(self._timeout):
                await done.wait()
            if not done.is_set():
                if request in actor.mailbox:  # not taken yet: it leaves, undecided
                    actor.mailbox.remove(request)
                    raise QueueTimeout(key, command_id, time.monotonic() - started)
                await done.wait()  # in flight: its append is bounded by its deadline
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
                mailbox = actor.mailbox
                batch = mailbox[: self._max_batch]  # the front at once (a list pops its front in O(n))
                del mailbox[: self._max_batch]
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
        except (CommitTooLarge, CommitUnencodable) as exc:
            if len(batch) == 1:  # one command alone cannot be stored: its caller gets the error
                if isinstance(exc, CommitUnencodable):
                    self._fail(actor, batch, AggregateFault(actor.key, "encode", exc.__cause__ or exc))
                else:
                    batch[0].error = exc
                return
            # The commands that queued up do not fit in one message together, or one of them
            # cannot be encoded: halve the batch (down to the command at fault). Nothing was
            # appended (the append failed whole), so each half decides afresh.
            half = len(batch) // 2
            await self._run(actor, batch[:half])
            await self._run(actor, batch[half:])
            return
        except AggregateFault as fault:  # the state could not be rebuilt: activate afresh next time
            actor.state = None
            self._fail(actor, batch, fault)
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
        for request in batch:
            if request.digest is None and request.fault is None:
                # A command or id that JSON cannot hold (a lone surrogate) could not be stored
                # either: it is failed here, before it is decided.
                try:
                    request.digest = idempotency.digest(request.command)
                    request.command_id.encode()
                except Exception as exc:
                    request.fault = AggregateFault(actor.key, "encode", exc)
        started = time.monotonic()
        deadline = min(r.deadline for r in batch)
        attempt = -1
        while (
            (attempt := attempt + 1) < self._max_retries or time.monotonic() - started < self._retry_for
        ) and (attempt == 0 or time.monotonic() < deadline):
            now = self._clock()
            state = actor.state
            applied: list[Applied] = []
            # per request: state after it, why it was refused, duplicate, its events, its fault
            answers: list[_Answer] = []
            for request in batch:
                fault = request.fault
                if fault is None:
                    stage = "decide"
                    try:
                        assert request.digest is not None  # taken above, or it is a fault
                        seen = b.has_seen(state, request.command_id, request.digest)
                        if seen == Seen.REUSED:  # another command under a used id: refuse it
                            answers.append((state, _reused(actor.key, request.command_id), False, (), None))
                        elif seen:  # a retry: the first answer again
                            answers.append((state, b.refusal(state, request.command_id), True, (), None))
                        else:
                            decision = b.decide(state, request.command, now)
                            events, rejection = decision.events, decision.rejection
                            if events:
                                stage = "apply"
                                record = Applied(
                                    request.command_id, request.principal, events, rejection, request.digest
                                )
                                state = b.apply_commands(state, (record,))
                                applied.append(record)
                            answers.append((state, rejection, False, events, None))
                        continue
                    except Exception as exc:  # this command alone fails; the batch goes on without it
                        fault = AggregateFault(actor.key, stage, exc)
                answers.append((state, fault.rejection(), False, (), fault))
            if not applied:
                # Queries and refusals append nothing, so no conflict would tell us that another
                # host wrote since we last looked: check (read-your-writes) and, if the aggregate
                # moved, decide again on the fresh state.
                if not fresh and await self._catch_up(actor):
                    fresh = True
                    continue
                self._answer(actor, batch, answers, actor.seq)
                return
            # A write needs no such check: it carries the sequence it was decided on, and a
            # stale decision comes back as a conflict.
            commit = Commit(at=now, version=b.version(actor.state) + 1, commands=tuple(applied))
            try:
                msg_id = _msg_id(actor.key, commit)
            except Exception as exc:  # an id JSON cannot hold (a lone surrogate): the log could not either
                raise CommitUnencodable(_describe(exc)) from exc
            try:
                result = await self._journal.append(
                    actor.key, commit, expected_seq=actor.seq, msg_id=msg_id, deadline=deadline
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
                if await self._catch_up(actor):
                    fresh = True
                    continue
                # It is stored and already folded into the state, yet its ids were no longer
                # remembered (a late retry, after more than idempotency.WINDOW newer commands):
                # it was applied once; say so instead of deciding it again and again.
                actor.log.info("late_retry", command_ids=commit.command_ids)
                late: list[_Answer] = [
                    (actor.state, None, True, (), None) if fault is None else (after, rejection, False, (), fault)
                    for after, rejection, _, _, fault in answers
                ]
                self._answer(actor, batch, late, actor.seq)
                return
            final = msgspec.structs.replace(state, version=commit.version)
            actor.state, actor.seq = final, result.seq
            actor.since_snapshot += 1
            for request, (after, rejection, duplicate, events, fault) in zip(batch, answers, strict=True):
                if after is state:
                    after = final
                elif after is not actor.state:
                    after = msgspec.structs.replace(after, version=commit.version)
                if fault is not None:
                    self._report(actor, fault, request.command_id)
                request.outcome = Outcome(after, result.seq, rejection, duplicate, events)
            return
        raise ConflictRetriesExhausted(actor.key, attempt)

    def _answer(self, actor: _Actor, batch: list[_Request], answers: list[_Answer], seq: int) -> None:
        for request, (after, rejection, duplicate, events, fault) in zip(batch, answers, strict=True):
            if fault is not None:
                self._report(actor, fault, request.command_id)
            request.outcome = Outcome(after, seq, rejection, duplicate, events)

    def _report(self, actor: _Actor, fault: AggregateFault, command_id: str, commands: int = 1) -> None:
        """The one log line of a fault: the aggregate (bound in ``actor.log``), stage, error."""
        actor.log.error(
            "aggregate_fault", stage=fault.stage, error=_describe(fault.error), where=_where(fault.error),
            command_id=command_id, commands=commands,
        )

    def _fail(self, actor: _Actor, batch: list[_Request], fault: AggregateFault) -> None:
        """Answer every request of ``batch`` with ``fault`` (logged once)."""
        self._report(actor, fault, batch[0].command_id, len(batch))
        state = actor.state
        if state is None:  # never built: answer with the empty state, as for an unknown aggregate
            try:
                state = self._behaviour.initial_state(actor.key)
            except Exception:
                state = None
        rejection = fault.rejection()
        for request in batch:
            request.outcome = Outcome(state, actor.seq, rejection)

    async def _activate(self, actor: _Actor) -> None:
        started = time.perf_counter()
        try:
            state = self._behaviour.initial_state(actor.key)
        except Exception as exc:
            raise AggregateFault(actor.key, "replay", exc) from exc
        seq = 0
        raw = await self._snapshots.load(actor.key)
        if raw is not None:
            try:
                snapshot = self._snapshot_decoder.decode(raw)
                state, seq = snapshot.state, snapshot.seq
            except Exception as exc:
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
        if not commits:
            return 0
        state = actor.state
        try:
            for _, commit in commits:
                state = self._behaviour.apply_commit(state, commit)
        except Exception as exc:  # the state stays as it was, at the sequence it was at
            raise AggregateFault(actor.key, "replay", exc) from exc
        actor.state, actor.seq = state, commits[-1][0]
        return len(commits)

    async def _save_snapshot(self, actor: _Actor, seq: int, state: Any) -> None:
        # Runs as a task of the host's task group: nothing may escape it, or the whole host
        # (every actor) would stop. A missed snapshot only slows the next activation.
        stage = "snapshot_encode"
        try:
            data = self._snapshot_codec.encode(_Snapshot(seq=seq, state=state))
            stage = "snapshot_save"
            await self._snapshots.save(actor.key, data)
        except Exception as exc:
            # an unencodable state is a fault (an error); a failed save, the store's trouble
            report = actor.log.error if stage == "snapshot_encode" else actor.log.warning
            report("snapshot_failed", stage=stage, seq=seq, error=_describe(exc), where=_where(exc))

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
        if len(idle) > len(self._actors):
            # A dict never gives back its table when keys are deleted (a host that served
            # 200,000 sessions would keep a table for 200,000 after they all went idle): copy it.
            self._actors = dict(self._actors)
        return len(idle)

    async def _passivation_loop(self) -> None:
        if not math.isfinite(self._passivate_after):
            return
        while True:
            await anyio.sleep(max(self._passivate_after / 4, 0.05))
            dropped = self.passivate_idle(self._passivate_after)
            if dropped:
                log.debug("actors_passivated", count=dropped, active=len(self._actors))
