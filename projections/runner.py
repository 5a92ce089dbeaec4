"""The projection runner: a deterministic fold over the log plus a durable checkpoint.

A :class:`Projection` folds commits into a read model (in place: no I/O, no clock, the same
commits always give the same model). The runner

* restores the latest checkpoint (the model as of a stream sequence), replays the log from
  there up to the stream's end (fast: decoded inside the delivery callback), then follows new
  commits live;
* never applies a sequence twice: a model carries the sequence it has applied, and anything
  at or below it is skipped (a checkpoint and a replay may overlap);
* saves a checkpoint every ``checkpoint_every`` commits (at most every ``checkpoint_interval``
  seconds) and when it stops. The checkpoint store compares and swaps: two workers of one
  projection each keep an exact model, and the stored checkpoint only moves forward;
* exposes its lag (the stream's last sequence minus the applied one) and lets a reader wait
  until a given sequence is applied (read-your-writes);
* can rebuild from zero into a scratch model, to verify the live one;
* once running, keeps going through failures (a log that cannot be read for a while, a
  checkpoint that cannot be written, a fold that raises): each is logged and retried with a
  backoff, and the runner never ends by itself (its task group, the client's, lives on).

Effects a fold returns (e.g. abuse alerts) are handed to ``on_effects`` only for commits that
arrive live: catching up after a restart or rebuilding never repeats them. They run beside the
follower (up to 1,024 commits' effects at once; one commit's in order), as checkpoints do: an
effect that appends waits a round trip, and a follower waiting for a thousand of them in a row
(an alert for each of a thousand denied sessions) fell a whole queue behind its feed.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import anyio
import anyio.abc
import msgspec
import structlog

from actors.events import Commit

M = TypeVar("M")

log = structlog.get_logger("blackbird.projections")


class Projection(Protocol[M]):
    """A read model kind: its name, its model type and its fold."""

    name: str
    model_type: type[M]

    def initial(self) -> M: ...

    def apply(self, model: M, seq: int, subject: str, commit: Commit) -> list[Any]:
        """Fold one commit into ``model`` (in place); return the effects it causes."""
        ...


class Log(Protocol):
    async def replay(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[int, str, Commit], None],
        until_seq: int | None = None,
    ) -> int: ...

    def follow(self, subject_filter: str, after_seq: int = 0) -> AsyncIterator[Any]: ...

    async def follow_with(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[Any], Awaitable[None]]
    ) -> None:
        """Hand every commit after ``after_seq`` to ``on_entry`` (awaited, in order) until
        cancelled; an error it raises ends this with that error."""
        ...

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int: ...

    async def stream_last_seq(self) -> int: ...


class Checkpoint(NamedTuple):
    seq: int
    data: bytes
    token: Any  # what the store needs to compare-and-swap (a KV revision)


class Checkpoints(Protocol):
    async def load(self, name: str) -> Checkpoint | None: ...

    async def peek(self, name: str) -> tuple[int, Any] | None:
        """The stored checkpoint's ``(seq, token)`` without its data."""
        ...

    async def save(self, name: str, seq: int, data: bytes, token: Any) -> Any | None:
        """Store ``data`` as of ``seq`` if the stored checkpoint is still ``token``; the new
        token, or None if another worker stored a checkpoint since (nothing is written)."""
        ...


class ProjectionTimeout(Exception):
    def __init__(self, name: str, wanted: int, applied: int, timeout: float) -> None:
        super().__init__(
            f"projection {name!r} applied sequence {applied}, not {wanted}, within {timeout}s"
        )
        self.name, self.wanted, self.applied, self.timeout = name, wanted, applied, timeout


class Waiters:
    """Callers waiting until a sequence is applied (read-your-writes)."""

    def __init__(self) -> None:
        self._waiting: list[tuple[int, anyio.Event]] = []

    def wake(self, applied: int) -> None:
        """Release everyone waiting for ``applied`` or an earlier sequence."""
        if not self._waiting:
            return
        ready = [event for wanted, event in self._waiting if wanted <= applied]
        self._waiting = [(wanted, event) for wanted, event in self._waiting if wanted > applied]
        for event in ready:
            event.set()

    async def wait(self, seq: int, timeout: float, applied: Callable[[], int]) -> bool:
        """True once ``applied()`` reaches ``seq``; False after ``timeout`` seconds."""
        if seq <= applied():
            return True
        event = anyio.Event()
        self._waiting.append((seq, event))
        with anyio.move_on_after(timeout):
            await event.wait()
        if seq > applied():
            self._waiting = [(s, e) for s, e in self._waiting if e is not event]
            return False
        return True


class ProjectionCheckpointError(Exception):
    def __init__(self, name: str, seq: int, rounds: int) -> None:
        super().__init__(
            f"projection {name!r}: checkpoint at sequence {seq} lost the compare-and-swap "
            f"{rounds} times in a row"
        )


_RETRY_FIRST = 0.1  # seconds before the first retry after a failure to follow; doubles
_RETRY_CAP = 5.0
_FINAL_CHECKPOINT = 5.0  # seconds the checkpoint taken when the runner stops may take
_CHECKPOINT_ROUNDS = 5  # compare-and-swap rounds lost to newer checkpoints before giving up
_EFFECTS_AT_ONCE = 1_024  # commits whose effects may run at once; beyond that the follower waits


class _Snapshot(msgspec.Struct, Generic[M]):
    seq: int
    model: M


class ProjectionRunner(Generic[M]):
    """Runs one projection over ``subject_filter``. Use ``await tg.start(runner.run)``."""

    def __init__(
        self,
        projection: Projection[M],
        log_: Log,
        checkpoints: Checkpoints,
        subject_filter: str,
        *,
        checkpoint_every: int = 5_000,
        checkpoint_interval: float = 5.0,
        on_effects: Callable[[list[Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.projection = projection
        self.name = projection.name
        self._log = log_
        self._checkpoints = checkpoints
        self._filter = subject_filter
        self._every = checkpoint_every
        self._interval = checkpoint_interval
        self._on_effects = on_effects
        self.model: M = projection.initial()
        self.seq = 0  # the last stream sequence applied to ``model``
        self._token: Any = None
        self._saved_seq = 0
        self._saved_at = 0.0
        self._waiters = Waiters()
        self._dirty = False  # a fold failed halfway: the model must be restored before use
        # where checkpoints taken and effects raised while following run (beside the follower)
        self._beside: anyio.abc.TaskGroup | None = None
        self._saving = False  # a checkpoint is being taken (beside the follower)
        self._effect_slots = anyio.Semaphore(_EFFECTS_AT_ONCE)
        self._encode = msgspec.msgpack.Encoder().encode
        # a type chosen at run time: mypy reads a subscript as a static type, and cannot here
        self._decode = msgspec.msgpack.Decoder(_Snapshot[projection.model_type]).decode  # type: ignore[name-defined]
        self.log = log.bind(projection=self.name)

    # ------------------------------------------------------------------ folding

    def _apply(self, seq: int, subject: str, commit: Commit) -> list[Any]:
        if seq <= self.seq:  # already in the model (a checkpoint and a replay overlapped)
            return []
        effects = self.projection.apply(self.model, seq, subject, commit)
        self.seq = seq
        return effects

    def _apply_quietly(self, seq: int, subject: str, commit: Commit) -> None:
        self._apply(seq, subject, commit)

    def _wake(self) -> None:
        self._waiters.wake(self.seq)

    # ------------------------------------------------------------------ running

    async def restore(self) -> None:
        """Load the latest checkpoint into the model (or start from zero)."""
        stored = await self._checkpoints.load(self.name)
        if stored is None:
            self.model, self.seq, self._token = self.projection.initial(), 0, None
            return
        snapshot = self._decode(stored.data)
        self.model, self.seq, self._token = snapshot.model, snapshot.seq, stored.token
        self._saved_seq = snapshot.seq
        self.log.debug("projection_restored", seq=snapshot.seq, bytes=len(stored.data))

    async def catch_up(self) -> int:
        """Apply everything the log holds now (no effects); returns the applied sequence."""
        await self._log.replay(self._filter, self.seq, self._apply_quietly)
        self._wake()
        return self.seq

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Restore, catch up, then follow live until cancelled; ready once caught up.

        A failure before it is ready is raised (the starter sees it). After that nothing ends
        it but cancellation: a failure to read the log is logged and the follow resumes after
        a backoff from the last sequence applied (commits read then count as live); a fold
        that raises leaves the model in doubt, so the next attempt restores the checkpoint and
        catches up quietly first; a checkpoint that fails is logged and tried again later.
        """
        await self.restore()
        await self.catch_up()
        self._saved_at = time.monotonic()
        task_status.started()
        failures = 0
        try:
            async with anyio.create_task_group() as self._beside:
                while True:
                    try:
                        if self._dirty:
                            await self.restore()
                            await self.catch_up()
                            self._dirty = False
                        await self._follow()
                    except Exception as exc:
                        delay = min(_RETRY_FIRST * (1 << min(failures, 8)), _RETRY_CAP)
                        failures += 1
                        self.log.warning(
                            "projection_interrupted", seq=self.seq, error=repr(exc), retry_in=delay,
                            restore=self._dirty,
                        )
                        await anyio.sleep(delay)
                    else:
                        failures = 0
        finally:
            self._beside = None
            # bounded: a client closing while NATS is unreachable must not hang here
            with anyio.move_on_after(_FINAL_CHECKPOINT, shield=True):
                if self.seq > self._saved_seq and not self._dirty:
                    await self._checkpoint_quietly()

    async def _follow(self) -> None:
        """Apply live commits until the log's follower ends (it raises, or ends: resubscribe)."""
        await self._log.follow_with(self._filter, self.seq, self._on_entry)

    async def _on_entry(self, entry: Any) -> None:
        """Apply one live commit (awaited by the follower, in order)."""
        if entry.seq <= self.seq:
            return  # applied already (a checkpoint and the follower overlapped)
        try:
            effects = self._apply(entry.seq, entry.subject, entry.commit)
        except Exception:
            self._dirty = True  # the fold may have changed the model halfway
            raise
        self._wake()
        if effects and self._on_effects is not None:
            if self._beside is None:
                await self._effects(entry.seq, effects)
            else:
                try:  # (acquire() yields to the loop even when a slot is free: a pass per alert)
                    self._effect_slots.acquire_nowait()
                except anyio.WouldBlock:
                    await self._effect_slots.acquire()
                self._beside.start_soon(self._effects, entry.seq, effects, self._effect_slots)
        if (
            not self._saving
            and self.seq - self._saved_seq >= self._every
            and time.monotonic() - self._saved_at >= self._interval
        ):
            # Taken beside the follower, not in its way: a save waits a round trip (seconds
            # when the process is saturated), and a follower waiting that long fell a whole
            # queue behind its feed. The model is encoded as it stands when the save starts.
            self._saving = True
            if self._beside is None:
                await self._checkpoint_in_turn()
            else:
                self._beside.start_soon(self._checkpoint_in_turn)

    async def _effects(self, seq: int, effects: list[Any], slot: anyio.Semaphore | None = None) -> None:
        assert self._on_effects is not None
        try:
            await self._on_effects(effects)
        except Exception as exc:  # an effect failing must not stop the read model
            self.log.warning("projection_effects_failed", seq=seq, error=repr(exc))
        finally:
            if slot is not None:
                slot.release()

    async def _checkpoint_in_turn(self) -> None:
        try:
            if not self._dirty:
                await self._checkpoint_quietly()
        finally:
            self._saving = False

    async def _checkpoint_quietly(self) -> None:
        """Checkpoint; a failure is logged and the next one is tried after ``checkpoint_interval``
        (the model stays exact: only a restart would replay a little more)."""
        try:
            await self.checkpoint()
        except Exception as exc:
            self._saved_at = time.monotonic()
            self.log.warning("projection_checkpoint_failed", seq=self.seq, error=repr(exc))

    async def checkpoint(self) -> bool:
        """Store the model as of its sequence; False if another worker stored a newer one."""
        for _ in range(_CHECKPOINT_ROUNDS):
            seq, data = self.seq, self._encode(_Snapshot(seq=self.seq, model=self.model))
            token = await self._checkpoints.save(self.name, seq, data, self._token)
            self._saved_at = time.monotonic()
            if token is not None:
                self._token, self._saved_seq = token, seq
                self.log.debug("projection_checkpointed", seq=seq, bytes=len(data))
                return True
            stored = await self._checkpoints.peek(self.name)  # another worker stored one since
            self._token = None if stored is None else stored[1]
            if stored is not None and stored[0] >= seq:
                self._saved_seq = seq  # somebody else's checkpoint covers ours
                return False
            # theirs is older: store ours over it
        raise ProjectionCheckpointError(self.name, self.seq, _CHECKPOINT_ROUNDS)

    # ------------------------------------------------------------------ reading

    async def wait_for(self, seq: int, timeout: float) -> None:
        """Return once the model includes sequence ``seq``; ProjectionTimeout after ``timeout``."""
        if not await self._waiters.wait(seq, timeout, lambda: self.seq):
            raise ProjectionTimeout(self.name, seq, self.seq, timeout)

    async def lag(self) -> int:
        """Commits in the stream this model has not applied yet (0: up to date)."""
        return max(0, await self._log.stream_last_seq() - self.seq)

    async def scratch(self, until_seq: int) -> M:
        """A model rebuilt from zero up to ``until_seq``, without touching the live one."""
        runner = ProjectionRunner(self.projection, self._log, self._checkpoints, self._filter)
        await self._log.replay(self._filter, 0, runner._apply_quietly, until_seq)
        return runner.model

    async def rebuild(self) -> int:
        """Drop the model, fold the whole log again and checkpoint it; returns the sequence."""
        self.model, self.seq = self.projection.initial(), 0
        await self.catch_up()
        await self._checkpoint_quietly()
        return self.seq

    def encode(self, model: M | None = None) -> bytes:
        """A model's canonical bytes (to compare two models)."""
        return self._encode(self.model if model is None else model)
