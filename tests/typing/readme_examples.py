"""The README's examples, for the type checker only: ``mypy --strict`` must accept this file.

Nothing here runs (tests/test_surface.py type-checks it). Each result is assigned to a variable
annotated with the type the README promises, and ``assert_type`` pins a few exactly (it fails
on ``Any``, which an annotation would let through). ``readme_errors.py`` holds the mistakes the
checker must catch.
"""

from __future__ import annotations

from typing import Any, assert_type

import blackbird
from blackbird import (
    Admission,
    AsyncBlackbird,
    AuditReport,
    BlackbirdSDK,
    Memory,
    QuotaExceededError,
    QuotaType,
    RateLimitError,
    RateLimitType,
    Session,
    SessionInactiveError,
    SessionLimitError,
    StreamEvent,
    UsageRecord,
    ValidationError,
)


def sync_sessions() -> None:
    sdk = BlackbirdSDK(development_mode=True)
    session = sdk.session_manager.create_session(
        user_id="user123", tier="pro", metadata={"department": "research"}
    )
    assert_type(session, Session)
    status: str = session.status
    active: bool = session.is_active
    print(session.session_id, status, active)
    found: Session | None = sdk.session_manager.get_session(session.session_id)
    assert_type(sdk.session_manager.get_session(session.session_id), Session | None)
    data: dict[str, Any] | None = sdk.session_manager.get_session_data(session.session_id)
    touched: Session = sdk.session_manager.touch_session(session.session_id, "chat")
    moved: Session = sdk.session_manager.change_tier(session.session_id, "enterprise")
    posted: dict[str, Any] = sdk.session_manager.send_message("hello", session_id=session.session_id)
    posted = sdk.session_manager.send_message("hi", session_id=session.session_id, channel="progress")
    ended: Session = sdk.session_manager.terminate_session(session.session_id)
    print(found, data, touched, moved, posted, ended, sdk.settings.tenant, sdk.nats_url, sdk.data_dir)
    sdk.close()


async def async_sessions() -> None:
    async with AsyncBlackbird(data_dir="./data", tenant="acme") as bb:
        sm = bb.session_manager
        s = await sm.create_session("user123", tier="pro")
        assert_type(s, Session)
        await sm.touch_session(s.session_id, "chat")
        await sm.change_tier(s.session_id, "enterprise")
        print(await sm.get_session_data(s.session_id))
        await sm.terminate_session(s.session_id)
        try:
            await sm.touch_session(s.session_id)
        except SessionInactiveError as e:
            reason: str = e.reason
            print(reason, e.session_id)


def quotas() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        sm = sdk.session_manager
        s = sm.create_session("user123", tier="pro")
        tracked: bool = sm.track_usage(s.session_id, "ai_inference", QuotaType.TOKENS, 150)
        tokens: dict[str, Any] = sm.get_quota(s.session_id)["tokens"]
        allowed: bool = sm.enforce_rate_limit(s.session_id, "api_call", RateLimitType.PER_MINUTE)
        in_use: int = sm.manage_concurrency(s.session_id, "file_processing", True)
        in_use = sm.manage_concurrency(s.session_id, "file_processing", False)
        with sm.concurrency_slot(s.session_id, "file_processing"):
            pass
        a = sm.admit(s.session_id, "llm", {"tokens": 4000}, reserve=True)
        assert_type(a, Admission)
        assert a.reservation_id is not None and a.lease_id is not None
        charged: dict[str, float] = sm.settle(s.session_id, a.reservation_id, {"tokens": 1234})
        released: int = sm.release_slot(s.session_id, "llm", a.lease_id)
        boosted: dict[str, Any] = sm.adjust_quota(s.session_id, QuotaType.TOKENS, 50_000, until=3600)
        policy: dict[str, Any] = sm.set_tenant_policy({"tiers": {"pro": {}}})
        print(tracked, tokens, allowed, in_use, charged, released, boosted, policy)

        def on_usage(record: UsageRecord) -> None:
            print(record.resource_type, record.amount)

        sm.add_usage_callback(on_usage)
        sm.remove_usage_callback(on_usage)


def quota_errors(sdk: BlackbirdSDK, session_id: str) -> None:
    sm = sdk.session_manager
    try:
        sm.track_usage(session_id, "ai_inference", "tokens", 10**9)
    except SessionLimitError as e:
        user: str = e.user_id
        print(user, e.tier)
    except QuotaExceededError as e:
        used: float = e.used
        limit: float = e.limit
        resets_at: float | None = e.resets_at
        quota: str = e.quota_type
        print(used, limit, resets_at, quota, e.fields)
    try:
        sm.enforce_rate_limit(session_id, "api_call")
    except RateLimitError as e:
        assert_type(e.retry_after, float | None)
        window: str = e.limit_type
        print(e.retry_after, window, e.limit)
    try:
        sm.create_session("bad user")
    except ValidationError as e:
        field: str = e.field
        expected: str = e.expected
        print(field, expected, e.got, e.message, str(e))


def analytics(sdk: BlackbirdSDK, session_id: str) -> None:
    sm = sdk.session_manager
    sessions: list[Session] = sm.get_user_sessions("user123")
    history: list[dict[str, Any]] = sm.get_usage_history("user123", limit=100)
    stats: dict[str, Any] = sm.get_statistics()
    user: dict[str, Any] = sm.get_user_analytics("user123")
    tenant: dict[str, Any] = sm.get_tenant_analytics()
    everyone: dict[str, Any] = sm.get_cross_tenant_analytics(k=5)
    prediction: dict[str, dict[str, Any]] = sm.predict_quota_exhaustion(session_id)
    print(sessions, history, stats, user, tenant, everyone, prediction)


def memory(sdk: BlackbirdSDK, some_time: float) -> None:
    s = sdk.session_manager.create_session("user123", tier="pro")
    note = sdk.memory.remember("My manager is Priya Raman.", session_id=s.session_id, importance=0.8)
    assert_type(note, Memory)
    sdk.memory.remember("I moved to Porto.", session_id=s.session_id, key="home")
    hits = sdk.memory.recall("Who is my boss?", session_id=s.session_id, scopes=["user", "tenant"], k=3)
    assert_type(hits, list[Memory])
    text: str = hits[0].text
    score: float | None = hits[0].score
    parts: dict[str, float] = hits[0].scores
    sequence: int = hits[0].sequence
    then: list[Memory] = sdk.memory.recall("Where do I live?", session_id=s.session_id, as_of=some_time)
    sdk.memory.set("draft", {"step": 3}, session_id=s.session_id, ttl=3600)
    draft: Any = sdk.memory.get("draft", session_id=s.session_id)
    erased: dict[str, Any] = sdk.memory.forget_user("user123")
    members: list[str] = sdk.memory.add_members("group:research", ["u1", "u2"])
    print(text, score, parts, sequence, then, draft, erased, members)


def sync_streams(sdk: BlackbirdSDK, session_id: str) -> None:
    with sdk.streams.subscribe(session_id) as messages:
        m = messages.get(timeout=5)
        assert_type(m, StreamEvent | None)
        messages.caught_up()
        waiting: int = messages.backlog
        for event in messages:
            assert_type(event, StreamEvent)
            print(event.id, event.channel, event.text, event.resume, waiting)
    with sdk.streams.subscribe(session_id, channels=["chat"], after="41-0") as messages:
        print(next(iter(messages)).text)


async def async_streams(bb: AsyncBlackbird, session_id: str) -> None:
    last = ""
    async with bb.streams.subscribe(session_id, channels=["chat", "progress"]) as messages:
        async for m in messages:
            assert_type(m, StreamEvent)
            last = m.resume
    async with bb.streams.subscribe(session_id, after=last) as messages:
        first: StreamEvent | None = await messages.get(timeout=5)
        print(first)


def audit(sdk: BlackbirdSDK, session_id: str) -> None:
    report = sdk.audit.replay(session_id=session_id, until="2026-01-01T00:00:00Z")
    assert_type(report, AuditReport)
    text: str = report.render()
    as_json: dict[str, Any] = report.to_dict()
    differences: dict[str, list[str]] = sdk.audit.verify()
    print(text, as_json, differences, sdk.audit.tenant)


async def async_audit(bb: AsyncBlackbird) -> None:
    report: AuditReport = await bb.audit.replay(user_id="user123", until_seq=42)
    print(report.rows, report.state)


def version() -> str:
    return blackbird.__version__
