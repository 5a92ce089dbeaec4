"""Load that keeps going through faults, and the checks that nothing was lost or doubled.

:class:`UsageLoad` runs workers, each creating its own session and then tracking usage on it in a
loop with explicit command ids. A failed call is retried with the SAME command id until it is
acknowledged; a command that is still not acknowledged after ``retry_for`` seconds is reported as
lost. Every acknowledgement is recorded with the start of the attempt that got it and the moment
it returned, so a test can say when commands flowed again after a fault.

:func:`check_nothing_lost` then reads the log and asks the clients: every acknowledged command id
is in the log exactly once, the quotas equal the acknowledged usage, the read models equal a
rebuild from the log.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from actors.events import Commit, SessionCreated, UsageTracked
from blackbird import AsyncBlackbird, BlackbirdError

TENANT = "acme"
RETRY_PAUSE = 0.05  # seconds between a failed attempt and its retry (no busy loop on fast failures)
PACE = 0.002  # seconds a worker rests between commands: load, not saturation of a 2-core machine,
# yet short enough that some command is always in flight when the fault strikes


@dataclass(frozen=True)
class Ack:
    """An acknowledged command."""

    command_id: str
    amount: int
    started: float  # time.monotonic() when the acknowledged attempt was sent
    at: float  # time.monotonic() when it returned


@dataclass
class Worker:
    session_id: str
    acks: list[Ack] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)  # command ids never acknowledged
    created: bool = False


@dataclass
class UsageLoad:
    """``workers`` sessions, each tracking usage in a loop (see the module docstring)."""

    bb: AsyncBlackbird
    workers: int = 8
    retry_for: float = 60.0
    amount_of: Callable[[int], int] = lambda k: k % 5 + 1
    sessions: list[Worker] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)  # failed attempts by error class
    failed: Counter[str] = field(default_factory=Counter)  # failed attempts by command id
    untyped: list[str] = field(default_factory=list)  # failures that were not a BlackbirdError
    longest_attempt: float = 0.0  # seconds, acknowledged or failed
    longest_what: str = ""  # which command that attempt was for, and how it ended
    attempting: dict[str, float] = field(default_factory=dict)  # command id -> start of its attempt in progress
    _stop: anyio.Event = field(default_factory=anyio.Event)

    def __post_init__(self) -> None:
        label = uuid.uuid4().hex[:6]
        self.sessions = [Worker(f"w{i}-{label}") for i in range(self.workers)]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[UsageLoad]:
        """Run the workers for the body of the ``async with``; on exit each finishes the command
        it has in flight (retried until acknowledged or lost) and stops."""
        async with anyio.create_task_group() as tg:
            for worker in self.sessions:
                tg.start_soon(self._work, worker)
            try:
                yield self
            finally:
                self._stop.set()

    async def attempt(self, call: Callable[[], Awaitable[Any]], command_id: str) -> tuple[float, float] | None:
        """Run ``call`` until it succeeds: ``(started, returned)`` of the successful attempt, or
        None if it failed for ``retry_for`` seconds. Other loads (memory writes, messages) call
        it too, so their attempts count in ``attempting``, ``failed`` and the failures."""
        give_up = time.monotonic() + self.retry_for
        while True:
            started = time.monotonic()
            self.attempting[command_id] = started
            try:
                await call()
            except BlackbirdError as exc:
                self.failures[type(exc).__name__] += 1
            except Exception as exc:  # the specification says typed errors only: recorded, retried
                self.failures[f"untyped {type(exc).__module__}.{type(exc).__name__}"] += 1
                self.untyped.append(f"{command_id}: {type(exc).__module__}.{type(exc).__name__}: {exc}")
            else:
                returned = time.monotonic()
                self._note_attempt(command_id, started, returned, "acknowledged")
                return started, returned
            finally:
                del self.attempting[command_id]
            self.failed[command_id] += 1
            failed = time.monotonic()
            self._note_attempt(command_id, started, failed, "failed")
            if failed > give_up:
                return None
            await anyio.sleep(RETRY_PAUSE)

    def _note_attempt(self, command_id: str, started: float, ended: float, how: str) -> None:
        if ended - started > self.longest_attempt:
            self.longest_attempt = ended - started
            self.longest_what = f"{command_id}, {how}, sent at {started:.2f}"

    async def _work(self, worker: Worker) -> None:
        sm = self.bb.session_manager
        sid = worker.session_id
        create_id = f"create-{sid}"
        created = await self.attempt(
            lambda: sm.create_session(f"user-{sid}", tier="enterprise", session_id=sid, command_id=create_id),
            create_id,
        )
        if created is None:
            worker.lost.append(create_id)
            return
        worker.created = True
        k = 0
        while not self._stop.is_set():
            k += 1
            command_id, amount = f"{sid}-use-{k}", self.amount_of(k)

            async def track(cid: str = command_id, n: int = amount) -> None:
                await sm.track_usage(sid, "inference", "tokens", n, command_id=cid)

            acked = await self.attempt(track, command_id)
            if acked is None:
                worker.lost.append(command_id)
                return
            worker.acks.append(Ack(command_id, amount, *acked))
            await anyio.sleep(PACE)

    # ------------------------------------------------------------------ observing

    @property
    def acknowledged(self) -> int:
        return sum(len(w.acks) for w in self.sessions)

    async def wait_progress(self, per_worker: int, *, after: float = -math.inf, timeout: float = 60.0) -> None:
        """Until every worker has ``per_worker`` acknowledgements of attempts sent after ``after``
        (or one of them lost a command); TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while not all(
                w.lost or sum(1 for a in w.acks if a.started >= after) >= per_worker for w in self.sessions
            ):
                await anyio.sleep(0.02)

    async def wait_in_flight(self, since: float, held: float = 0.05, timeout: float = 10.0) -> None:
        """Until some command's attempt has been in progress for ``held`` seconds since ``since``
        (the moment a server was stopped: the command is stuck on it, so a fault that strikes
        then finds a command in flight); TimeoutError after ``timeout`` seconds."""
        with anyio.fail_after(timeout):
            while not any(time.monotonic() - max(started, since) >= held for started in self.attempting.values()):
                await anyio.sleep(0.005)

    def first_ack(self, after: float) -> float | None:
        """When the first command whose acknowledged attempt was sent after ``after`` returned."""
        times = [a.at for w in self.sessions for a in w.acks if a.started >= after]
        return min(times) if times else None

    def every_worker_acked(self, after: float) -> float | None:
        """When the last worker to get an acknowledgement after ``after`` got its first one
        (the moment commands flowed again for every session); None if one never did."""
        firsts = [next((a.at for a in w.acks if a.at >= after), None) for w in self.sessions]
        return None if any(t is None for t in firsts) else max(t for t in firsts if t is not None)

    def summary(self) -> str:
        lost = [cid for w in self.sessions for cid in w.lost]
        return (
            f"{self.acknowledged} commands acknowledged on {len(self.sessions)} sessions; "
            f"failed attempts {dict(self.failures) or 'none'}; lost {lost or 'none'}; "
            f"longest attempt {self.longest_attempt:.2f}s ({self.longest_what})"
        )


# --------------------------------------------------------------------------- the checks


async def session_commits(bb: AsyncBlackbird) -> dict[str, list[Commit]]:
    """Every commit of the tenant's sessions in log order, by session id (the journal's replay)."""
    subjects = bb.journal.subjects
    found: dict[str, list[Commit]] = {}

    def collect(seq: int, subject: str, commit: Commit) -> None:
        found.setdefault(subject.rsplit(".", 1)[1], []).append(commit)

    await bb.journal.replay(f"{subjects.prefix}.{TENANT}.session.*", 0, collect)
    return found


async def check_nothing_lost(load: UsageLoad, *clients: AsyncBlackbird) -> None:
    """Every acknowledged command is in the log exactly once and nothing else is; each client's
    view of every session's quota equals the acknowledged usage; the read models of the first
    client equal a rebuild from the log."""
    assert not [cid for w in load.sessions for cid in w.lost], load.summary()
    assert all(w.created for w in load.sessions)
    bb = clients[0]
    log = await session_commits(bb)
    for worker in load.sessions:
        commits = log.get(worker.session_id, [])
        applied = Counter(cid for c in commits for cid in c.command_ids)
        acked = {a.command_id for a in worker.acks}
        usage_ids = {cid for cid in applied if cid.startswith(f"{worker.session_id}-use-")}
        doubled = {cid: n for cid, n in applied.items() if n != 1}
        assert not doubled, f"{worker.session_id}: command ids applied more than once: {doubled}"
        assert acked <= usage_ids, f"{worker.session_id}: acknowledged, not in the log: {sorted(acked - usage_ids)}"
        # a worker sends its next command only after the previous one was acknowledged, so the
        # log holds no usage command that was not acknowledged
        assert usage_ids <= acked, f"{worker.session_id}: in the log, never acknowledged: {sorted(usage_ids - acked)}"
        assert sum(isinstance(e, SessionCreated) for c in commits for e in c.events) == 1
        assert [c.version for c in commits] == list(range(1, len(commits) + 1)), "the history has gaps"
        charged = sum(e.amount for c in commits for e in c.events if isinstance(e, UsageTracked))
        expected = sum(a.amount for a in worker.acks)
        assert charged == expected, f"{worker.session_id}: the log charges {charged}, acknowledged {expected}"
        for client in clients:
            used = (await client.session_manager.get_quota(worker.session_id, "tokens"))["used"]
            assert used == expected, f"{worker.session_id}: quota used {used}, acknowledged {expected}"
    differences = await bb.audit.verify()
    assert differences and all(d == [] for d in differences.values()), differences
