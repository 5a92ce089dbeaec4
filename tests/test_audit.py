"""Audit replay on a real nats-server: a session, a user or a tenant replayed up to a sequence or
an instant gives the timeline and the state the live API reported then. Time is a hand-moved
clock; nothing sleeps."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from actors.tenant import PolicyBook
from blackbird import (
    AsyncBlackbird,
    BlackbirdError,
    BlackbirdSDK,
    ClosedError,
    QuotaExceededError,
    QuotaType,
    RateLimitError,
    Session,
    SessionNotFoundError,
    ValidationError,
)
from blackbird.audit.replay import Auditor, AuditReport

from .clock import Clock
from .conftest import NatsServer


def whole_seconds() -> Clock:
    """A clock at a whole second, so an instant survives the trip through a datetime or an ISO
    string exactly."""
    return Clock(float(int(time.time())))


pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[1]


class Point(msgspec.Struct):
    """What the live API reported right after one command."""

    session: Session
    quota: dict[str, Any]
    rates: dict[str, Any]


async def build_history(bb: AsyncBlackbird, clock: Clock) -> list[Point]:
    """Session s1 of user u1 (free tier): usage, a quota denial, rate limits allowed and denied,
    a tier change, termination. One point per command, each its own commit."""
    sm = bb.session_manager
    points: list[Point] = []

    async def record() -> None:
        session = await sm.get_session("s1")
        assert session is not None
        points.append(Point(session, await sm.get_quota("s1"), await sm.get_rate_limits("s1")))

    await sm.create_session("u1", tier="free", session_id="s1")
    await record()
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 150)
    await record()
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 9000)
    await record()
    with pytest.raises(QuotaExceededError):  # 9150 + 2000 > 10000
        await sm.track_usage("s1", "llm", QuotaType.TOKENS, 2000, command_id="over-quota")
    await record()
    await sm.enforce_rate_limit("s1", "api_call")
    await record()
    with pytest.raises(RateLimitError):  # free: 1 api_call per second, and the clock stands still
        await sm.enforce_rate_limit("s1", "api_call", command_id="too-fast")
    await record()
    clock.now += 2
    await sm.enforce_rate_limit("s1", "api_call")
    await record()
    await sm.change_tier("s1", "pro")
    await record()
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 5000)  # fits under pro's limit
    await record()
    await sm.terminate_session("s1", "done")
    await record()
    return points


def remaining(state: dict[str, Any], operation: str, window: str, default: int) -> Any:
    return state["rate_limits"].get(operation, {}).get(window, {}).get("remaining", default)


# --------------------------------------------------------------------------- session scope


async def test_session_replayed_to_each_sequence_equals_what_the_api_reported_then(
    nats_server: NatsServer,
) -> None:
    clock = whole_seconds()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        points = await build_history(bb, clock)
        middle = points[len(points) // 2]
        assert middle.session.tier == "free" and points[-1].session.tier == "pro"  # a real middle
        for i, point in enumerate(points):
            s = point.session
            report = await bb.audit.replay(session_id="s1", until_seq=s.sequence)
            st = report.state
            assert (report.scope, report.id, report.tenant) == ("session", "s1", "acme")
            assert report.last_seq == s.sequence and report.until_seq == s.sequence
            assert len(report.rows) == i + 1 and report.rows[-1].seq == s.sequence
            assert {k: st[k] for k in ("user_id", "tier", "version", "sequence", "created_at",
                                       "last_activity", "idle_timeout", "max_age", "metadata")} == {
                "user_id": s.user_id, "tier": s.tier, "version": s.version, "sequence": s.sequence,
                "created_at": s.created_at, "last_activity": s.last_activity,
                "idle_timeout": s.idle_timeout, "max_age": s.max_age, "metadata": s.metadata,
            }
            assert st["status"] == s.status.value
            assert {q: u["used"] for q, u in st["usage"].items()} == {
                q: used for q, (_, used) in s.usage.items()
            }
            assert st["quota"] == point.quota
            for window, info in point.rates["api_call"].items():
                assert remaining(st, "api_call", window, info["limit"]) == info["remaining"], window
        assert points[-1].session.status.value == "terminated"


async def test_replay_up_to_an_instant_uses_the_tenant_policy_in_force_then(
    nats_server: NatsServer,
) -> None:
    clock = whole_seconds()
    t0 = clock.now
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        await sm.create_session("u1", tier="free", session_id="s1")
        clock.now = t0 + 10
        await sm.track_usage("s1", "llm", QuotaType.TOKENS, 100)
        clock.now = t0 + 20
        await sm.set_tenant_policy({"tiers": {"free": {"quotas": {"tokens": {"limit": 20000}}}}})
        clock.now = t0 + 30
        await sm.track_usage("s1", "llm", QuotaType.TOKENS, 200)
        clock.now = t0 + 40
        await sm.change_tier("s1", "basic")
        audit = bb.audit

        before = await audit.replay(session_id="s1", until=t0 + 15)
        assert [r.what for r in before.rows] == [
            ["SessionCreated user u1 tier free"], ["UsageTracked tokens 100 (llm)"]
        ]
        assert before.at == t0 + 15 and before.until == t0 + 15
        assert before.state["tier"] == "free"
        assert before.state["quota"]["tokens"]["used"] == 100
        assert before.state["quota"]["tokens"]["limit"] == 10000  # policy version 1 then
        assert before.state["active_at"] is True

        # the same instant as an aware datetime, an ISO string with and without an offset
        moment = datetime.datetime.fromtimestamp(t0 + 15, datetime.UTC)
        for until in (moment, moment.isoformat(), moment.isoformat().replace("+00:00", "Z"),
                      moment.replace(tzinfo=None).isoformat(), str(t0 + 15)):
            assert (await audit.replay(session_id="s1", until=until)).to_dict() == before.to_dict(), until

        after_policy = await audit.replay(session_id="s1", until=t0 + 25)
        assert len(after_policy.rows) == 2
        assert after_policy.state["quota"]["tokens"]["limit"] == 20000  # policy version 2 from t0+20

        at_commit = await audit.replay(session_id="s1", until=t0 + 30)  # a commit at the very instant
        assert at_commit.rows[-1].what == ["UsageTracked tokens 200 (llm)"]
        assert at_commit.rows[-1].policy_version == 2
        assert at_commit.state["quota"]["tokens"]["used"] == 300

        both = await audit.replay(session_id="s1", until=t0 + 100, until_seq=before.last_seq)
        assert [r.seq for r in both.rows] == [r.seq for r in before.rows]

        nothing = await audit.replay(session_id="s1", until=t0 - 1)
        assert nothing.rows == [] and nothing.last_seq == 0 and nothing.state["exists"] is False

        now = await audit.replay(session_id="s1")
        assert now.state["tier"] == "basic" and now.at == t0 + 40


# --------------------------------------------------------------------------- the timeline


async def test_timeline_shows_refusals_with_their_numbers(nats_server: NatsServer) -> None:
    clock = whole_seconds()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        points = await build_history(bb, clock)
        report = await bb.audit.replay(session_id="s1")
    assert report.last_seq == points[-1].session.sequence
    assert [r.decision for r in report.rows] == [
        "allowed", "allowed", "allowed", "refused", "allowed", "refused", "allowed", "allowed",
        "allowed", "allowed",
    ]
    assert all(r.who == "sdk" for r in report.rows)
    assert [r.seq for r in report.rows] == [p.session.sequence for p in points]

    quota = next(r for r in report.rows if r.command_id == "over-quota")
    assert quota.decision == "refused"
    assert quota.what == ["QuotaDenied tokens 2000 (llm): 9150 used of 10000"]
    assert quota.why is not None and quota.why.startswith("tokens quota exceeded")
    for figure in ("used=9150", "limit=10000", "requested=2000", "policy_version=1"):
        assert figure in quota.why
    assert quota.policy_version == 1
    assert quota.when == datetime.datetime.fromtimestamp(quota.at, datetime.UTC).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")

    rate = next(r for r in report.rows if r.command_id == "too-fast")
    assert rate.what == ["RateDenied api_call per_second limit 1"]
    assert rate.why is not None
    for figure in ("limit_type=per_second", "limit=1", "retry_after=1.000s", "policy_version=1"):
        assert figure in rate.why

    allowed = report.rows[1]
    assert allowed.what == ["UsageTracked tokens 150 (llm)"] and allowed.why is None
    assert report.rows[-3].what == ["TierChanged free -> pro"]
    assert report.rows[-1].what == ["SessionTerminated done"]

    text = report.render()
    lines = text.splitlines()
    assert lines[0] == "audit of session 's1' in tenant 'acme', up to now"
    assert lines[1].split() == ["SEQ", "WHEN", "WHO", "WHAT", "DECISION", "WHY"]
    refused_line = next(line for line in lines if "QuotaDenied" in line)
    assert " refused " in refused_line and "used=9150" in refused_line
    assert f"state at seq {report.last_seq}, " in text
    assert "  status: terminated" in lines

    data = report.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["rows"][3]["decision"] == "refused"


# --------------------------------------------------------------------------- user and tenant scopes


async def test_user_scope_holds_the_users_sessions_and_no_one_elses(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.create_session("u1", tier="pro", session_id="a1")
    await sm.create_session("u2", tier="pro", session_id="b1")
    await sm.create_session("u1", tier="pro", session_id="a2")
    await sm.track_usage("a1", "llm", QuotaType.TOKENS, 10)
    await sm.track_usage("b1", "llm", QuotaType.TOKENS, 99)
    await sm.adjust_quota(None, QuotaType.TOKENS, 5000, user_id="u1")
    await sm.adjust_quota(None, QuotaType.TOKENS, 7000, user_id="u2")
    await sm.terminate_session("a2")

    report = await bb.audit.replay(user_id="u1")
    assert (report.scope, report.id) == ("user", "u1")
    subjects = {r.subject for r in report.rows}
    assert subjects == {"bb.acme.user.u1", "bb.acme.session.a1", "bb.acme.session.a2", "bb.acme.tenant"}
    assert not any("b1" in line or "u2" in line for r in report.rows for line in r.what)
    adjustments = [r for r in report.rows if r.subject == "bb.acme.tenant"]
    assert [r.what for r in adjustments] == [["UserQuotaAdjusted u1 tokens -> 5000"]]
    st = report.state
    assert set(st["sessions"]) == {"a1", "a2"}
    assert st["open_sessions"] == {"a1": "pro"}
    assert st["sessions"]["a1"]["used"] == {"tokens": 10}
    assert st["sessions"]["a2"]["status"] == "terminated"
    assert st["quota_adjustments"] == {"tokens": {"limit": 5000, "until": None}}
    assert "UserSessionOpened a1 tier pro" in [w for r in report.rows for w in r.what]

    other = await bb.audit.replay(user_id="u2")
    assert set(other.state["sessions"]) == {"b1"}
    assert other.state["sessions"]["b1"]["used"] == {"tokens": 99}


async def test_tenant_scope_never_shows_another_tenant_with_the_same_ids(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.create_session("u1", tier="free", session_id="s1")
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 150)
    await sm.create_session("u1", tier="pro", session_id="s1", tenant="globex")
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 777, tenant="globex")
    await sm.track_usage("s1", "llm", QuotaType.TOKENS, 1, tenant="globex")

    acme = await bb.audit.replay(tenant="acme")
    assert (acme.scope, acme.id) == ("tenant", "acme")
    assert acme.rows and all(r.subject.startswith("bb.acme.") for r in acme.rows)
    assert "UsageTracked tokens 777 (llm)" not in [w for r in acme.rows for w in r.what]
    counts = acme.state["counts"]
    assert (counts["sessions"], counts["users"], counts["commits"], counts["refusals"]) == (1, 1, 3, 0)
    assert counts["sessions_by_status"] == {"active": 1}

    globex = await bb.audit.replay(tenant="globex")
    assert all(r.subject.startswith("bb.globex.") for r in globex.rows)
    assert globex.state["counts"]["commits"] == 4

    session = await bb.audit.replay(session_id="s1")  # the client's tenant: acme
    assert session.state["tier"] == "free" and session.state["usage"]["tokens"]["used"] == 150
    theirs = await bb.audit.replay(session_id="s1", tenant="globex")
    assert theirs.state["tier"] == "pro" and theirs.state["usage"]["tokens"]["used"] == 778

    user = await bb.audit.replay(user_id="u1")
    assert {r.subject for r in user.rows} == {"bb.acme.user.u1", "bb.acme.session.s1"}
    assert user.state["sessions"]["s1"]["used"] == {"tokens": 150}


# --------------------------------------------------------------------------- bad input


async def test_bad_input_is_refused_naming_the_field(bb: AsyncBlackbird) -> None:
    await bb.session_manager.create_session("u1", session_id="s1")
    before = await bb.journal.stream_last_seq()
    audit = bb.audit
    cases: list[tuple[dict[str, Any], str]] = [
        ({}, "scope"),
        ({"session_id": "s1", "user_id": "u1"}, "scope"),
        ({"session_id": "a.b"}, "session_id"),
        ({"session_id": "a b"}, "session_id"),
        ({"user_id": "u*"}, "user_id"),
        ({"tenant": "ac>me"}, "tenant"),
        ({"session_id": "s1", "tenant": "a.b"}, "tenant"),
        ({"session_id": "s1", "until": "yesterday"}, "until"),
        ({"session_id": "s1", "until": datetime.datetime(2024, 1, 1)}, "until"),  # naive
        ({"session_id": "s1", "until": float("nan")}, "until"),
        ({"session_id": "s1", "until": "inf"}, "until"),
        ({"session_id": "s1", "until": [1]}, "until"),
        ({"session_id": "s1", "until_seq": 0}, "until_seq"),
        ({"session_id": "s1", "until_seq": True}, "until_seq"),
        ({"session_id": "s1", "until_seq": "3"}, "until_seq"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValidationError) as caught:
            await audit.replay(**kwargs)
        assert caught.value.field == field, kwargs
        assert caught.value.message.startswith(f"{field}: expected"), kwargs
    with pytest.raises(SessionNotFoundError):
        await audit.replay(session_id="never-created")
    assert await bb.journal.stream_last_seq() == before  # an audit appends nothing


# --------------------------------------------------------------------------- facades and verify


async def test_audit_property_needs_an_open_client(nats_server: NatsServer) -> None:
    client = AsyncBlackbird(nats_url=nats_server.url, tenant="acme")
    with pytest.raises(ClosedError):
        client.audit  # noqa: B018
    async with client:
        assert isinstance(client.audit, Auditor) and client.audit.tenant == "acme"
    with pytest.raises(ClosedError):
        client.audit  # noqa: B018


async def test_verify_delegates_to_the_projections(bb: AsyncBlackbird) -> None:
    await bb.session_manager.create_session("u1", session_id="s1")
    differences = await bb.audit.verify()
    assert differences and all(found == [] for found in differences.values()), differences
    bare = Auditor(bb.journal, PolicyBook(bb.policy), "acme")
    with pytest.raises(BlackbirdError, match="no projections are running in this client"):
        await bare.verify()


def test_sync_facade_mirrors_replay(nats_server: NatsServer) -> None:
    sdk = BlackbirdSDK(nats_url=nats_server.url, tenant="acme")
    try:
        sdk.session_manager.create_session("u1", session_id="s1")
        sdk.session_manager.track_usage("s1", "llm", QuotaType.TOKENS, 42)
        report = sdk.audit.replay(session_id="s1")
        assert isinstance(report, AuditReport)
        assert [r.what for r in report.rows][-1] == ["UsageTracked tokens 42 (llm)"]
        assert sdk.audit.tenant == "acme"
        with pytest.raises(ValidationError):
            sdk.audit.replay()
    finally:
        sdk.close()
    with pytest.raises(ClosedError):
        sdk.audit  # noqa: B018


# --------------------------------------------------------------------------- command line


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKBIRD_")}
    env["BLACKBIRD_LOG_LEVEL"] = "warning"
    done = await anyio.run_process(
        [sys.executable, "-m", "blackbird._cli", *args], check=False, env=env, cwd=REPO_ROOT
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_cli_audit_prints_the_timeline_as_json_and_text(nats_server: NatsServer) -> None:
    clock = whole_seconds()
    url = nats_server.url
    async with AsyncBlackbird(nats_url=url, tenant="acme", clock=clock) as bb:
        points = await build_history(bb, clock)
        middle = points[3].session.sequence  # right after the refused command

        code, out, err = await run_cli("audit", "--session", "s1", "--tenant", "acme",
                                       "--until-seq", str(middle), "--json", "--nats-url", url)
        assert code == 0, err
        data = json.loads(out)
        assert (data["scope"], data["id"], data["tenant"], data["until_seq"]) == ("session", "s1", "acme", middle)
        assert [r["decision"] for r in data["rows"]] == ["allowed", "allowed", "allowed", "refused"]
        assert "used=9150" in data["rows"][-1]["why"]
        assert data["state"]["usage"]["tokens"]["used"] == 9150
        assert data["state"]["sequence"] == middle

        code, out, err = await run_cli("audit", "--whole-tenant", "--tenant", "acme", "--json",
                                       "--nats-url", url)
        assert code == 0, err
        assert json.loads(out)["state"]["counts"]["refusals"] == 2

        code, out, err = await run_cli("audit", "--user", "u1", "--tenant", "acme", "--nats-url", url)
        assert code == 0, err
        assert out.startswith("audit of user 'u1' in tenant 'acme', up to now\n")
        assert "QuotaDenied tokens 2000 (llm)" in out and "state at seq" in out

        code, out, err = await run_cli("audit", "--session", "s1", "--nats-url", url)  # tenant: default
        assert code == 1 and out == ""
        assert err.strip() == "error: session 's1' not found in tenant 'default'"

        code, out, err = await run_cli("audit", "--session", "s1", "--until", "soon", "--nats-url", url)
        assert code == 2 and err.startswith("error: until: expected") and "Traceback" not in err

        code, out, err = await run_cli("audit", "--nats-url", url)
        assert code == 2 and err.startswith("error: audit: expected one of --session")

        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert code == 0, err
        assert out and all(line.endswith(": OK") for line in out.splitlines()), out
