"""Automatic passivation: a host drops the actors idle for ``passivate_after`` seconds on its own
(no call asks it to), and a passivated session comes back on its next command from its latest
snapshot plus the commits after it, with the same state it had and the same sequence."""

from __future__ import annotations

import gc
import time
import tracemalloc

import anyio
import msgspec
import pytest

from actors.ports import AggregateKey
from blackbird import AsyncBlackbird, QuotaType

from .clock import Clock
from .conftest import NatsServer

pytestmark = pytest.mark.anyio

PASSIVATE_AFTER = 0.3  # seconds idle before the host drops an actor (checked every quarter of it)
DROPPED_WITHIN = 5.0  # seconds we wait for it at most


async def _wait_for_active(bb: AsyncBlackbird, wanted: int) -> float:
    host = bb.host
    assert host is not None
    started = time.monotonic()
    while host.active_actors != wanted:
        if time.monotonic() - started > DROPPED_WITHIN:
            pytest.fail(f"{host.active_actors} actors active after {DROPPED_WITHIN}s, expected {wanted}")
        await anyio.sleep(0.02)
    return time.monotonic()


async def test_idle_session_actors_are_passivated_by_the_host_and_come_back_with_the_same_state(
    nats_server: NatsServer,
) -> None:
    clock = Clock()
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", clock=clock, passivate_after=PASSIVATE_AFTER, snapshot_every=4,
    ) as bb:
        sm = bb.session_manager
        host = bb.host
        assert host is not None
        # two sessions, so that the state of each must come back from its own snapshot and log
        first = await sm.create_session("u1", tier="pro", metadata={"team": "a"})
        second = await sm.create_session("u2", tier="basic")
        for n in range(4):  # nine commits: snapshots after the 4th and the 8th, then a tail of one
            clock.now += 1
            await sm.touch_session(first.session_id, f"op{n}")
            await sm.track_usage(first.session_id, "llm", QuotaType.TOKENS, 10 + n)
        await sm.change_tier(second.session_id, "pro")  # two commits: no snapshot, the log only
        before = [msgspec.to_builtins(await sm.get_session(s.session_id)) for s in (first, second)]
        quota_before = await sm.get_quota(first.session_id)
        last_used = time.monotonic()
        assert host.active_actors == 2

        # the first comes back from a snapshot plus its tail, the second from its log alone
        deadline = time.monotonic() + DROPPED_WITHIN  # the host saves snapshots in the background
        while await bb.journal.load(AggregateKey("acme", "session", first.session_id)) is None:
            assert time.monotonic() < deadline, "no snapshot of the first session"
            await anyio.sleep(0.02)
        assert await bb.journal.load(AggregateKey("acme", "session", second.session_id)) is None

        dropped = await _wait_for_active(bb, 0)  # nobody asked: the host's own loop dropped them
        assert dropped - last_used >= PASSIVATE_AFTER * 0.8  # not before they were idle that long

        after = [msgspec.to_builtins(await sm.get_session(s.session_id)) for s in (first, second)]
        assert host.active_actors == 2  # activated again by those reads
        assert after == before
        assert await sm.get_quota(first.session_id) == quota_before
        # and the reloaded actor goes on from where it was: the next command is its next version
        clock.now += 1
        touched = await sm.touch_session(first.session_id, "again")
        assert touched.sequence > before[0]["sequence"] and touched.version == before[0]["version"] + 1
        assert (await sm.get_quota(first.session_id))["tokens"]["used"] == quota_before["tokens"]["used"]


MANY = 5_000  # sessions created, then passivated all at once
# what one active session may cost the hosts themselves: two actors (the session's and its user's),
# each an _Actor, its mailbox and its table slot, and the states the host allocated (measured:
# about 750; a deque mailbox and a bound logger per actor made it about 3,000)
SESSION_BYTES = 1_000
LEFT_BEHIND = 64 * 1024  # bytes the host may keep in all once every one of them is passivated


def _host_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still allocated by actors/host.py (the host's tables and actors, not the states)."""
    host_only = snapshot.filter_traces([tracemalloc.Filter(True, "*actors/host.py")])
    return sum(s.size for s in host_only.statistics("filename"))


async def test_passivated_sessions_leave_nothing_behind_in_the_host(nats_server: NatsServer) -> None:
    """5,000 sessions, each touched once, then passivated: the host keeps no actor, no mailbox
    and no table slot for any of them (its actor table is compacted), and while they were active
    each cost the hosts at most SESSION_BYTES (counted with tracemalloc, not timed)."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", passivate_after=float("inf")) as bb:
        sm = bb.session_manager
        host = bb.host
        assert host is not None
        limiter = anyio.CapacityLimiter(200)

        async def one(n: int) -> None:
            async with limiter:
                session = await sm.create_session(f"u{n}", tier="pro")
                await sm.touch_session(session.session_id)

        tracemalloc.start(1)
        try:
            before = _host_bytes(tracemalloc.take_snapshot())
            async with anyio.create_task_group() as tg:
                for n in range(MANY):
                    tg.start_soon(one, n)
            gc.collect()
            active = _host_bytes(tracemalloc.take_snapshot()) - before
            assert host.active_actors == MANY
            assert active / MANY <= SESSION_BYTES, f"{active / MANY:.0f} bytes per active session in the hosts"

            assert bb.passivate_idle(0) >= 2 * MANY  # the sessions and their users
            gc.collect()
            assert host.active_actors == 0
            left = _host_bytes(tracemalloc.take_snapshot()) - before
            assert left <= LEFT_BEHIND, f"{left} bytes left in the host after passivating {MANY} sessions"
        finally:
            tracemalloc.stop()
        # they come back on demand, as they were
        session = await sm.touch_session((await sm.create_session("again", tier="pro")).session_id)
        assert session.status.value == "active"
