"""Crashes with work in flight: kill -9 strikes while commands, memory writes and stream
subscribers are busy, and the clients retry the same command ids once they can.

Two faults, each under the same mixed load (:class:`MixedLoad`):

* the nats-server is paused (SIGSTOP) until a usage command, a memory write and a message are
  each stuck on it, then killed with SIGKILL and started again on its port and store; the
  client hosting the actors in-process rides it out;
* the only ``blackbird serve`` host of a remote client is paused until a command of each kind is
  stuck on it, then killed with SIGKILL; a new host is started and the remote client's retries
  reach it.

Afterwards, read from the log and from a fresh client: every acknowledged command id (usage,
memory write, message) is in the log exactly once and nothing acknowledged is missing; each
session's quota (in the surviving client and in a fresh one) equals the usage acknowledged; every
acknowledged memory is in the log once and in the memory index once; every subscriber, resumed
with the ``resume`` token of the last message it took after the fault, got every message of its
session's log once, in log order, nothing lost or repeated (a sentinel posted last tells when it
has everything).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.abc
import anyio.to_thread
import pytest

from actors.events import Commit, MemoryRemembered, MessagePosted
from blackbird import AsyncBlackbird, BlackbirdError, CommandIdReusedError
from blackbird.streams.subscription import StreamEvent

from .conftest import NatsServer
from .embedders import HashEmbedder
from .fault_load import PACE, RETRY_PAUSE, TENANT, UsageLoad, check_nothing_lost
from .nats_cluster import NatsCluster
from .test_serve_failover import ServeProcess

pytestmark = pytest.mark.anyio

BUDGET = 100.0  # seconds a whole test may take
PROGRESS = 10  # acknowledgements per worker before the fault, and again after it
HELD = 0.05  # seconds a call must have been stuck before the kill counts it as in flight
WRITERS = 2  # sessions writing memories
POSTERS = 2  # sessions posting messages, each with a subscriber


@dataclass
class Writer:
    """A session remembering one memory after another."""

    session_id: str
    acks: list[tuple[str, str, str]] = field(default_factory=list)  # (command id, memory id, text)
    lost: list[str] = field(default_factory=list)
    # retries refused as CommandIdReusedError, (command id, text): the write was stored by a try
    # that failed, and remember's retry is a different command (see test_a_retried_memory_write...)
    refused: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Poster:
    """A session posting messages, and its subscriber."""

    session_id: str
    acks: list[str] = field(default_factory=list)  # command ids of acknowledged messages
    lost: list[str] = field(default_factory=list)
    received: list[StreamEvent] = field(default_factory=list)
    token: str | None = None  # the resume token of the last message taken
    subscriptions: int = 0  # how many times the subscriber (re)subscribed
    errors: Counter[str] = field(default_factory=Counter)  # what ended a subscription
    resume_now: bool = False  # set by the test: leave the subscription and resume with the token


@dataclass
class MixedLoad:
    """Usage commands (:class:`UsageLoad`), memory writes and messages with their subscribers,
    all through ``usage.attempt``: a failed call is retried with the same command id."""

    bb: AsyncBlackbird
    usage: UsageLoad
    writers: list[Writer] = field(default_factory=list)
    posters: list[Poster] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)  # acknowledgements by session at mark()

    def __post_init__(self) -> None:
        label = self.usage.sessions[0].session_id.rsplit("-", 1)[1]
        self.writers = [Writer(f"mem{i}-{label}") for i in range(WRITERS)]
        self.posters = [Poster(f"msg{i}-{label}") for i in range(POSTERS)]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[MixedLoad]:
        """Every worker and subscriber runs for the body of the ``async with``; on exit the
        workers finish their command in flight, a sentinel message is posted on every poster's
        session and each subscriber reads up to it, then the subscribers stop."""
        stop = anyio.Event()
        async with anyio.create_task_group() as readers:
            async with self.usage.running(), anyio.create_task_group() as tg:
                for writer in self.writers:
                    tg.start_soon(self._write, writer, stop)
                for poster in self.posters:
                    tg.start_soon(self._post_all, poster, stop, readers)
                try:
                    yield self
                finally:
                    stop.set()
            for poster in self.posters:
                assert await self._post(poster, f"{poster.session_id}-sentinel", "sentinel"), poster.lost
            with anyio.fail_after(30):
                while not all(p.received and p.received[-1].text == "sentinel" for p in self.posters):
                    await anyio.sleep(0.02)
            readers.cancel_scope.cancel()

    async def _create(self, sid: str) -> bool:
        sm = self.bb.session_manager
        return await self.usage.attempt(
            lambda: sm.create_session(f"user-{sid}", tier="enterprise", session_id=sid, command_id=f"create-{sid}"),
            f"create-{sid}",
        ) is not None

    async def _write(self, writer: Writer, stop: anyio.Event) -> None:
        if not await self._create(writer.session_id):
            writer.lost.append(f"create-{writer.session_id}")
            return
        k = 0
        while not stop.is_set():
            k += 1
            command_id, text = f"{writer.session_id}-mem-{k}", f"fact number {k} of {writer.session_id}"
            got: list[str] = []

            async def remember(cid: str = command_id, text: str = text, got: list[str] = got) -> None:
                try:
                    got.append((await self.bb.memory.remember(
                        text, session_id=writer.session_id, scope="session", command_id=cid
                    )).memory_id)
                except CommandIdReusedError:
                    if not self.usage.failed[cid]:
                        raise  # not a retry: a fault of the test
                    got.append("")

            if await self.usage.attempt(remember, command_id) is None:
                writer.lost.append(command_id)
                return
            if got[-1]:
                writer.acks.append((command_id, got[-1], text))
            else:
                writer.refused.append((command_id, text))
            await anyio.sleep(PACE)

    async def _post_all(self, poster: Poster, stop: anyio.Event, readers: anyio.abc.TaskGroup) -> None:
        if not await self._create(poster.session_id):
            poster.lost.append(f"create-{poster.session_id}")
            return
        readers.start_soon(self._subscribe, poster)
        k = 0
        while not stop.is_set():
            k += 1
            if not await self._post(poster, f"{poster.session_id}-msg-{k}", f"message {k}"):
                return
            await anyio.sleep(PACE)

    async def _post(self, poster: Poster, command_id: str, text: str) -> bool:
        async def send() -> None:
            await self.bb.session_manager.send_message(text, session_id=poster.session_id, command_id=command_id)

        if await self.usage.attempt(send, command_id) is None:
            poster.lost.append(command_id)
            return False
        poster.acks.append(command_id)
        return True

    async def _subscribe(self, poster: Poster) -> None:
        """Read the session's messages until cancelled; whenever the subscription fails, or the
        test asks for it (``resume_now``), subscribe again after the last message taken."""
        while True:
            poster.subscriptions += 1
            poster.resume_now = False
            try:
                async with self.bb.streams.subscribe(poster.session_id, after=poster.token) as messages:
                    while not poster.resume_now:
                        message = await messages.get(timeout=0.05)
                        if message is not None:
                            poster.received.append(message)
                            poster.token = message.resume
                    continue
            except Exception as exc:  # a server gone mid-read: recorded, then resumed
                poster.errors[type(exc).__name__] += 1
            await anyio.sleep(RETRY_PAUSE)

    # ------------------------------------------------------------------ observing

    def acknowledged(self, command_id: str) -> bool:
        return any(a.command_id == command_id for w in self.usage.sessions for a in w.acks) or any(
            cid == command_id for w in self.writers for cid, _, _ in w.acks
        ) or any(cid == command_id for p in self.posters for cid in p.acks)

    @property
    def lost(self) -> list[str]:
        return [cid for w in self.writers for cid in w.lost] + [cid for p in self.posters for cid in p.lost]

    def mark(self) -> None:
        """From now on, :meth:`wait_progress` counts only memory writes and messages
        acknowledged after this call."""
        self.marks = {w.session_id: len(w.acks) for w in self.writers}
        self.marks.update({p.session_id: len(p.acks) for p in self.posters})

    async def wait_progress(self, per_worker: int, *, after: float = -math.inf, timeout: float = 30.0) -> None:
        """Until every usage worker has ``per_worker`` acknowledgements of attempts sent after
        ``after``, and every memory writer and poster ``per_worker`` since :meth:`mark` (or
        something was lost)."""
        await self.usage.wait_progress(per_worker, after=after, timeout=timeout)
        with anyio.fail_after(timeout):
            while not self.lost and not all(
                n - self.marks.get(sid, 0) >= per_worker
                for sid, n in [(w.session_id, len(w.acks)) for w in self.writers]
                + [(p.session_id, len(p.acks)) for p in self.posters]
            ):
                await anyio.sleep(0.02)

    async def wait_stuck(self, since: float, timeout: float = 10.0) -> list[str]:
        """Until a usage command, a memory write and a message have each been in progress for
        :data:`HELD` seconds since ``since`` (the moment the fault's target was stopped): the
        command ids stuck then."""
        kinds = ("-use-", "-mem-", "-msg-")
        with anyio.fail_after(timeout):
            while True:
                now = time.monotonic()
                stuck = [cid for cid, started in dict(self.usage.attempting).items()
                         if now - max(started, since) >= HELD]
                if all(any(kind in cid for cid in stuck) for kind in kinds):
                    return stuck
                await anyio.sleep(0.005)


Strike = Callable[[MixedLoad], Awaitable[tuple[list[str], float, float]]]


async def crash_under_load(bb: AsyncBlackbird, strike: Strike) -> tuple[MixedLoad, list[str], float, float]:
    """Run a :class:`MixedLoad` on ``bb``; once every worker made progress, ``strike`` (it stops
    the target, waits for stuck calls, kills it, brings a server or host back and returns the
    stuck command ids, the wall-clock time of the kill and when it was back); every subscriber is
    then made to resume with its token, and the load runs until every worker made progress
    again. Returns the load, the stuck ids, the time of the kill and the seconds until every
    worker was served again."""
    load = MixedLoad(bb, UsageLoad(bb, workers=4, retry_for=30.0))
    async with load.running():
        await load.wait_progress(PROGRESS)
        stuck, killed, back = await strike(load)
        load.mark()
        for poster in load.posters:
            poster.resume_now = True  # resume after the fault from the last message taken
        await load.wait_progress(PROGRESS, after=back)
    every = load.usage.every_worker_acked(back)
    assert every is not None
    return load, stuck, killed, every - back


# --------------------------------------------------------------------------- the checks


async def log_of(bb: AsyncBlackbird, kind: str) -> dict[str, list[tuple[int, Commit]]]:
    """Every commit of the tenant's aggregates of ``kind``, in log order, by aggregate id."""
    found: dict[str, list[tuple[int, Commit]]] = {}

    def collect(seq: int, subject: str, commit: Commit) -> None:
        found.setdefault(subject.rsplit(".", 1)[1], []).append((seq, commit))

    await bb.journal.replay(f"{bb.journal.subjects.prefix}.{TENANT}.{kind}.*", 0, collect)
    return found


async def check_memory_and_streams(load: MixedLoad, *clients: AsyncBlackbird) -> str:
    """Every acknowledged memory and message is in the log exactly once, nothing else is; each
    memory is in the index once; each subscriber got its session's messages once, in order.
    Returns a summary line."""
    bb = clients[0]
    assert not load.lost, f"lost {load.lost}; {load.usage.summary()}"
    memory_log = await log_of(bb, "memory")
    stored: list[tuple[str, str, str]] = []  # (command id, memory id, text) of every memory written
    session_log = await log_of(bb, "session")
    for writer in load.writers:
        memory_commits = [c for _, c in memory_log.get(f"session:{writer.session_id}", [])]
        applied = Counter(a.command_id for c in memory_commits for a in c.commands)
        acked = {f"{cid}:0" for cid, _, _ in writer.acks}  # remember's id of its first (only) text
        acked |= {f"{cid}:0" for cid, _ in writer.refused}  # stored by a try that failed
        doubled = {cid: n for cid, n in applied.items() if n != 1}
        assert not doubled, f"{writer.session_id}: memory writes applied more than once: {doubled}"
        assert acked == set(applied), (
            f"{writer.session_id}: acknowledged, not in the log: {sorted(acked - set(applied))}; "
            f"in the log, never acknowledged: {sorted(set(applied) - acked)}"
        )
        remembered = {
            a.command_id: e.memory_id for c in memory_commits for a in c.commands for e in a.events
            if isinstance(e, MemoryRemembered)
        }
        assert {cid: mid for cid, mid in remembered.items() if cid not in {f"{c}:0" for c, _ in writer.refused}} == {
            f"{cid}:0": mid for cid, mid, _ in writer.acks
        }, f"{writer.session_id}: memory ids differ"
        mine = writer.acks + [(cid, remembered[f"{cid}:0"], text) for cid, text in writer.refused]
        stored += mine
        used = sum(len(text.encode()) for _, _, text in mine)
        for client in clients:
            storage = (await client.session_manager.get_quota(writer.session_id, "storage"))["used"]
            assert storage == used, f"{writer.session_id}: storage used {storage}, acknowledged {used}"
    last = max(seq for entries in memory_log.values() for seq, _ in entries)  # the index follows memory subjects
    for client in clients:
        # a recall starts the client's index (and includes everything the client wrote)
        _, mid, text = load.writers[0].acks[-1]
        assert [m.memory_id for m in await client.memory.recall(
            text, session_id=load.writers[0].session_id, scopes=["session"], k=1
        )] == [mid]
        assert await client.memory.index.wait_for(last, 30), "the memory index did not catch up with the log"
        rows = Counter((r["memory_id"], r["text"]) for r in client.memory.index.rows(TENANT))
        wanted = Counter((mid, text) for _, mid, text in stored)
        assert rows == wanted, f"index rows differ: missing {wanted - rows}, extra {rows - wanted}"
    for poster in load.posters:
        commits = session_log.get(poster.session_id, [])
        applied = Counter(a.command_id for _, c in commits for a in c.commands)
        posted = {cid for cid in applied if "-msg-" in cid or cid.endswith("-sentinel")}
        doubled = {cid: n for cid, n in applied.items() if n != 1}
        assert not doubled, f"{poster.session_id}: commands applied more than once: {doubled}"
        assert posted == set(poster.acks), (
            f"{poster.session_id}: acknowledged, not in the log: {sorted(set(poster.acks) - posted)}; "
            f"in the log, never acknowledged: {sorted(posted - set(poster.acks))}"
        )
        in_log = [
            (f"{seq}-{i}", e.text)
            for seq, c in commits
            for i, e in enumerate(e for a in c.commands for e in a.events if isinstance(e, MessagePosted))
        ]
        got = [(m.id, m.text) for m in poster.received]
        repeated = {i: n for i, n in Counter(i for i, _ in got).items() if n > 1}
        assert not repeated, f"{poster.session_id}: delivered more than once: {repeated}"
        assert got == in_log, (
            f"{poster.session_id}: the subscriber got {len(got)} messages, the log holds {len(in_log)}; "
            f"missing {sorted(set(in_log) - set(got))[:5]}, extra {sorted(set(got) - set(in_log))[:5]}"
        )
        assert poster.subscriptions >= 2, "the subscriber never resumed"
    return (
        f"memories {sum(len(w.acks) for w in load.writers)} (retries refused as reused: "
        f"{[cid for w in load.writers for cid, _ in w.refused] or 'none'}), "
        f"messages {sum(len(p.acks) for p in load.posters)}, "
        f"subscriptions {[p.subscriptions for p in load.posters]} (ended by {[dict(p.errors) for p in load.posters]})"
    )


def stored_before(log: dict[str, list[tuple[int, Commit]]], command_ids: set[str], wall: float) -> list[str]:
    """The ``command_ids`` whose commit was decided before ``wall`` (time.time(), the kill): stored
    by a try that failed (each stuck call failed before the server or a host was back), so their
    retry had to be recognised as one. (A memory write's ids in the log carry a suffix: ``:0``
    for its text, ``:storage`` for its storage charge.)"""
    return sorted({cid for entries in log.values() for _, c in entries if c.at < wall
                   for a in c.commands if (cid := a.command_id.split(":", 1)[0]) in command_ids})


# --------------------------------------------------------------------------- the faults


class AnswerCutter:
    """A TCP relay in front of a nats-server. Once cut, it drops everything the server sends to
    the relayed clients, while their messages still reach it: a call sent after the cut is
    stored by the server, and its acknowledgement is lost (what a crash between storing and
    answering does). :meth:`cut_after` cuts as a client message holding ``marker`` goes by (so
    that message is stored, and its answer dropped). A connection ends when either side ends;
    new ones are relayed uncut once :meth:`restore` was called."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server
        self.cutting = False
        self.trigger: bytes | None = None
        self.url = ""

    def cut_after(self, marker: bytes) -> None:
        self.trigger = marker

    def restore(self) -> None:
        self.cutting, self.trigger = False, None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[AnswerCutter]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.url = f"nats://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._relay)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _relay(self, client: anyio.abc.SocketStream) -> None:
        async with client:
            try:
                upstream = await anyio.connect_tcp("127.0.0.1", self.server.port)
            except OSError:
                return  # the server is down: the client tries again
            async with upstream, anyio.create_task_group() as tg:

                async def pump(source: anyio.abc.SocketStream, sink: anyio.abc.SocketStream, answers: bool) -> None:
                    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError,
                                             anyio.ClosedResourceError):
                        while True:
                            data = await source.receive()
                            if not answers and self.trigger is not None and self.trigger in data:
                                self.cutting, self.trigger = True, None  # before it is passed on
                            if not (answers and self.cutting):
                                await sink.send(data)
                    tg.cancel_scope.cancel()

                tg.start_soon(pump, client, upstream, False)
                tg.start_soon(pump, upstream, client, True)


@pytest.mark.parametrize("hold", ["paused", "answers-cut"])
async def test_a_server_killed_with_commands_memory_writes_and_subscribers_in_flight_loses_and_doubles_nothing(
    nats_server: NatsServer, tmp_path: Path, hold: str
) -> None:
    """``paused``: the server is stopped (SIGSTOP), so the calls in flight at the kill were never
    stored; ``answers-cut``: the server stores them but its answers are dropped, so they were
    stored and never acknowledged, and each retry must be recognised as one."""

    def client(url: str, name: str) -> AsyncBlackbird:
        return AsyncBlackbird(nats_url=url, tenant=TENANT, command_timeout=2.0,
                              embedder=HashEmbedder(), memory_dir=str(tmp_path / name))

    async with AnswerCutter(nats_server).running() as relay:

        async def strike(load: MixedLoad) -> tuple[list[str], float, float]:
            try:
                if hold == "paused":
                    nats_server.pause()
                else:  # as a memory write's append goes by: a memory write is among the stored
                    relay.cut_after(f"HPUB bb.{TENANT}.memory.".encode())
                    with anyio.fail_after(10):
                        while not relay.cutting:
                            await anyio.sleep(0.001)
                stuck = await load.wait_stuck(time.monotonic())
            finally:
                killed = time.time()
                nats_server.kill()
            # down until every stuck call has ended (failed: its caller retries the same id after
            # the restart; an acknowledgement now would be a reply before the append's, see the checks)
            with anyio.fail_after(30):
                while not all(load.usage.failed[cid] or load.acknowledged(cid) for cid in stuck):
                    await anyio.sleep(0.02)
            relay.restore()
            await anyio.to_thread.run_sync(nats_server.start)  # returns once it accepts clients
            return stuck, killed, time.monotonic()

        with anyio.fail_after(BUDGET):
            async with client(relay.url, "index-a") as bb:
                load, stuck, killed, served = await crash_under_load(bb, strike)
                async with client(nats_server.url, "index-b") as fresh:
                    await check_nothing_lost(load.usage, bb, fresh)
                    summary = await check_memory_and_streams(load, bb, fresh)
                    early = stored_before(await log_of(bb, "session") | await log_of(bb, "memory"), set(stuck), killed)
    print(f"\nkill -9 of the {hold} server with {len(stuck)} calls stuck on it ({sorted(stuck)}; stored by a try "
          f"that failed: {early}); every session served {served:.2f}s after its return; {summary}; "
          f"{load.usage.summary()}")
    assert not load.usage.untyped, load.usage.untyped[:5]
    if hold == "answers-cut":  # the retries were of stored commands: one of each kind at least
        assert all(any(kind in cid for cid in early) for kind in ("-use-", "-mem-", "-msg-")), early


async def test_a_serve_host_killed_with_commands_memory_writes_and_subscribers_in_flight_loses_and_doubles_nothing(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    urls = nats_cluster.urls
    hosts = [ServeProcess(urls[0], tmp_path, "serve-a")]

    async def strike(load: MixedLoad) -> tuple[list[str], float, float]:
        hosts[0].proc.send_signal(signal.SIGSTOP)
        try:
            stuck = await load.wait_stuck(time.monotonic())
        finally:
            killed = time.time()
            hosts[0].kill()
        hosts.append(ServeProcess(urls[1], tmp_path, "serve-b"))
        await hosts[-1].wait_ready()
        return stuck, killed, time.monotonic()

    try:
        with anyio.fail_after(BUDGET):
            await hosts[0].wait_ready()
            async with AsyncBlackbird(remote=True, nats_url=urls[2], tenant=TENANT, command_timeout=1.0,
                                      embedder=HashEmbedder(), memory_dir=str(tmp_path / "index-a")) as remote:
                load, stuck, killed, served = await crash_under_load(remote, strike)
                async with AsyncBlackbird(nats_url=urls[2], tenant=TENANT, replicas=3, embedder=HashEmbedder(),
                                          memory_dir=str(tmp_path / "index-b")) as fresh:
                    await check_nothing_lost(load.usage, remote, fresh)
                    summary = await check_memory_and_streams(load, remote, fresh)
                    early = stored_before(
                        await log_of(fresh, "session") | await log_of(fresh, "memory"), set(stuck), killed
                    )
        print(f"\nkill -9 of the paused serve host with {len(stuck)} calls stuck on it ({sorted(stuck)}; "
              f"stored by a try that failed: {early}); every session served {served:.2f}s after the new host was "
              f"ready; {summary}; {load.usage.summary()}")
        assert not load.usage.untyped, load.usage.untyped[:5]
        assert hosts[-1].proc.poll() is None
    finally:
        for host in hosts:
            host.close()


async def test_a_memory_write_stored_but_unacknowledged_is_recognised_when_retried_with_its_command_id(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with AnswerCutter(nats_server).running() as relay:
        with anyio.fail_after(BUDGET):
            async with AsyncBlackbird(nats_url=relay.url, tenant=TENANT, command_timeout=2.0,
                                      embedder=HashEmbedder(), memory_dir=str(tmp_path / "index")) as bb:
                s = await bb.session_manager.create_session("u1", tier="enterprise")
                await bb.memory.remember("a first fact", session_id=s.session_id, scope="session")
                relay.cut_after(f"HPUB bb.{TENANT}.memory.".encode())
                outcome: list[BaseException | None] = []

                async def first_try() -> None:
                    try:
                        await bb.memory.remember("the fact in flight", session_id=s.session_id,
                                                 scope="session", command_id="in-flight")
                    except BlackbirdError as exc:
                        outcome.append(exc)
                    else:
                        outcome.append(None)

                async with anyio.create_task_group() as tg:
                    tg.start_soon(first_try)
                    while not relay.cutting:  # its append went by: stored, its answer dropped
                        await anyio.sleep(0.001)
                assert outcome and isinstance(outcome[0], BlackbirdError), outcome  # never acknowledged
                nats_server.kill()
                relay.restore()
                await anyio.to_thread.run_sync(nats_server.start)
                refused: CommandIdReusedError | None = None
                try:
                    memory = await bb.memory.remember("the fact in flight", session_id=s.session_id,
                                                      scope="session", command_id="in-flight")
                except CommandIdReusedError as exc:
                    refused = exc  # raised below, outside the relay's task group (not in a group)
                else:
                    assert memory.text == "the fact in flight"
                log = await log_of(bb, "memory")
                written = [a.command_id for entries in log.values() for _, c in entries for a in c.commands]
                assert written.count("in-flight:0") == 1
                stored = [e.memory_id for entries in log.values() for _, c in entries for a in c.commands
                          if a.command_id == "in-flight:0" for e in a.events if hasattr(e, "sealed")]
                # the retry answers with the memory the first try stored
                assert refused is not None or stored == [memory.memory_id], (stored, memory)
    if refused is not None:
        raise refused
