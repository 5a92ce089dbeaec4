"""Supervision: a fault in one aggregate (deciding, applying, encoding, snapshotting, replaying)
fails that command (or skips that snapshot) with a typed error and one log line naming the
aggregate and the stage; the host, its other actors and the aggregate's next good commands go on.

Faults are injected by wrapping the real session behaviour (:class:`FaultInjecting`): it
delegates everything to a real ``SessionBehaviour`` and raises, or produces a value the log
cannot store, only for commands and events marked ``operation="poison"``. Everything else is
real: nats-server, JetStream, the snapshot KV bucket, the actor host, the command service.
A host whose task group had died would hang the next call (every call below runs under a
deadline) and re-raise the task's error when its ``async with`` block exits (each test leaves
the block normally).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import msgspec
import nats
import pytest
from structlog.testing import capture_logs

from actors.events import (
    Applied,
    Commit,
    CreateSession,
    Decision,
    Event,
    GetSession,
    Rejection,
    SessionTouched,
    TouchSession,
)
from actors.host import ActorHost, Outcome
from actors.idempotency import Seen
from actors.ports import AggregateKey, NoSnapshots, SnapshotStore
from actors.session import SessionBehaviour, SessionState
from blackbird import AggregateFaultError, AsyncBlackbird
from blackbird.commands.dispatch import LocalDispatcher, ask_or_raise
from blackbird.commands.service import CommandService

from .conftest import NatsServer

pytestmark = pytest.mark.anyio

POISON = "poison"
DEADLINE = 20.0  # seconds; a call that hangs (a dead host) fails the test instead


class Injected(Exception):
    """The fault a test injects (a stand-in for any bug in an aggregate's pure logic)."""


def _poisoned(events: tuple[Event, ...]) -> bool:
    return any(isinstance(e, SessionTouched) and e.operation == POISON for e in events)


class FaultInjecting:
    """A real :class:`SessionBehaviour`, wrapped to fail at ``stage`` for poison commands:

    * ``decide``: deciding a poison touch raises;
    * ``apply``: folding its event (``SessionTouched(operation="poison")``) into the state raises;
    * ``encode``: its decision carries an event the log's JSON encoder cannot encode;
    * ``snapshot``: its event leaves an int beyond 64 bits in the state (msgpack, the snapshot
      format, cannot hold it; the log's JSON can), so every later snapshot fails to encode;
    * ``replay``: folding a commit that holds its event raises (the log is fine; the fold
      written for it is not), so the aggregate cannot be activated.
    """

    def __init__(self, inner: SessionBehaviour, stage: str) -> None:
        self.inner = inner
        self.stage = stage
        self.state_type = inner.state_type

    def initial_state(self, key: AggregateKey) -> SessionState:
        return self.inner.initial_state(key)

    def decide(self, state: SessionState, command: Any, now: float) -> Decision:
        poison = isinstance(command, TouchSession) and command.operation == POISON
        if poison and self.stage == "decide":
            raise Injected("decide")
        decision = self.inner.decide(state, command, now)
        if poison and self.stage == "encode":
            return Decision(events=(SessionTouched(at=now, operation="\ud800 lone surrogate"),))
        return decision

    def _after(self, state: SessionState, events: tuple[Event, ...]) -> SessionState:
        if self.stage == "snapshot" and _poisoned(events):
            return msgspec.structs.replace(state, metadata={"n": 2**80})
        return state

    def apply_commands(self, state: SessionState, applied: tuple[Applied, ...]) -> SessionState:
        events = tuple(e for a in applied for e in a.events)
        if self.stage == "apply" and _poisoned(events):
            raise Injected("apply")
        return self._after(self.inner.apply_commands(state, applied), events)

    def apply_commit(self, state: SessionState, commit: Commit) -> SessionState:
        if self.stage == "replay" and _poisoned(commit.events):
            raise Injected("replay")
        return self._after(self.inner.apply_commit(state, commit), commit.events)

    def has_seen(self, state: SessionState, command_id: str, digest: str) -> Seen:
        return self.inner.has_seen(state, command_id, digest)

    def refusal(self, state: SessionState, command_id: str) -> Rejection | None:
        return self.inner.refusal(state, command_id)

    def version(self, state: SessionState) -> int:
        return self.inner.version(state)


def key(session_id: str) -> AggregateKey:
    return AggregateKey("acme", "session", session_id)


@asynccontextmanager
async def faulty_host(
    bb: AsyncBlackbird, stage: str, snapshots: SnapshotStore | None = None, **options: Any
) -> AsyncIterator[ActorHost]:
    """A real actor host on ``bb``'s log, serving the wrapped session behaviour."""
    behaviour = FaultInjecting(SessionBehaviour(bb.policy), stage)
    async with ActorHost(behaviour, bb.journal, snapshots or NoSnapshots(), **options) as host:
        yield host


async def ask(host: ActorHost, session_id: str, command: Any, command_id: str) -> Outcome:
    with anyio.fail_after(DEADLINE):
        return await host.ask(key(session_id), command, command_id, "tester")


async def create(host: ActorHost, *session_ids: str) -> None:
    for sid in session_ids:
        outcome = await ask(host, sid, CreateSession(user_id="u1"), f"create-{sid}")
        assert outcome.rejection is None


async def logged_ids(bb: AsyncBlackbird, session_id: str) -> list[str]:
    """Every command id in the session's log, in order."""
    commits = await bb.journal.read(key(session_id), 0)
    return [cid for _, commit in commits for cid in commit.command_ids]


@contextmanager
def fault_lines() -> Iterator[list[dict[str, Any]]]:
    """The log lines the host writes about faults, while the block runs."""
    with capture_logs() as lines:
        yield lines
    lines[:] = [line for line in lines if line["event"] in ("aggregate_fault", "snapshot_failed")]


def assert_fault(outcome: Outcome, session_id: str, stage: str) -> None:
    assert outcome.rejection is not None and outcome.rejection.code == "aggregate_fault", outcome.rejection
    assert outcome.rejection.fields["aggregate"] == f"acme/session/{session_id}"
    assert outcome.rejection.fields["stage"] == stage
    assert "Injected" in str(outcome.rejection.fields["error"]) or stage == "encode"


async def busy_elsewhere(host: ActorHost, session_ids: list[str], n: int, done: list[str]) -> None:
    """Touch each of ``session_ids`` ``n`` times, concurrently, recording each success."""

    async def touch(sid: str, i: int) -> None:
        outcome = await ask(host, sid, TouchSession(operation="work"), f"{sid}-work-{i}")
        assert outcome.rejection is None
        done.append(f"{sid}-work-{i}")

    async with anyio.create_task_group() as tg:
        for i in range(n):
            for sid in session_ids:
                tg.start_soon(touch, sid, i)


STAGES = ["decide", "apply", "encode"]


@pytest.mark.parametrize("stage", STAGES)
async def test_a_fault_while_handling_one_command_fails_only_that_command(
    bb: AsyncBlackbird, stage: str
) -> None:
    async with faulty_host(bb, stage) as host:
        await create(host, "s1", "s2", "s3")
        before = await logged_ids(bb, "s1")
        done: list[str] = []
        outcomes: list[Outcome] = []

        async def poison() -> None:
            outcomes.append(await ask(host, "s1", TouchSession(operation=POISON), "bad-1"))

        with fault_lines() as lines:
            async with anyio.create_task_group() as tg:  # other aggregates work meanwhile
                tg.start_soon(busy_elsewhere, host, ["s2", "s3"], 20, done)
                tg.start_soon(poison)
        (outcome,) = outcomes
        assert_fault(outcome, "s1", stage)
        assert len(done) == 40
        # one log line, naming the aggregate and the stage
        (line,) = lines
        assert line["event"] == "aggregate_fault" and line["log_level"] == "error"
        assert (line["tenant"], line["kind"], line["id"], line["stage"]) == ("acme", "session", "s1", stage)
        assert line["command_id"] == "bad-1"
        # nothing was appended for it, and the same aggregate serves the next good command
        assert await logged_ids(bb, "s1") == before
        good = await ask(host, "s1", TouchSession(operation="fine"), "good-1")
        assert good.rejection is None and good.state.version == 2
        assert await logged_ids(bb, "s1") == [*before, "good-1"]
        # a retry of the faulted command faults again (it was never recorded as seen)
        assert_fault(await ask(host, "s1", TouchSession(operation=POISON), "bad-1"), "s1", stage)


@pytest.mark.parametrize("stage", STAGES)
async def test_a_fault_in_a_batch_fails_only_its_own_command_and_the_batch_goes_on(
    bb: AsyncBlackbird, stage: str
) -> None:
    async with faulty_host(bb, stage) as host:
        await create(host, "s1")
        outcomes: dict[str, Outcome] = {}

        async def send(command_id: str, operation: str) -> None:
            outcomes[command_id] = await ask(host, "s1", TouchSession(operation=operation), command_id)

        # The first command runs at once; the others queue while its append is in flight and
        # are drained as one batch, the poison command in its middle.
        plan = [("g0", "fine"), ("g1", "fine"), ("bad", POISON), ("g2", "fine"), ("g3", "fine")]
        with fault_lines() as lines:
            async with anyio.create_task_group() as tg:
                for command_id, operation in plan:
                    tg.start_soon(send, command_id, operation)
        assert_fault(outcomes["bad"], "s1", stage)
        assert all(outcomes[c].rejection is None for c in ("g0", "g1", "g2", "g3"))
        assert len(lines) == 1 and lines[0]["stage"] == stage
        commits = await bb.journal.read(key("s1"), 0)
        logged = [cid for _, c in commits for cid in c.command_ids]
        assert sorted(logged) == ["create-s1", "g0", "g1", "g2", "g3"]  # bad: not appended
        assert max(len(c.commands) for _, c in commits) >= 2  # the queued ones went as a batch
        after = await ask(host, "s1", GetSession(), "get-1")
        assert after.rejection is None and after.state.version == len(commits)


@pytest.mark.parametrize(
    ("command", "command_id"),
    [(TouchSession(operation="\ud800"), "bad-1"), (TouchSession(operation="fine"), "bad-\udc00")],
    ids=["command", "command_id"],
)
async def test_a_command_or_id_the_log_cannot_encode_fails_alone_before_anything_is_appended(
    bb: AsyncBlackbird, command: TouchSession, command_id: str
) -> None:
    # No wrapper here: the host receives input no JSON can hold (the validation boundary refuses
    # it before the host; the host must not depend on that).
    async with faulty_host(bb, "none") as host:
        await create(host, "s1")
        outcomes: dict[str, Outcome] = {}

        async def send(name: str, cmd: TouchSession, cid: str) -> None:
            outcomes[name] = await ask(host, "s1", cmd, cid)

        with fault_lines() as lines:
            async with anyio.create_task_group() as tg:
                tg.start_soon(send, "g0", TouchSession(operation="fine"), "g0")
                tg.start_soon(send, "g1", TouchSession(operation="fine"), "g1")
                tg.start_soon(send, "bad", command, command_id)
                tg.start_soon(send, "g2", TouchSession(operation="fine"), "g2")
        assert_fault(outcomes["bad"], "s1", "encode")
        assert [outcomes[n].rejection for n in ("g0", "g1", "g2")] == [None, None, None]
        assert [(line["stage"], line["id"]) for line in lines] == [("encode", "s1")]
        assert sorted(await logged_ids(bb, "s1")) == ["create-s1", "g0", "g1", "g2"]


async def test_a_state_that_cannot_be_snapshotted_skips_the_snapshot_and_the_host_goes_on(
    bb: AsyncBlackbird,
) -> None:
    # The poison session: an int beyond 64 bits in its state made the snapshot's
    # msgpack encode raise OverflowError inside the host's task group, which stopped the host.
    async with faulty_host(bb, "snapshot", snapshots=bb.journal, snapshot_every=3) as host:
        await create(host, "s1", "s2")
        with fault_lines() as lines:
            await ask(host, "s1", TouchSession(operation=POISON), "poison-1")
            for i in range(3):  # past snapshot_every: a snapshot task starts in the task group
                assert (await ask(host, "s1", TouchSession(), f"t{i}")).rejection is None
            with anyio.fail_after(DEADLINE):
                while not lines:  # the background snapshot task reports its failure
                    await anyio.sleep(0.01)
        (line,) = lines
        assert line["event"] == "snapshot_failed" and line["stage"] == "snapshot_encode"
        assert (line["tenant"], line["kind"], line["id"]) == ("acme", "session", "s1")
        assert "OverflowError" in line["error"]
        # the host goes on: the poisoned session, the others, and the background tasks
        done: list[str] = []
        await busy_elsewhere(host, ["s1", "s2"], 10, done)
        assert len(done) == 20
        assert await bb.journal.load(key("s1")) is None  # no snapshot was written
    # A restart reads the session from its log (no snapshot) and serves it.
    async with faulty_host(bb, "snapshot", snapshots=bb.journal, snapshot_every=3) as host:
        outcome = await ask(host, "s1", GetSession(), "get-after-restart")
        assert outcome.rejection is None and outcome.state.metadata == {"n": 2**80}
        assert (await ask(host, "s1", TouchSession(), "t-after")).rejection is None


async def test_a_snapshot_that_cannot_be_saved_is_skipped_and_the_host_goes_on(
    nats_server: NatsServer,
) -> None:
    # A real fault of the store: the snapshot bucket is deleted under the running host. Each save
    # is retried until the command timeout (a missing bucket looks like one not reachable yet),
    # so a short timeout keeps the test short.
    async with (
        AsyncBlackbird(nats_url=nats_server.url, tenant="acme", command_timeout=1.0) as bb,
        faulty_host(bb, "none", snapshots=bb.journal, snapshot_every=2) as host,
    ):
        await create(host, "s1", "s2")
        await bb.journal.jetstream.delete_key_value(bb.settings.snapshot_bucket)
        with fault_lines() as lines:
            for i in range(2):
                assert (await ask(host, "s1", TouchSession(), f"t{i}")).rejection is None
            with anyio.fail_after(DEADLINE):
                while not lines:
                    await anyio.sleep(0.01)
            await host.snapshot_all()  # the same fault, met by a direct call: it is not raised
        assert {line["stage"] for line in lines} == {"snapshot_save"}
        assert lines[0]["id"] == "s1" and lines[0]["log_level"] == "warning"
        assert {line["id"] for line in lines[1:]} == {"s1", "s2"}  # snapshot_all: both had commits
        done: list[str] = []
        await busy_elsewhere(host, ["s1", "s2"], 10, done)
        assert len(done) == 20


async def test_an_aggregate_that_cannot_be_replayed_fails_its_commands_and_only_them(
    bb: AsyncBlackbird,
) -> None:
    # The log holds a commit the (wrapped) fold cannot apply: written by a host whose fold could.
    async with faulty_host(bb, "none") as host:
        await create(host, "s1", "s2")
        await ask(host, "s1", TouchSession(operation=POISON), "poison-1")
    before = await logged_ids(bb, "s1")
    async with faulty_host(bb, "replay") as host:
        outcomes: list[Outcome] = []

        async def read_s1() -> None:
            outcomes.append(await ask(host, "s1", GetSession(), "get-s1"))

        done: list[str] = []
        with fault_lines() as lines:
            async with anyio.create_task_group() as tg:
                tg.start_soon(busy_elsewhere, host, ["s2"], 20, done)
                tg.start_soon(read_s1)
        (outcome,) = outcomes
        assert_fault(outcome, "s1", "replay")
        assert len(done) == 20
        (line,) = lines
        assert (line["tenant"], line["kind"], line["id"], line["stage"]) == ("acme", "session", "s1", "replay")
        # every later command to it fails the same way, at once (no hang, no crash)
        for i in range(3):
            assert_fault(await ask(host, "s1", TouchSession(), f"t{i}"), "s1", "replay")
        assert await logged_ids(bb, "s1") == before
        with pytest.raises(AggregateFaultError) as caught:
            with anyio.fail_after(DEADLINE):
                await ask_or_raise(host, key("s1"), TouchSession(), "t-sdk", "tester")
        assert caught.value.stage == "replay" and caught.value.aggregate == "acme/session/s1"
        assert (await ask(host, "s2", TouchSession(), "s2-after")).rejection is None


@pytest.mark.parametrize("stage", [*STAGES, "snapshot"])
async def test_the_sdk_raises_aggregate_fault_error_and_serve_keeps_serving(
    bb: AsyncBlackbird, nats_server: NatsServer, stage: str
) -> None:
    # `blackbird serve`'s stack (a command service answering on NATS for an actor host) over the
    # wrapped behaviour; a remote SDK client sends the commands. For "snapshot" this is the
    # issue's poison session end to end: before, the failed snapshot stopped the host and every
    # later call, for any session, hung.
    nc = await nats.connect(nats_server.url)
    try:
        async with (
            faulty_host(bb, stage, snapshots=bb.journal, snapshot_every=3) as host,
            anyio.create_task_group() as tg,
        ):
            service = CommandService(nc, bb.journal.subjects, LocalDispatcher(host), "supervision-test")
            await tg.start(service.run)
            async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", remote=True) as client:
                sm = client.session_manager
                with anyio.fail_after(DEADLINE), fault_lines() as lines:
                    await sm.create_session("u1", session_id="s1")
                    await sm.create_session("u2", session_id="s2")
                    if stage == "snapshot":
                        await sm.touch_session("s1", POISON, command_id="bad-1")
                        for _ in range(3):
                            await sm.touch_session("s1", "fine")
                        while not lines:  # the background snapshot task reports its failure
                            await anyio.sleep(0.01)
                    else:
                        with pytest.raises(AggregateFaultError) as caught:
                            await sm.touch_session("s1", POISON, command_id="bad-1")
                        assert caught.value.stage == stage
                        assert caught.value.aggregate == "acme/session/s1"
                        assert caught.value.code == "aggregate_fault"
                    # the same session and another one keep being served
                    for _ in range(5):
                        assert (await sm.touch_session("s1", "fine")).session_id == "s1"
                        assert (await sm.touch_session("s2", "fine")).session_id == "s2"
                    assert (await sm.get_session("s1")) is not None
                expected = "snapshot_encode" if stage == "snapshot" else stage
                assert {(line["id"], line["stage"]) for line in lines} == {("s1", expected)}
                # one line per fault (a snapshot is tried again every snapshot_every commits)
                assert len(lines) == 1 or stage == "snapshot"
                assert "exc_info" not in lines[0]  # one line: type, message and place as fields
            assert ("bad-1" in await logged_ids(bb, "s1")) == (stage == "snapshot")
            tg.cancel_scope.cancel()
    finally:
        await nc.close()
