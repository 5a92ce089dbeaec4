"""Projections: a fold plus a checkpoint. Rebuilt equals incremental, a crash mid-batch
resumes to the identical model, two workers never double-apply, reads see the caller's writes,
and every query stays inside its tenant."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from actors.events import (
    Applied,
    ChangeTier,
    CheckRate,
    Commit,
    CreateSession,
    TerminateSession,
    TouchSession,
    TrackUsage,
)
from actors.policy import QuotaType, default_policy
from actors.session import apply_commit, decide, initial_state
from blackbird import AsyncBlackbird, BlackbirdSDK, QuotaExceededError, ValidationError
from blackbird._projections import MemoryCheckpoints, NatsCheckpoints
from projections.activity import Activity, ActivityProjection
from projections.runner import ProjectionRunner

from .conftest import NatsServer

POLICY = default_policy()
T0 = 1_800_000_000.0


# --------------------------------------------------------------------------- pure: the fold


def session_history(commands: list[tuple[str, str, str, Any]]) -> list[tuple[int, str, Commit]]:
    """(tenant, session, user, command) -> the commits the actors would append, in log order."""
    states: dict[tuple[str, str], Any] = {}
    log: list[tuple[int, str, Commit]] = []
    now = T0
    for tenant, sid, user, command in commands:
        now += 1.5
        key = (tenant, sid)
        state = states.get(key) or initial_state(tenant, sid)
        if not state.exists:
            d = decide(state, CreateSession(user_id=user, tier="pro"), now, POLICY)
            c = Commit(at=now, version=state.version + 1, commands=(Applied(f"c{len(log)}", "t", d.events),))
            state = apply_commit(state, c)
            log.append((len(log) + 1, f"bb.{tenant}.session.{sid}", c))
        d = decide(state, command, now, POLICY)
        if d.events:
            c = Commit(at=now, version=state.version + 1,
                       commands=(Applied(f"c{len(log)}", "t", d.events, d.rejection),))
            state = apply_commit(state, c)
            log.append((len(log) + 1, f"bb.{tenant}.session.{sid}", c))
        states[key] = state
    # through the wire, as the log stores and delivers them
    return [(seq, subject, msgspec.json.decode(msgspec.json.encode(c), type=Commit)) for seq, subject, c in log]


commands = st.lists(
    st.tuples(
        st.sampled_from(["acme", "globex"]),
        st.sampled_from(["s1", "s2", "s3"]),
        st.sampled_from(["u1", "u2"]),
        st.one_of(
            st.builds(TrackUsage, operation=st.sampled_from(["llm", "search"]),
                      resource_type=st.sampled_from(list(QuotaType)), amount=st.integers(0, 10**7)),
            st.builds(CheckRate, operation=st.just("api_call")),
            st.just(TouchSession()),
            st.just(ChangeTier(tier="free")),
            st.just(TerminateSession()),
        ),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=120, deadline=None)
@given(commands=commands, data=st.data(), limit=st.integers(2, 50))
def test_rebuild_equals_incremental_with_checkpoints_anywhere(
    commands: list[tuple[str, str, str, Any]], data: st.DataObject, limit: int
) -> None:
    log = session_history(commands)
    # drawn within the log (cuts drawn from 0..80 mostly land past its end: nothing after them)
    inside = st.integers(1, len(log) - 1) if len(log) >= 2 else st.integers(0, len(log))
    cuts = data.draw(st.lists(inside | st.integers(0, len(log)), min_size=1, max_size=4), label="cuts")
    event("a checkpoint inside the log" if any(0 < c < len(log) for c in cuts) else "checkpoints only at the ends")
    projection = ActivityProjection(history_limit=limit)
    rebuilt = projection.initial()
    for seq, subject, commit in log:
        projection.apply(rebuilt, seq, subject, commit)
    # incremental: stop at each cut, checkpoint through msgpack, restore, go on
    model, done = projection.initial(), 0
    for cut in sorted(set(cuts)) + [len(log)]:
        for seq, subject, commit in log[done:cut]:
            projection.apply(model, seq, subject, commit)
        done = max(done, min(cut, len(log)))
        model = msgspec.msgpack.decode(msgspec.msgpack.encode(model), type=Activity)
    assert msgspec.msgpack.encode(model) == msgspec.msgpack.encode(rebuilt)


def test_the_fold_counts_usage_and_refusals_per_user_and_tenant() -> None:
    log = session_history([
        ("acme", "s1", "u1", TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=100)),
        ("acme", "s1", "u1", TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=10**9)),
        ("acme", "s2", "u1", TrackUsage(operation="search", resource_type=QuotaType.API_CALLS, amount=1)),
        ("globex", "s1", "u1", TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=7)),
    ])
    projection = ActivityProjection()
    model = projection.initial()
    for entry in log:
        projection.apply(model, *entry)
    acme = model.tenants["acme"]
    assert acme.users["u1"].counters.resources == {"tokens": 100, "api_calls": 1}
    assert acme.users["u1"].counters.refusals == {"QuotaDenied": 1}
    assert [r.amount for r in acme.users["u1"].history] == [100, 1]
    assert model.tenants["globex"].counters.resources == {"tokens": 7}


# --------------------------------------------------------------------------- the runner on NATS


class CrashAt:
    """The activity fold, except that applying ``seq`` raises once (a process dying mid-batch)."""

    name = "activity"
    model_type = Activity

    def __init__(self, seq: int) -> None:
        self.inner = ActivityProjection()
        self.seq = seq

    def initial(self) -> Activity:
        return self.inner.initial()

    def apply(self, model: Activity, seq: int, subject: str, commit: Commit) -> list[Any]:
        if seq == self.seq:
            raise RuntimeError(f"crash while applying {seq}")
        return self.inner.apply(model, seq, subject, commit)


async def workload(bb: AsyncBlackbird, n: int, tenant: str = "acme") -> None:
    sm = bb.session_manager
    sessions = [await sm.create_session(f"u{i % 3}", tier="pro", tenant=tenant) for i in range(4)]
    for i in range(n):
        s = sessions[i % len(sessions)]
        await sm.track_usage(s.session_id, "llm", "tokens", 10 + i, tenant=tenant)
        if i % 7 == 0:
            await sm.enforce_rate_limit(s.session_id, "api_call", tenant=tenant)


pytestmark_anyio = pytest.mark.anyio


@pytest.mark.anyio
async def test_a_crash_in_the_middle_of_a_batch_resumes_to_the_identical_model(bb: AsyncBlackbird) -> None:
    await workload(bb, 60)
    journal = bb.journal
    checkpoints = await NatsCheckpoints.open(journal, 1, create=True)
    assert checkpoints is not None
    last = await journal.stream_last_seq()
    crashing = ProjectionRunner(CrashAt(last - 10), journal, checkpoints, "bb.>", checkpoint_every=5)
    await crashing.restore()
    with pytest.raises(RuntimeError, match="crash while applying"):
        await crashing.catch_up()  # dies part-way through the replay's batch
    assert crashing.seq == last - 11
    await crashing.checkpoint()  # what it had applied before dying is a consistent checkpoint
    resumed = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>")
    await resumed.restore()
    assert resumed.seq == last - 11
    await resumed.catch_up()
    scratch = await resumed.scratch(last)
    assert resumed.seq == last
    assert resumed.encode() == resumed.encode(scratch)


@pytest.mark.anyio
async def test_two_workers_of_one_projection_never_double_apply(bb: AsyncBlackbird) -> None:
    journal = bb.journal
    checkpoints = await NatsCheckpoints.open(journal, 1, create=True)
    assert checkpoints is not None
    a = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>", checkpoint_every=3, checkpoint_interval=0)
    b = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>", checkpoint_every=4, checkpoint_interval=0)
    async with anyio.create_task_group() as tg:
        await tg.start(a.run)
        await tg.start(b.run)
        await workload(bb, 40)
        last = await journal.stream_last_seq()
        await a.wait_for(last, 10)
        await b.wait_for(last, 10)
        tg.cancel_scope.cancel()
    scratch = await a.scratch(last)
    assert a.encode() == b.encode() == a.encode(scratch)
    stored = await checkpoints.load("activity")
    assert stored is not None and stored.seq == last  # the last one to stop left the newest
    restored = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>")
    await restored.restore()
    assert restored.encode() == a.encode(scratch)


class HeldSaves:
    """The real checkpoint store, with saves held until ``release`` is set."""

    def __init__(self, inner: NatsCheckpoints) -> None:
        self._inner = inner
        self.release = anyio.Event()
        self.started: list[int] = []

    async def load(self, name: str) -> Any:
        return await self._inner.load(name)

    async def peek(self, name: str) -> Any:
        return await self._inner.peek(name)

    async def save(self, name: str, seq: int, data: bytes, token: Any) -> Any:
        self.started.append(seq)
        await self.release.wait()
        return await self._inner.save(name, seq, data, token)


@pytest.mark.anyio
async def test_a_checkpoint_being_saved_does_not_hold_up_the_follower(bb: AsyncBlackbird) -> None:
    """A save waits a round trip (seconds in a saturated process); the follower goes on folding
    meanwhile, and the checkpoint holds the model as of the sequence it was taken at."""
    journal = bb.journal
    inner = await NatsCheckpoints.open(journal, 1, create=True)
    assert inner is not None
    checkpoints = HeldSaves(inner)
    runner = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>", checkpoint_every=1,
                              checkpoint_interval=0)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        await workload(bb, 3)
        first = await journal.stream_last_seq()
        await runner.wait_for(first, 10)
        await workload(bb, 20)  # while the first save is held
        last = await journal.stream_last_seq()
        await runner.wait_for(last, 10)
        assert len(checkpoints.started) == 1 and checkpoints.started[0] < last  # one save at a time
        checkpoints.release.set()
        await workload(bb, 1)  # the next commit may start the next save
        await runner.wait_for(await journal.stream_last_seq(), 10)
        tg.cancel_scope.cancel()
    stored = await inner.load("activity")
    assert stored is not None and stored.seq == runner.seq  # the last save, when it stopped
    restored = ProjectionRunner(ActivityProjection(), journal, inner, "bb.>")
    await restored.restore()
    assert restored.encode() == runner.encode()


class EffectEveryCommit:
    """The activity fold, with the commit's sequence as an effect of every commit."""

    name = "activity"
    model_type = Activity

    def __init__(self) -> None:
        self.inner = ActivityProjection()

    def initial(self) -> Activity:
        return self.inner.initial()

    def apply(self, model: Activity, seq: int, subject: str, commit: Commit) -> list[Any]:
        self.inner.apply(model, seq, subject, commit)
        return [seq]


@pytest.mark.anyio
async def test_effects_being_raised_do_not_hold_up_the_follower(bb: AsyncBlackbird) -> None:
    """An effect that appends waits a round trip; the follower goes on folding meanwhile, and
    every live commit's effect is raised once."""
    journal = bb.journal
    release, all_raised = anyio.Event(), anyio.Event()
    raised: list[int] = []
    expected = [0]

    async def on_effects(effects: list[Any]) -> None:
        await release.wait()
        raised.extend(effects)
        if len(raised) >= expected[0]:
            all_raised.set()

    runner = ProjectionRunner(EffectEveryCommit(), journal, MemoryCheckpoints(), "bb.>", on_effects=on_effects)
    async with anyio.create_task_group() as tg:
        await tg.start(runner.run)
        start = await journal.stream_last_seq()
        await workload(bb, 10)  # fewer commits than effects may run at once: none is waited for
        last = await journal.stream_last_seq()
        await runner.wait_for(last, 10)
        assert raised == []
        expected[0] = last - start
        release.set()
        with anyio.fail_after(10):
            await all_raised.wait()
        tg.cancel_scope.cancel()
    assert sorted(raised) == list(range(start + 1, last + 1))


# --------------------------------------------------------------------------- the API


@pytest.mark.anyio
async def test_reads_include_the_callers_own_writes(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="pro")
    assert await sm.get_usage_history("u1") == []  # starts the projection
    for i in range(20):
        await sm.track_usage(s.session_id, "llm", QuotaType.TOKENS, i + 1, metadata={"i": i})
        history = await sm.get_usage_history("u1", limit=1)
        assert history[0]["metadata"] == {"i": i} and history[0]["amount"] == i + 1
    full = await sm.get_usage_history("u1", limit=100, resource_type="tokens")
    assert [r["amount"] for r in full] == list(range(20, 0, -1))
    assert all(r["resource_type"] == "tokens" and r["session_id"] == s.session_id for r in full)
    assert await sm.get_usage_history("u1", resource_type=QuotaType.API_CALLS) == []
    json.dumps(full)


@pytest.mark.anyio
async def test_usage_history_since_keeps_exactly_the_records_at_or_after_it(nats_server: NatsServer) -> None:
    """``since`` is inclusive: a record stamped exactly at it is kept, one a millisecond before is
    not, and nothing older leaks through (the clock is moved by hand, so the stamps are exact)."""
    now = [T0]
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=lambda: now[0]) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="pro")
        since = T0 + 10
        stamps = [T0 + 1, T0 + 5, since - 0.001, since, since + 0.001, T0 + 12, T0 + 20]
        for i, at in enumerate(stamps):
            now[0] = at
            await sm.track_usage(s.session_id, "llm", QuotaType.TOKENS, i + 1)
        history = await sm.get_usage_history("u1", since=since)
        assert [(r["timestamp"], r["amount"]) for r in history] == [(T0 + 20, 7), (T0 + 12, 6), (since + 0.001, 5),
                                                                    (since, 4)]
        assert [r["amount"] for r in await sm.get_usage_history("u1", since=since, limit=2)] == [7, 6]
        assert [r["amount"] for r in await sm.get_usage_history("u1", since=since - 0.001)] == [7, 6, 5, 4, 3]
        assert await sm.get_usage_history("u1", since=T0 + 21) == []
        assert len(await sm.get_usage_history("u1")) == len(stamps)  # without since: everything


@pytest.mark.anyio
async def test_every_query_stays_inside_its_tenant(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    mine = await sm.create_session("u1", tier="pro", tenant="acme", session_id="same")
    theirs = await sm.create_session("u1", tier="free", tenant="globex", session_id="same")
    await sm.track_usage(mine.session_id, "llm", "tokens", 100, tenant="acme")
    await sm.track_usage(theirs.session_id, "search", "api_calls", 3, tenant="globex")
    assert [s.tier for s in await sm.get_user_sessions("u1", tenant="acme")] == ["pro"]
    assert [s.tier for s in await sm.get_user_sessions("u1", tenant="globex")] == ["free"]
    assert [r["operation"] for r in await sm.get_usage_history("u1", tenant="acme")] == ["llm"]
    assert [r["operation"] for r in await sm.get_usage_history("u1", tenant="globex")] == ["search"]
    acme = await sm.get_statistics(tenant="acme")
    assert (acme["total_sessions"], acme["usage_by_resource"]) == (1, {"tokens": 100})
    assert (await sm.get_user_analytics("u1", tenant="globex"))["resource_usage"] == {"api_calls": 3}
    assert (await sm.get_tenant_analytics(tenant="initech"))["total_sessions"] == 0
    # the operator's cross-tenant view hides tenants with fewer than k users
    hidden = await sm.get_cross_tenant_analytics(k=2)
    assert (hidden["tenants_included"], hidden["tenants_hidden"], hidden["total_users"]) == (0, 2, 0)
    shown = await sm.get_cross_tenant_analytics(k=1)
    assert shown["usage_by_resource"] == {"tokens": 100, "api_calls": 3}
    with pytest.raises(ValidationError):
        await sm.get_cross_tenant_analytics(k=0)
    with pytest.raises(ValidationError):
        await sm.get_usage_history("u1", limit=0)
    with pytest.raises(ValidationError):
        await sm.get_usage_history("u.1")


@pytest.mark.anyio
async def test_verify_passes_after_a_long_mixed_workload_and_a_restart(tmp_path: Path) -> None:
    async with AsyncBlackbird(data_dir=tmp_path / "d", tenant="acme") as bb:
        sm = bb.session_manager
        await sm.get_statistics()  # the projection follows live from here on
        await sm.set_tenant_policy({"tiers": {"free": {"quotas": {"tokens": {"limit": 500}}}}})
        sessions = [await sm.create_session(f"u{i % 4}", tier=("free", "pro")[i % 2]) for i in range(8)]
        for i in range(150):
            s = sessions[i % len(sessions)]
            try:
                await sm.track_usage(s.session_id, ("llm", "search")[i % 2], "tokens", 40)
            except QuotaExceededError:
                pass
            if i % 11 == 0:
                held = await sm.reserve(s.session_id, "llm", {"tokens": 5})
                await sm.settle(s.session_id, held.reservation_id, {"tokens": 3})
        await sm.change_tier(sessions[0].session_id, "enterprise")
        await sm.terminate_session(sessions[1].session_id)
        assert await bb.projections.verify() == {"abuse": [], "activity": [], "graph": []}
        before = await sm.get_statistics()
        analytics = await sm.get_user_analytics("u0")
    async with AsyncBlackbird(data_dir=tmp_path / "d", tenant="acme") as bb:
        sm = bb.session_manager
        after = await sm.get_statistics()  # restored from the checkpoint, then caught up
        assert {k: v for k, v in after.items() if k != "projection_lag"} == {
            k: v for k, v in before.items() if k != "projection_lag"
        }
        assert await sm.get_user_analytics("u0") == analytics
        assert await bb.projections.verify() == {"abuse": [], "activity": [], "graph": []}


def test_seed_analytics_monitor_and_prediction_examples_run_on_the_sync_facade() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        sm = sdk.session_manager
        s = sm.create_session("user123", tier="pro")
        sm.create_session("user123", tier="basic")
        for _ in range(4):
            sm.track_usage(s.session_id, "ai_inference", QuotaType.TOKENS, 150)
        sm.track_usage(s.session_id, "send_message", QuotaType.API_CALLS, 1)

        sessions = sm.get_user_sessions("user123")
        usage_history = sm.get_usage_history("user123", limit=1000)
        operation_counts: dict[str, int] = {}
        resource_usage: dict[str, float] = {}
        for record in usage_history:
            operation_counts[record["operation"]] = operation_counts.get(record["operation"], 0) + 1
            resource_usage[record["resource_type"]] = resource_usage.get(record["resource_type"], 0) + record["amount"]
        analytics = {
            "total_sessions": len(sessions),
            "active_sessions": len([x for x in sessions if x.is_active]),
            "operation_breakdown": operation_counts,
            "resource_usage": resource_usage,
            "most_used_operation": max(operation_counts, key=operation_counts.get),  # type: ignore[arg-type]
        }
        assert analytics == {
            "total_sessions": 2, "active_sessions": 2,
            "operation_breakdown": {"ai_inference": 4, "send_message": 1},
            "resource_usage": {"tokens": 600, "api_calls": 1}, "most_used_operation": "ai_inference",
        }
        stats = sm.get_statistics()
        json.dumps({"system_stats": stats, "timestamp": time.time()})
        assert stats["active_sessions"] == 2 and stats["average_sessions_per_user"] == 2.0

        # QuotaManager.predict_quota_exhaustion, as the seed writes it
        predictions = {}
        for quota_type, quota_info in sm.get_quota(s.session_id).items():
            remaining = quota_info["remaining"]
            recent = [r for r in usage_history if r["resource_type"] == quota_type]
            if remaining > 0 and recent:
                avg_rate = len(recent) / len(usage_history)
                predictions[quota_type] = {"time_to_exhaustion_hours": remaining / avg_rate}
        assert set(predictions) == {"tokens", "api_calls"}
        # ours: from the usage rate per unit of time
        ours = sm.predict_quota_exhaustion(s.session_id)
        assert ours["tokens"]["rate_per_hour"] == pytest.approx(600 * 60)  # 600 in the first minute
        assert ours["tokens"]["predicted_exhaustion"] > time.time()


async def alerts_on(bb: AsyncBlackbird, tenant: str, user_id: str, count: int) -> list[Any]:
    """Wait (event-driven: following the user's log) until ``count`` alerts are in it."""
    from actors.events import AlertRaised

    subject = f"bb.{tenant}.user.{user_id}"
    found: list[Any] = []
    with anyio.fail_after(10):
        async for entry in bb.journal.follow(subject):
            found += [e for e in entry.commit.events if isinstance(e, AlertRaised)]
            if len(found) >= count:
                return found
    return found


@pytest.mark.anyio
async def test_a_usage_spike_raises_an_alert_in_the_log_and_on_the_sessions_channel(nats_server: NatsServer) -> None:
    from actors.events import MessagePosted

    now = [T0]
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=lambda: now[0]) as bb:
        sm = bb.session_manager
        steady = await sm.create_session("calm", tier="enterprise")
        spiky = await sm.create_session("greedy", tier="enterprise")
        for _minute in range(8):  # steady use: 60 tokens a minute for both
            for _ in range(6):
                now[0] += 10
                await sm.track_usage(steady.session_id, "llm", "tokens", 10)
                await sm.track_usage(spiky.session_id, "llm", "tokens", 10)
        now[0] += 10
        await sm.track_usage(spiky.session_id, "llm", "tokens", 100_000)  # a spike
        (alert,) = await alerts_on(bb, "acme", "greedy", 1)
        assert (alert.kind, alert.session_id) == ("usage_spike", spiky.session_id)
        assert alert.value > alert.threshold
        subject = bb.journal.subjects.session("acme", spiky.session_id)
        with anyio.fail_after(10):
            async for entry in bb.journal.follow(subject):
                notes = [e for e in entry.commit.events if isinstance(e, MessagePosted)]
                if notes:
                    assert notes[0].channel == "notification" and notes[0].metadata["alert"] == "usage_spike"
                    break
        calm = [e async for e in bb.journal.entries("bb.acme.user.calm")]
        assert not [e for entry in calm for e in entry.commit.events if type(e).__name__ == "AlertRaised"]
        assert (await sm.get_user_analytics("greedy"))["alerts"] == 1
        assert (await sm.get_statistics())["alerts"] == 1


@pytest.mark.anyio
async def test_a_burst_of_denials_is_flagged_and_thresholds_are_configurable(nats_server: NatsServer) -> None:
    now = [T0]  # stands still: the six calls fall in one second however slow the machine
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", abuse={"denial_burst": 5}, clock=lambda: now[0]
    ) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="free")  # api_call: 1 per second
        await sm.enforce_rate_limit(s.session_id, "api_call")
        for _ in range(5):
            with pytest.raises(Exception, match="rate limit"):
                await sm.enforce_rate_limit(s.session_id, "api_call")
        (alert,) = await alerts_on(bb, "acme", "u1", 1)
        assert alert.kind == "denial_burst" and alert.value >= 5
