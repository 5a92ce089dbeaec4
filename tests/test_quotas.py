"""Quotas, rate limits, concurrency, admission and tenant policies on a real nats-server:
the seed's examples, durability of every decision, tenant walls and bad input."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from pathlib import Path

import anyio
import pytest

from actors.events import QuotaDenied, RateAllowed, RateDenied, UsageTracked
from blackbird import (
    AsyncBlackbird,
    BlackbirdSDK,
    QuotaExceededError,
    QuotaType,
    RateLimitError,
    RateLimitType,
    SessionExistsError,
    SessionLimitError,
    SessionNotFoundError,
    UsageRecord,
    ValidationError,
)
from blackbird.errors import ReservationNotFoundError

from .clock import Clock
from .conftest import NatsServer

pytestmark = pytest.mark.anyio


async def events_of(bb: AsyncBlackbird, tenant: str, session_id: str) -> list[object]:
    subject = bb.journal.subjects.session(tenant, session_id)
    return [e for entry in [x async for x in bb.journal.entries(subject)] for e in entry.commit.events]


# --------------------------------------------------------------------------- the seed's examples


def test_seed_quota_examples_run_on_the_sync_facade(capsys: pytest.CaptureFixture[str]) -> None:
    sdk = BlackbirdSDK(development_mode=True)
    try:
        session = sdk.session_manager.create_session(user_id="user123", tier="pro")
        quotas = sdk.session_manager.get_quota(session.session_id)
        for quota_type, info in quotas.items():
            print(f"  {quota_type}: Used: {info['used']}/{info['limit']} Remaining: {info['remaining']} "
                  f"Usage: {info['usage_percentage']:.1f}%")
        api_quota = sdk.session_manager.get_quota(session.session_id, QuotaType.API_CALLS)
        assert api_quota["limit"] == 10_000 and api_quota["used"] == 0

        def track_operation_usage(session_id, operation_name, resource_type, amount):  # type: ignore[no-untyped-def]
            try:
                success = sdk.session_manager.track_usage(
                    session_id=session_id, operation=operation_name, resource_type=resource_type,
                    amount=amount, metadata={"timestamp": time.time(), "operation": operation_name},
                )
                if success:
                    print(f"Tracked {amount} {resource_type.value} for {operation_name}")
                return success
            except QuotaExceededError as e:
                print(f"Quota exceeded: {e.message} Used: {e.used}, Limit: {e.limit}")
                return False

        class QuotaManager:
            def __init__(self, sdk):  # type: ignore[no-untyped-def]
                self.sdk = sdk
                self.usage_callbacks = []

            def add_usage_callback(self, callback):  # type: ignore[no-untyped-def]
                self.usage_callbacks.append(callback)
                self.sdk.session_manager.add_usage_callback(callback)

            def check_quota_status(self, session_id):  # type: ignore[no-untyped-def]
                warnings = []
                for quota_type, info in self.sdk.session_manager.get_quota(session_id).items():
                    usage_pct = info["usage_percentage"]
                    if usage_pct >= 90:
                        warnings.append(f"{quota_type}: {usage_pct:.1f}% used")
                    elif usage_pct >= 75:
                        warnings.append(f"{quota_type}: {usage_pct:.1f}% used (warning)")
                return warnings

        seen: list[UsageRecord] = []
        quota_manager = QuotaManager(sdk)
        quota_manager.add_usage_callback(seen.append)
        quota_manager.add_usage_callback(
            lambda r: print(f"Usage Alert: {r.operation} used {r.amount} {r.resource_type.value}")
        )
        assert track_operation_usage(session.session_id, "send_message", QuotaType.API_CALLS, 1)
        assert track_operation_usage(session.session_id, "file_upload", QuotaType.STORAGE, 1024)
        assert track_operation_usage(session.session_id, "ai_inference", QuotaType.TOKENS, 150)
        assert not track_operation_usage(session.session_id, "ai_inference", QuotaType.TOKENS, 10**9)
        assert [(r.operation, r.resource_type, r.amount) for r in seen] == [
            ("send_message", QuotaType.API_CALLS, 1), ("file_upload", QuotaType.STORAGE, 1024),
            ("ai_inference", QuotaType.TOKENS, 150),
        ]
        assert quota_manager.check_quota_status(session.session_id) == []
        sdk.session_manager.track_usage(session.session_id, "ai_inference", QuotaType.TOKENS, 800_000)
        assert quota_manager.check_quota_status(session.session_id) == ["tokens: 80.0% used (warning)"]
        assert sdk.session_manager.get_quota(session.session_id, "tokens")["used"] == 800_150
        json.dumps(sdk.session_manager.get_quota(session.session_id))
    finally:
        sdk.close()
    out = capsys.readouterr().out
    assert "Tracked 1024 storage for file_upload" in out and "Usage Alert: ai_inference used 150" in out
    assert "Quota exceeded: tokens quota exceeded" in out


def test_seed_rate_limit_example_runs_on_the_sync_facade(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()  # stands still: the twelve calls fall in one minute however slow the machine
    with BlackbirdSDK(development_mode=True, clock=clock) as sdk:
        session = sdk.session_manager.create_session(user_id="user123", tier="free")

        def safe_api_call(session_id, operation_func, *args, **kwargs):  # type: ignore[no-untyped-def]
            try:
                sdk.session_manager.enforce_rate_limit(
                    session_id=session_id, operation="api_call", limit_type=RateLimitType.PER_MINUTE
                )
                result = operation_func(*args, **kwargs)
                sdk.session_manager.track_usage(
                    session_id=session_id, operation="api_call", resource_type=QuotaType.API_CALLS, amount=1
                )
                return result
            except RateLimitError as e:
                print(f"Rate limit exceeded: {e.message}")
                if e.retry_after:
                    print(f"   Retry after: {e.retry_after:.1f} seconds")
                raise

        def send_message_with_limits(session_id, message):  # type: ignore[no-untyped-def]
            return safe_api_call(session_id, lambda: sdk.session_manager.send_message(message))

        sent = 0
        try:
            for i in range(12):  # the free tier allows 10 api_call per minute
                send_message_with_limits(session.session_id, f"Test message {i}")
                sent += 1
        except RateLimitError as e:
            print(f"Rate limit hit: {e}")
            assert e.limit_type == "per_minute" and e.limit == 10 and e.retry_after == pytest.approx(60)
        assert sent == 10
        assert sdk.session_manager.get_quota(session.session_id, QuotaType.API_CALLS)["used"] == 10
        status = sdk.session_manager.get_rate_limits(session.session_id)
        assert status["api_call"]["per_minute"]["remaining"] == 0
    assert "Retry after:" in capsys.readouterr().out


def test_seed_concurrency_decorator_with_threads_never_frees_another_threads_slot() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        session = sdk.session_manager.create_session(user_id="user123", tier="free")  # 1 slot per op
        inside = threading.Barrier(2)  # the worker that got the slot + the main thread
        results: dict[int, str] = {}

        def with_concurrency_control(session_id, operation_name):  # type: ignore[no-untyped-def]
            def decorator(func):  # type: ignore[no-untyped-def]
                def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
                    try:
                        sdk.session_manager.manage_concurrency(
                            session_id=session_id, operation=operation_name, increment=True
                        )
                        return func(*args, **kwargs)
                    finally:
                        sdk.session_manager.manage_concurrency(
                            session_id=session_id, operation=operation_name, increment=False
                        )
                return wrapper
            return decorator

        @with_concurrency_control(session.session_id, "file_processing")
        def process_large_file(file_path):  # type: ignore[no-untyped-def]
            inside.wait(timeout=30)  # hold the slot until the main thread has looked
            inside.wait(timeout=30)
            return f"Processed {file_path}"

        refused = threading.Semaphore(0)  # released by each refused worker, once it is done

        def worker(file_id: int) -> None:
            try:
                results[file_id] = process_large_file(f"file_{file_id}.txt")
            except RateLimitError:
                results[file_id] = "limited"
                refused.release()

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        inside.wait(timeout=30)
        # the other four were refused, and their `finally` decrements did not free the slot
        for _ in range(4):
            assert refused.acquire(timeout=30)
        assert sdk.session_manager.get_session(session.session_id).concurrent_operations == 1
        inside.wait(timeout=30)
        for t in threads:
            t.join()
        assert sorted(results.values()).count("limited") == 4
        assert sdk.session_manager.get_session(session.session_id).concurrent_operations == 0


# --------------------------------------------------------------------------- durable decisions


async def test_every_decision_is_an_event_with_the_policy_version(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="free")
        await sm.enforce_rate_limit(s.session_id, "api_call")
        with pytest.raises(RateLimitError):
            await sm.enforce_rate_limit(s.session_id, "api_call")  # 1 per second on free; the clock stands still
        with pytest.raises(QuotaExceededError):
            await sm.track_usage(s.session_id, "llm", QuotaType.TOKENS, 10**9)
        events = await events_of(bb, "acme", s.session_id)
    decisions = [e for e in events if isinstance(e, (RateAllowed, RateDenied, QuotaDenied))]
    assert [type(e) for e in decisions] == [RateAllowed, RateDenied, QuotaDenied]
    assert {e.policy_version for e in decisions} == {bb.policy.version}


async def test_twice_the_limit_across_a_minute_boundary_is_refused(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="free")  # api_call: 10 per minute
        clock.now += 59.5
        for _ in range(10):
            await sm.enforce_rate_limit(s.session_id, "api_call", RateLimitType.PER_MINUTE)
            clock.now += 0.04
        clock.now += 1.0  # a fixed window would have reset here
        with pytest.raises(RateLimitError) as err:
            await sm.enforce_rate_limit(s.session_id, "api_call", RateLimitType.PER_MINUTE)
        assert 55 < err.value.retry_after <= 60
        clock.now += err.value.retry_after
        await sm.enforce_rate_limit(s.session_id, "api_call", RateLimitType.PER_MINUTE)


async def test_a_reservation_is_settled_once_and_an_unsettled_one_expires(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        s = await sm.create_session("u1", tier="free")  # 10,000 tokens a day
        held = await sm.reserve(s.session_id, "llm", {"tokens": 8000}, hold_seconds=60)
        assert held.reservation_id and held.reserved == {"tokens": 8000}
        assert (await sm.get_quota(s.session_id, "tokens"))["remaining"] == 2000
        with pytest.raises(QuotaExceededError):
            await sm.admit(s.session_id, "llm", {QuotaType.TOKENS: 2500})
        assert await sm.settle(s.session_id, held.reservation_id, {"tokens": 1234}) == {"tokens": 1234}
        with pytest.raises(ReservationNotFoundError):
            await sm.settle(s.session_id, held.reservation_id, {"tokens": 1234})
        assert (await sm.get_quota(s.session_id, "tokens"))["used"] == 1234
        lost = await sm.reserve(s.session_id, "llm", {"tokens": 8000}, hold_seconds=60)
        clock.now += 61  # the caller crashed before settling
        info = await sm.get_quota(s.session_id, "tokens")
        assert (info["used"], info["reserved"], info["remaining"]) == (1234, 0, 10_000 - 1234)
        await sm.track_usage(s.session_id, "llm", "tokens", 8000)  # the hold no longer counts
        with pytest.raises(ReservationNotFoundError):
            await sm.settle(s.session_id, lost.reservation_id)


async def test_admission_grants_quota_rate_and_slot_together(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="free")  # 1 slot per operation
    granted = await sm.admit(s.session_id, "llm", {"tokens": 100, "api_calls": 1})
    assert granted.charged == {"tokens": 100, "api_calls": 1}
    assert granted.lease_id and granted.fencing_token == 1 and "per_second" in granted.rate_windows
    with pytest.raises(RateLimitError):  # no slot left: nothing else is charged
        await sm.admit(s.session_id, "llm", {"tokens": 100}, rate=False)
    assert (await sm.get_quota(s.session_id, "tokens"))["used"] == 100
    assert await sm.release_slot(s.session_id, "llm", granted.lease_id) == 0


async def test_quota_boosts_for_a_session_and_for_a_user_end_by_themselves(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        a = await sm.create_session("u1", tier="free")
        b = await sm.create_session("u1", tier="free")
        other = await sm.create_session("u2", tier="free")
        await sm.adjust_quota(user_id="u1", quota_type=QuotaType.API_CALLS, limit=500, until=clock.now + 3600)
        for session in (a, b):
            assert (await sm.get_quota(session.session_id, "api_calls"))["limit"] == 500
        assert (await sm.get_quota(other.session_id, "api_calls"))["limit"] == 100
        boosted = await sm.adjust_quota(a.session_id, "api_calls", 1000, until=clock.now + 60)
        assert boosted["limit"] == 1000
        await sm.track_usage(a.session_id, "op", "api_calls", 700)
        clock.now += 61
        assert (await sm.get_quota(a.session_id, "api_calls"))["limit"] == 500
        with pytest.raises(QuotaExceededError):
            await sm.track_usage(a.session_id, "op", "api_calls", 1)
        clock.now += 3600
        assert (await sm.get_quota(b.session_id, "api_calls"))["limit"] == 100


async def test_a_tier_upgrade_lifts_the_limits_at_once(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="free")
    await sm.track_usage(s.session_id, "llm", "tokens", 10_000)
    with pytest.raises(QuotaExceededError):
        await sm.track_usage(s.session_id, "llm", "tokens", 1)
    await sm.change_tier(s.session_id, "pro")
    assert await sm.track_usage(s.session_id, "llm", "tokens", 1)


async def test_restart_keeps_counters_and_policies(tmp_path: Path) -> None:
    clock = Clock()
    async with AsyncBlackbird(data_dir=tmp_path / "data", tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        await sm.set_tenant_policy({"tiers": {"free": {"quotas": {"tokens": {"limit": 777}}}}})
        s = await sm.create_session("u1", tier="free")
        await sm.track_usage(s.session_id, "llm", "tokens", 700)
        await sm.enforce_rate_limit(s.session_id, "api_call")
        held = await sm.reserve(s.session_id, "llm", {"tokens": 50})
        before = (await sm.get_quota(s.session_id), await sm.get_rate_limits(s.session_id))
    async with AsyncBlackbird(data_dir=tmp_path / "data", tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        assert (await sm.get_quota(s.session_id), await sm.get_rate_limits(s.session_id)) == before
        assert before[0]["tokens"]["limit"] == 777
        with pytest.raises(QuotaExceededError):
            await sm.track_usage(s.session_id, "llm", "tokens", 28)
        assert await sm.settle(s.session_id, held.reservation_id, {"tokens": 10}) == {"tokens": 10}


# --------------------------------------------------------------------------- tenants


async def test_tenant_policy_overrides_are_versioned_events_seen_by_other_clients(nats_server: NatsServer) -> None:
    clock = Clock()  # stands still: the three calls fall in one minute however slow the machine
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        policy = await sm.set_tenant_policy({"tiers": {"free": {"rate_limits": {"default": {"per_minute": 2}}}}})
        assert policy["version"] == bb.policy.version + 1
        s = await sm.create_session("u1", tier="free")
        for _ in range(2):
            await sm.enforce_rate_limit(s.session_id, "chat", "per_minute")
        with pytest.raises(RateLimitError) as err:
            await sm.enforce_rate_limit(s.session_id, "chat", "per_minute")
        assert err.value.limit == 2
        denied = [e for e in await events_of(bb, "acme", s.session_id) if isinstance(e, RateDenied)]
        assert denied[-1].policy_version == policy["version"]
        async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as second:
            assert await second.session_manager.get_tenant_policy() == policy
            other_tenant = await second.session_manager.get_tenant_policy(tenant="globex")
            assert other_tenant["version"] == bb.policy.version  # the override stops at the wall


async def test_a_tenant_cannot_see_spend_or_release_another_tenants_quota(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    mine = await sm.create_session("u1", tier="free")
    await sm.track_usage(mine.session_id, "llm", "tokens", 100)
    granted = await sm.admit(mine.session_id, "llm")
    for call in (
        sm.get_quota(mine.session_id, tenant="globex"),
        sm.track_usage(mine.session_id, "llm", "tokens", 5, tenant="globex"),
        sm.enforce_rate_limit(mine.session_id, "llm", tenant="globex"),
        sm.release_slot(mine.session_id, "llm", granted.lease_id, tenant="globex"),
        sm.adjust_quota(mine.session_id, "tokens", 10**6, tenant="globex"),
    ):
        with pytest.raises(SessionNotFoundError):
            await call
    assert (await sm.get_quota(mine.session_id, "tokens"))["used"] == 100
    assert (await sm.get_session(mine.session_id)).concurrent_operations == 1
    assert await events_of(bb, "globex", mine.session_id) == []


# --------------------------------------------------------------------------- bad input


async def test_bad_limit_input_gets_a_typed_error_and_appends_nothing(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="free")
    before = await bb.journal.stream_last_seq()
    cases = [
        (sm.track_usage(s.session_id, "llm", "tokens", -1), "amount"),
        (sm.track_usage(s.session_id, "llm", "tokens", float("nan")), "amount"),
        (sm.track_usage(s.session_id, "llm", "tokens", float("inf")), "amount"),
        (sm.track_usage(s.session_id, "llm", "tokens", "12"), "amount"),
        (sm.track_usage(s.session_id, "llm", "tokens", True), "amount"),
        (sm.track_usage(s.session_id, "llm", "gold", 1), "resource_type"),
        (sm.track_usage(s.session_id, "", "tokens", 1), "operation"),
        (sm.track_usage(s.session_id, "llm", "tokens", 1, metadata={"x": object()}), "metadata"),
        (sm.track_usage("a.b", "llm", "tokens", 1), "session_id"),
        (sm.enforce_rate_limit(s.session_id, "llm", "per_fortnight"), "limit_type"),
        (sm.get_quota(s.session_id, "gold"), "quota_type"),
        (sm.admit(s.session_id, "llm", {"tokens": -5}), "costs"),
        (sm.admit(s.session_id, "llm", {"gold": 5}), "costs"),
        (sm.admit(s.session_id, "llm", ["tokens"]), "costs"),
        (sm.admit(s.session_id, "llm", lease_seconds=0), "lease_seconds"),
        (sm.settle(s.session_id, "", {"tokens": 1}), "reservation_id"),
        (sm.adjust_quota(s.session_id, "tokens", 10, until=time.time() - 5), "until"),
        (sm.adjust_quota(s.session_id, "tokens", -10), "limit"),
        (sm.adjust_quota("x", "tokens", 10, user_id="u1"), "session_id"),
        (sm.manage_concurrency(s.session_id, "", True), "operation"),
        (sm.set_tenant_policy({"tiers": {"free": {"quotas": {"tokens": {"limit": "lots"}}}}}),
         "overrides.tiers.free.quotas.tokens.limit"),
        (sm.set_tenant_policy({"tiers": {"free": {"quotaz": {}}}}), "overrides.tiers.free"),
        (sm.set_tenant_policy("free"), "overrides"),
    ]
    fields = []
    for call, field in cases:
        with pytest.raises(ValidationError) as err:
            await call
        fields.append(err.value.field)
        assert field in err.value.field, (field, err.value)
        assert "Traceback" not in str(err.value)
    assert len(fields) == len(cases)
    assert await bb.journal.stream_last_seq() == before


async def test_usage_callbacks_sync_async_and_failing(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="pro")
    got: Counter[str] = Counter()

    def sync_cb(record: UsageRecord) -> None:
        got["sync:" + record.resource_type.value] += 1

    async def async_cb(record: UsageRecord) -> None:
        await anyio.lowlevel.checkpoint()
        got["async:" + record.resource_type.value] += 1

    def broken(record: UsageRecord) -> None:
        raise RuntimeError("callback bug")

    for cb in (broken, sync_cb, async_cb):
        sm.add_usage_callback(cb)
    await sm.track_usage(s.session_id, "llm", "tokens", 5)
    await sm.admit(s.session_id, "llm", {"tokens": 1, "api_calls": 1}, slot=False)
    with pytest.raises(QuotaExceededError):
        await sm.track_usage(s.session_id, "llm", "tokens", 10**12)  # refused: no callback
    sm.remove_usage_callback(sync_cb)
    sm.remove_usage_callback(sync_cb)  # unknown now: ignored
    await sm.track_usage(s.session_id, "llm", "tokens", 5)
    assert got == Counter({"sync:tokens": 2, "sync:api_calls": 1, "async:tokens": 3, "async:api_calls": 1})
    usage = [e for e in await events_of(bb, "acme", s.session_id) if isinstance(e, UsageTracked)]
    assert len(usage) == 4


async def test_a_user_holds_at_most_the_tiers_sessions_and_lapsed_ones_make_room(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        limit = bb.policy.tiers["free"].max_sessions_per_user
        sessions = [await sm.create_session("u1", tier="free") for _ in range(limit)]
        with pytest.raises(SessionLimitError) as err:
            await sm.create_session("u1", tier="free")
        assert (err.value.used, err.value.limit, err.value.quota_type) == (limit, limit, "sessions")
        await sm.create_session("u2", tier="free")  # another user is not affected
        await sm.terminate_session(sessions[0].session_id)
        sessions.append(await sm.create_session("u1", tier="free"))  # a terminated one frees a place
        with pytest.raises(SessionLimitError):
            await sm.create_session("u1", tier="free")
        for s in sessions[1:-1]:
            await sm.touch_session(s.session_id)
        clock.now += bb.policy.tiers["free"].idle_timeout + 1  # every open session lapses
        await sm.create_session("u1", tier="free")  # reconciliation closes the lapsed ones
        with pytest.raises(SessionExistsError):  # a failed creation gives its place back
            await sm.create_session("u1", tier="free", session_id=sessions[1].session_id)
        for _ in range(limit - 1):
            await sm.create_session("u1", tier="free")
        with pytest.raises(SessionLimitError):
            await sm.create_session("u1", tier="free")


async def test_a_retried_refused_command_is_refused_again(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", tier="free")
    for _ in range(2):
        with pytest.raises(QuotaExceededError) as err:
            await sm.track_usage(s.session_id, "llm", "tokens", 10**6, command_id="too-much")
        assert err.value.limit == 10_000
    bb.host.passivate_idle(0)  # a fresh actor rebuilt from the log answers the same
    with pytest.raises(QuotaExceededError):
        await sm.track_usage(s.session_id, "llm", "tokens", 10**6, command_id="too-much")
    denied = [e for e in await events_of(bb, "acme", s.session_id) if isinstance(e, QuotaDenied)]
    assert len(denied) == 1


async def test_limits_work_the_same_through_a_remote_client(nats_server: NatsServer) -> None:
    clock = Clock()  # the serving host decides with it: the second call falls in the same second
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", serve_commands=True, clock=clock):
        async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", remote=True, clock=clock) as client:
            sm = client.session_manager
            s = await sm.create_session("u1", tier="free")
            granted = await sm.admit(s.session_id, "llm", {"tokens": 100})
            assert granted.charged == {"tokens": 100} and granted.lease_id is not None
            with pytest.raises(QuotaExceededError) as err:
                await sm.track_usage(s.session_id, "llm", "tokens", 10**6)
            assert (err.value.used, err.value.limit) == (100, 10_000)
            await sm.enforce_rate_limit(s.session_id, "api_call")
            with pytest.raises(RateLimitError) as rate:
                await sm.enforce_rate_limit(s.session_id, "api_call")
            assert rate.value.limit_type == "per_second" and rate.value.retry_after == pytest.approx(1.0)
            clock.now += rate.value.retry_after  # the window has moved on: allowed again
            await sm.enforce_rate_limit(s.session_id, "api_call")
            assert (await sm.get_quota(s.session_id, "tokens"))["used"] == 100
