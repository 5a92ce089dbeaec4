"""Limits stay exact when two actor hosts in two processes race on one session.

Each worker process hosts actors itself (a plain ``AsyncBlackbird``, not ``remote``) on the
test's nats-server. The parent sends a worker one JSON line per step: calls that the worker runs
concurrently, answering with one JSON line of results. Writing a step to two workers releases
them together (they wait on stdin, already connected, the session already active), so the race
needs no sleeps. A caller that loses the optimistic-concurrency race too
often (ConcurrencyConflictError: nothing was applied) retries with the same command id until it
gets an answer, so every call ends allowed or denied.

The limits come from a policy file (same format as ``actors/tiers.toml``) with one tier,
"metered". Every test checks the answers against the log, the truth the state is folded from.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import msgspec
import pytest

from actors.events import (
    Commit,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    SessionCreated,
    SlotAcquired,
    SlotDenied,
    SlotExpired,
    UsageTracked,
)
from actors.ports import AggregateKey
from blackbird import AsyncBlackbird, QuotaExceededError, RateLimitError

from .clock import Clock
from .conftest import TEST_MASTER_KEY, NatsServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

RATE_LIMIT = 37  # api_call per minute
TOKENS = 555  # tokens per day
SLOTS = 7  # concurrent "llm" operations (the default per-operation limit)

POLICY = f"""
version = 1

[tiers.metered]
idle_timeout = 3600
max_age = 86400
quotas.tokens = {{ limit = {TOKENS}, period = 86400 }}
rate_limits.operations.api_call = {{ per_minute = {RATE_LIMIT}, per_day = 1000 }}
rate_limits.operations.llm = {{ per_minute = 1000 }}
concurrency.total = 50
concurrency.default = {SLOTS}
concurrency.operations = {{ file_processing = 1 }}
concurrency.lease_seconds = 300
"""

# argv: nats url, policy file. Prints "ready", then per stdin line (a step: {"calls": [{"op",
# "sid", "id", "amount"?}, ...], "streams": n}) runs the calls in n concurrent streams (default:
# all at once) and prints one JSON line: per call {"id", "ok": result} or {"id", "error": code},
# with "conflicts": how often it was retried after a ConcurrencyConflictError.
WORKER = r"""
import json, sys, anyio, anyio.to_thread, msgspec
from blackbird import AsyncBlackbird, BlackbirdError, ConcurrencyConflictError

async def main():
    url, policy = sys.argv[1], sys.argv[2]
    async with AsyncBlackbird(nats_url=url, tenant="acme", policy_file=policy) as bb:
        sm = bb.session_manager
        calls = {
            "get": lambda c: sm.get_session(c["sid"]),
            "rate": lambda c: sm.enforce_rate_limit(c["sid"], "api_call", command_id=c["id"]),
            "track": lambda c: sm.track_usage(
                c["sid"], "llm", "tokens", c["amount"], command_id=c["id"]),
            "admit": lambda c: sm.admit(
                c["sid"], "llm", {"tokens": c["amount"]}, rate=True, slot=True, command_id=c["id"]),
            "hold": lambda c: sm.manage_concurrency(
                c["sid"], "file_processing", True, lease_seconds=30),
        }

        async def run(call, results, i):
            conflicts = 0
            while True:
                try:
                    value = await calls[call["op"]](call)
                except ConcurrencyConflictError:
                    conflicts += 1  # nothing was applied: retry under the same command id
                    if conflicts <= 200:
                        continue
                    results[i] = {"id": call.get("id"), "error": "gave_up", "conflicts": conflicts}
                    return
                except BlackbirdError as exc:
                    results[i] = {"id": call.get("id"), "error": exc.code, "conflicts": conflicts}
                    return
                ok = msgspec.to_builtins(value)
                results[i] = {"id": call.get("id"), "ok": ok, "conflicts": conflicts}
                return

        async def stream(step, results, next_call):
            while (i := next(next_call, None)) is not None:
                await run(step["calls"][i], results, i)

        print("ready", flush=True)
        while line := await anyio.to_thread.run_sync(sys.stdin.readline):
            step = json.loads(line)
            results = [None] * len(step["calls"])
            next_call = iter(range(len(step["calls"])))
            async with anyio.create_task_group() as tg:
                for _ in range(step.get("streams") or len(step["calls"])):
                    tg.start_soon(stream, step, results, next_call)
            print(json.dumps(results), flush=True)

anyio.run(main)
"""


class Worker:
    """An actor host in a subprocess, driven one step (a list of concurrent calls) at a time."""

    def __init__(self, url: str, policy: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, str(policy)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={"BLACKBIRD_LOG_LEVEL": "error", "PATH": "", "PYTHONPATH": str(REPO),
                 "BLACKBIRD_MASTER_KEY": TEST_MASTER_KEY},
        )

    def send(self, calls: list[dict[str, Any]], streams: int | None = None) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"calls": calls, "streams": streams}) + "\n")
        self.proc.stdin.flush()

    async def _line(self) -> str:
        assert self.proc.stdout is not None
        with anyio.fail_after(60):
            readline = self.proc.stdout.readline
            line = await anyio.to_thread.run_sync(readline, abandon_on_cancel=True)
        assert line, f"worker exited with {self.proc.poll()}"
        return line

    async def ready(self) -> None:
        assert (await self._line()).strip() == "ready"

    async def receive(self) -> list[dict[str, Any]]:
        return json.loads(await self._line())  # type: ignore[no-any-return]

    async def call(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.send(calls)
        return await self.receive()

    def finish(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=30) == 0


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiers.toml"
    path.write_text(POLICY)
    return path


@pytest.fixture
def spawn(nats_server: NatsServer, policy_file: Path) -> Iterator[Callable[[], Worker]]:
    """Start worker processes; any still running at the end of the test is killed."""
    workers: list[Worker] = []

    def start() -> Worker:
        workers.append(Worker(nats_server.url, policy_file))
        return workers[-1]

    yield start
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
        w.proc.wait()


@pytest.fixture
async def parent(nats_server: NatsServer, policy_file: Path) -> AsyncIterator[AsyncBlackbird]:
    url = nats_server.url
    async with AsyncBlackbird(nats_url=url, tenant="acme", policy_file=str(policy_file)) as bb:
        yield bb


async def start_hosts(spawn: Callable[[], Worker], sid: str, n: int = 2) -> list[Worker]:
    """``n`` workers, each connected and with the session activated, ready to be released."""
    workers = [spawn() for _ in range(n)]
    for w in workers:
        await w.ready()
        [got] = await w.call([{"op": "get", "sid": sid}])
        assert got["ok"]["session_id"] == sid
    return workers


#: How each host fires its calls: all at once (the host batches them into a few big commits),
#: or as 10 streams of 10 calls one after another (many small commits, many more appends to race).
#: Both hosts activated the session before the release, so whichever appends second was decided
#: on stale state: its append conflicts, and it must reload and decide again.
SHAPES = pytest.mark.parametrize("streams", [None, 10], ids=["burst", "streams"])


async def race(
    workers: list[Worker], op: str, sid: str, per_worker: int, streams: int | None, **extra: Any
) -> list[dict[str, Any]]:
    """Release every worker at once with ``per_worker`` ``op`` calls each (command ids
    "w<worker>-<i>"); all the answers."""
    for n, w in enumerate(workers):
        calls = [{"op": op, "sid": sid, "id": f"w{n}-{i}", **extra} for i in range(per_worker)]
        w.send(calls, streams)
    answers = [a for w in workers for a in await w.receive()]
    for w in workers:
        w.finish()
    assert len(answers) == per_worker * len(workers)
    assert not [a for a in answers if a.get("error") == "gave_up"]
    return answers


async def history(bb: AsyncBlackbird, sid: str) -> list[Commit]:
    """The session's commits; their versions are gap-free (one writer at a time)."""
    subject = bb.journal.subjects.session("acme", sid)
    commits = [e.commit async for e in bb.journal.entries(subject)]
    assert [c.version for c in commits] == list(range(1, len(commits) + 1))
    return commits


def events_by_command(commits: list[Commit]) -> dict[str, list[Any]]:
    """command id -> the events it caused, after the creation; fails if a command id was
    applied twice. The abuse detector's notifications (a burst of denials is one) are left out:
    they are the hosts' own commands, not the callers'."""
    assert isinstance(commits[0].events[0], SessionCreated)
    commits = commits[1:]
    applied = Counter(cid for c in commits for cid in c.command_ids)
    twice = {cid: n for cid, n in applied.items() if n > 1}
    assert not twice, f"applied more than once: {twice}"
    return {
        a.command_id: list(a.events) for c in commits for a in c.commands
        if not a.command_id.startswith("alert:")
    }


def split(answers: list[dict[str, Any]], denial: str) -> tuple[set[str], set[str]]:
    """(ids of the granted calls, ids of the calls refused with ``denial``): nothing else."""
    allowed = {a["id"] for a in answers if "ok" in a}
    denied = {a["id"] for a in answers if a.get("error") == denial}
    other = [a for a in answers if a["id"] not in allowed | denied]
    assert not other
    assert len(allowed) + len(denied) == len(answers)
    return allowed, denied


def with_event(by_command: dict[str, list[Any]], kind: type) -> set[str]:
    return {cid for cid, events in by_command.items() if any(isinstance(e, kind) for e in events)}


# --------------------------------------------------------------------------- races


@SHAPES
async def test_two_hosts_never_over_admit_rate_limited_calls(
    parent: AsyncBlackbird, spawn: Callable[[], Worker], streams: int | None
) -> None:
    s = await parent.session_manager.create_session("u1", tier="metered")
    hosts = await start_hosts(spawn, s.session_id)

    answers = await race(hosts, "rate", s.session_id, 100, streams=streams)

    allowed, denied = split(answers, "rate_limited")
    assert len(allowed) == RATE_LIMIT
    assert len(denied) == 200 - RATE_LIMIT
    by_command = events_by_command(await history(parent, s.session_id))
    assert set(by_command) == allowed | denied  # every answered call is in the log, once
    rate_allowed = [e for evs in by_command.values() for e in evs if isinstance(e, RateAllowed)]
    assert len(rate_allowed) == RATE_LIMIT
    assert with_event(by_command, RateAllowed) == allowed  # the answers are the log's decisions
    assert all(isinstance(by_command[cid][-1], RateDenied) for cid in denied)
    limits = await parent.session_manager.get_rate_limits(s.session_id)
    assert limits["api_call"]["per_minute"]["remaining"] == 0
    assert limits["api_call"]["per_day"]["remaining"] == 1000 - RATE_LIMIT


@SHAPES
async def test_two_hosts_never_overspend_a_quota(
    parent: AsyncBlackbird, spawn: Callable[[], Worker], streams: int | None
) -> None:
    s = await parent.session_manager.create_session("u1", tier="metered")
    hosts = await start_hosts(spawn, s.session_id)

    answers = await race(hosts, "track", s.session_id, 100, streams=streams, amount=10)

    allowed, denied = split(answers, "quota_exceeded")
    assert len(allowed) == TOKENS // 10 == 55
    tokens = await parent.session_manager.get_quota(s.session_id, "tokens")
    assert tokens["used"] == 550
    assert tokens["remaining"] == 5
    by_command = events_by_command(await history(parent, s.session_id))
    assert set(by_command) == allowed | denied
    assert with_event(by_command, UsageTracked) == allowed
    assert all(isinstance(by_command[cid][-1], QuotaDenied) for cid in denied)
    charged = [e for events in by_command.values() for e in events if isinstance(e, UsageTracked)]
    assert sum(e.amount for e in charged) == 550


@SHAPES
async def test_two_hosts_admit_is_all_or_nothing(
    parent: AsyncBlackbird, spawn: Callable[[], Worker], streams: int | None
) -> None:
    s = await parent.session_manager.create_session("u1", tier="metered")
    hosts = await start_hosts(spawn, s.session_id)

    answers = await race(hosts, "admit", s.session_id, 100, streams=streams, amount=10)

    admitted, denied = split(answers, "rate_limited")  # the concurrency limit is what binds
    assert len(admitted) == SLOTS
    grants = [a["ok"] for a in answers if "ok" in a]
    assert all(g["charged"] == {"tokens": 10.0} and g["lease_id"] for g in grants)
    assert not any(g["duplicate"] for g in grants)
    # every grant was decided on the state after the previous one: fencing tokens never repeat
    assert sorted(g["fencing_token"] for g in grants) == list(range(1, SLOTS + 1))
    assert (await parent.session_manager.get_quota(s.session_id, "tokens"))["used"] == 10 * SLOTS
    session = await parent.session_manager.get_session(s.session_id)
    assert session is not None
    assert session.concurrent_operations == SLOTS
    assert set(session.leases) == {g["lease_id"] for g in grants}

    by_command = events_by_command(await history(parent, s.session_id))
    assert set(by_command) == admitted | denied
    for cid in admitted:  # granted together: usage, a rate admission and a slot
        kinds = [type(e) for e in by_command[cid]]
        assert kinds == [UsageTracked, RateAllowed, SlotAcquired]
    for cid in denied:  # refused together: nothing charged, admitted or leased
        assert [type(e) for e in by_command[cid]] == [SlotDenied]
    rate_logs = await parent.session_manager.get_rate_limits(s.session_id)
    assert rate_logs["llm"]["per_minute"]["remaining"] == 1000 - SLOTS  # denials used no rate


# --------------------------------------------------------------------------- crashes and retries


async def test_a_killed_holders_slot_expires(
    nats_server: NatsServer, policy_file: Path, spawn: Callable[[], Worker]
) -> None:
    clock = Clock()
    options: dict[str, Any] = {"tenant": "acme", "policy_file": str(policy_file), "clock": clock}
    async with AsyncBlackbird(nats_url=nats_server.url, **options) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="metered")
        [holder] = await start_hosts(spawn, s.session_id, 1)
        [held] = await holder.call([{"op": "hold", "sid": s.session_id}])
        assert held["ok"] == 1
        holder.proc.kill()  # SIGKILL: the slot is never given back
        holder.proc.wait()
        events = [e for c in await history(bb, s.session_id) for e in c.events]
        [grant] = [e for e in events if isinstance(e, SlotAcquired)]
        assert grant.expires_at == grant.at + 30  # the holder's own (real) clock

        clock.now = grant.at + 1
        with pytest.raises(RateLimitError):  # the lease is live: file_processing allows one
            await sm.manage_concurrency(s.session_id, "file_processing", True)
        clock.now = grant.expires_at - 0.01
        with pytest.raises(RateLimitError):  # still live just before it ends
            await sm.manage_concurrency(s.session_id, "file_processing", True)
        clock.now = grant.at + 31  # no sleeping: the parent's clock moves on
        assert await sm.manage_concurrency(s.session_id, "file_processing", True) == 1

        events = [e for c in await history(bb, s.session_id) for e in c.events]
    expired = [i for i, e in enumerate(events) if isinstance(e, SlotExpired)]
    assert [events[i].lease_id for i in expired] == [grant.lease_id]
    after = [e for e in events[expired[0] + 1 :] if isinstance(e, SlotAcquired)]
    assert len(after) == 1
    assert after[0].fencing_token > grant.fencing_token
    assert after[0].at == grant.at + 31


async def test_a_retried_command_id_is_counted_once_across_hosts(
    parent: AsyncBlackbird, spawn: Callable[[], Worker]
) -> None:
    s = await parent.session_manager.create_session("u1", tier="metered")
    a, b = await start_hosts(spawn, s.session_id)  # both hold the session, as of now

    [first] = await a.call([{"op": "track", "sid": s.session_id, "id": "c1", "amount": 10}])
    # B's copy of the session predates c1: its retry is decided on stale state and must find out
    [retry] = await b.call([{"op": "track", "sid": s.session_id, "id": "c1", "amount": 10}])
    [again] = await a.call([{"op": "track", "sid": s.session_id, "id": "c1", "amount": 10}])
    a.finish()
    b.finish()

    assert first["ok"] is True and retry["ok"] is True and again["ok"] is True
    assert (await parent.session_manager.get_quota(s.session_id, "tokens"))["used"] == 10
    by_command = events_by_command(await history(parent, s.session_id))
    assert [type(e) for e in by_command["c1"]] == [UsageTracked]
    tracked = [e for events in by_command.values() for e in events if isinstance(e, UsageTracked)]
    assert len(tracked) == 1


async def test_a_retried_denied_command_is_denied_again_across_hosts(
    parent: AsyncBlackbird, spawn: Callable[[], Worker]
) -> None:
    s = await parent.session_manager.create_session("u1", tier="metered")
    a, b = await start_hosts(spawn, s.session_id)
    over = {"op": "track", "sid": s.session_id, "id": "too-much", "amount": TOKENS + 1}
    rate = [{"op": "rate", "sid": s.session_id, "id": f"r{i}"} for i in range(RATE_LIMIT + 1)]

    first = await a.call([over]) + (await a.call(rate))[-1:]  # r37 is one over the limit
    retried = await b.call([over, rate[-1]])  # e.g. after a timeout, from another host
    a.finish()
    b.finish()

    assert [x.get("error") for x in first] == ["quota_exceeded", "rate_limited"]
    assert (await parent.session_manager.get_quota(s.session_id, "tokens"))["used"] == 0
    # A retry must not turn a refusal into a grant: nothing was counted or admitted.
    assert [x.get("error") for x in retried] == ["quota_exceeded", "rate_limited"]


# --------------------------------------------------------------------------- restarts


async def fill_counters(bb: AsyncBlackbird, sid: str) -> None:
    """Usage, rate admissions and a denial, a slot, a reservation."""
    sm = bb.session_manager
    for _ in range(3):
        await sm.track_usage(sid, "llm", "tokens", 25)
    for _ in range(RATE_LIMIT):
        await sm.enforce_rate_limit(sid, "api_call")
    with pytest.raises(RateLimitError):
        await sm.enforce_rate_limit(sid, "api_call")
    await sm.manage_concurrency(sid, "file_processing", True)
    await sm.admit(sid, "llm", {"tokens": 5})
    await sm.reserve(sid, "llm", {"tokens": 100}, hold_seconds=600)
    with pytest.raises(QuotaExceededError):
        await sm.track_usage(sid, "llm", "tokens", 1000)


async def counters(bb: AsyncBlackbird, sid: str) -> dict[str, Any]:
    sm = bb.session_manager
    session = await sm.get_session(sid)
    assert session is not None
    return {
        "quota": await sm.get_quota(sid),
        "rates": await sm.get_rate_limits(sid),  # read against the (fixed) clock, like decisions
        "session": msgspec.to_builtins(session),  # usage, rate logs, leases, reservations, version
    }


@pytest.mark.parametrize("snapshots", ["kept", "purged"])
async def test_restart_keeps_every_counter(
    tmp_path: Path, policy_file: Path, snapshots: str
) -> None:
    clock = Clock()  # fixed: nothing expires or leaves a window between the two openings
    data = tmp_path / "data"
    options: dict[str, Any] = {"tenant": "acme", "policy_file": str(policy_file), "clock": clock}
    snapshot_every = 1 if snapshots == "kept" else 10_000
    async with AsyncBlackbird(data_dir=data, snapshot_every=snapshot_every, **options) as bb:
        s = await bb.session_manager.create_session("u1", tier="metered")
        await fill_counters(bb, s.session_id)
        before = await counters(bb, s.session_id)
        if snapshots == "purged":
            await bb.journal.purge_snapshots()

    async with AsyncBlackbird(data_dir=data, **options) as bb:
        snapshot = await bb.journal.load(AggregateKey("acme", "session", s.session_id))
        if snapshots == "kept":
            assert snapshot is not None and msgspec.msgpack.decode(snapshot)["seq"] > 1
        else:
            assert snapshot is None  # a full replay from the log
        after = await counters(bb, s.session_id)

    assert after == before
    assert before["quota"]["tokens"]["used"] == 80
    assert before["quota"]["tokens"]["reserved"] == 100
    assert before["rates"]["api_call"]["per_minute"]["remaining"] == 0
    assert before["session"]["concurrent_operations"] == 2
    assert len(before["session"]["reservations"]) == 1
