"""Command ids are scoped to their tenant and aggregate, and bound to their command.

* JetStream deduplicates ``Nats-Msg-Id`` stream-wide, so the host sends a digest of (tenant,
  kind, aggregate id, command ids and digests): the same command id in another tenant or on
  another session is a different command, applied at once (it used to be answered "duplicate"
  by JetStream, adopted, and retried for seconds until ``concurrency_conflict``).
* An aggregate remembers, beside each recent command id, a digest of the command: a true retry
  gets the first answer (also a refusal's), a different command under a used id is refused with
  :class:`CommandIdReusedError` and appends nothing. Replay (restart, snapshot) keeps both.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import idempotency
from actors.events import (
    Applied,
    Commit,
    CreateSession,
    SessionTouched,
    TerminateSession,
    TouchSession,
    TrackUsage,
)
from actors.idempotency import Seen
from actors.policy import QuotaType
from actors.ports import AggregateKey
from actors.session import SessionState, apply_commands
from blackbird import AsyncBlackbird, CommandIdReusedError, RateLimitError

from .clock import Clock
from .conftest import NatsServer

pytestmark = pytest.mark.anyio

DEADLINE = 20.0  # only against hangs; the old behaviour failed with concurrency_conflict, not slowly


async def command_ids(bb: AsyncBlackbird, tenant: str, session_id: str) -> list[str]:
    commits = await bb.journal.read(AggregateKey(tenant, "session", session_id), 0)
    return [cid for _, commit in commits for cid in commit.command_ids]


# --------------------------------------------------------------------------- scope


async def test_two_tenants_using_the_same_command_id_are_both_applied(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    with anyio.fail_after(DEADLINE):
        a = await sm.create_session("u1", tenant="tenant-a", session_id="s1", command_id="same-create")
        b = await sm.create_session("u1", tenant="tenant-b", session_id="s1", command_id="same-create")
        assert (a.tenant, b.tenant) == ("tenant-a", "tenant-b")
        touched_a = await sm.touch_session("s1", "chat", tenant="tenant-a", command_id="same-touch")
        touched_b = await sm.touch_session("s1", "chat", tenant="tenant-b", command_id="same-touch")
    assert touched_a.version == touched_b.version == 2
    for tenant in ("tenant-a", "tenant-b"):
        assert await command_ids(bb, tenant, "s1") == ["same-create", "same-touch"]
        assert (await sm.get_session("s1", tenant=tenant)) is not None


async def test_two_sessions_of_one_tenant_using_the_same_command_id_are_both_applied(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    with anyio.fail_after(DEADLINE):
        await sm.create_session("u1", session_id="s1")
        await sm.create_session("u1", session_id="s2")
        one = await sm.touch_session("s1", "chat", command_id="t-1")
        two = await sm.touch_session("s2", "chat", command_id="t-1")
    assert one.version == two.version == 2
    assert (await command_ids(bb, "acme", "s1"))[-1] == (await command_ids(bb, "acme", "s2"))[-1] == "t-1"


# --------------------------------------------------------------------------- retry vs reuse


async def test_a_different_command_under_a_used_id_is_refused_and_appends_nothing(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.create_session("u1", session_id="s1")
    first = await sm.touch_session("s1", "chat", command_id="c-1")
    logged = await command_ids(bb, "acme", "s1")
    for reuse in (
        lambda: sm.touch_session("s1", "search", command_id="c-1"),  # same kind, other field
        lambda: sm.terminate_session("s1", command_id="c-1"),  # another kind
        lambda: sm.track_usage("s1", "chat", QuotaType.TOKENS, 5, command_id="c-1"),
    ):
        with pytest.raises(CommandIdReusedError) as caught:
            await reuse()
        assert caught.value.command_id == "c-1"
        assert caught.value.aggregate == "acme/session/s1"
        assert caught.value.code == "command_id_reused"
        assert "c-1" in str(caught.value)
    assert await command_ids(bb, "acme", "s1") == logged
    again = await sm.touch_session("s1", "chat", command_id="c-1")  # the true retry still works
    assert again.version == first.version
    session = await sm.get_session("s1")
    assert session is not None and session.version == first.version and session.is_active


async def test_a_true_retry_gets_the_first_answer_and_appends_nothing(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.create_session("u1", session_id="s1", metadata={"a": 1, "b": [1, 2]})
    await sm.track_usage("s1", "chat", QuotaType.TOKENS, 7, {"x": 1, "y": 2}, command_id="u-1")
    logged = await command_ids(bb, "acme", "s1")
    # equal metadata built in another order is the same command
    assert await sm.track_usage("s1", "chat", QuotaType.TOKENS, 7, {"y": 2, "x": 1}, command_id="u-1")
    assert await command_ids(bb, "acme", "s1") == logged
    quota = await sm.get_quota("s1", QuotaType.TOKENS)
    assert quota["used"] == 7


async def test_a_retried_create_session_without_a_session_id_returns_the_first_session(
    bb: AsyncBlackbird,
) -> None:
    sm = bb.session_manager
    first = await sm.create_session("u1", metadata={"k": 1}, command_id="create-1")
    again = await sm.create_session("u1", metadata={"k": 1}, command_id="create-1")
    assert again.session_id == first.session_id
    with pytest.raises(CommandIdReusedError):
        await sm.create_session("u1", metadata={"k": 2}, command_id="create-1")
    assert [s.session_id for s in await sm.get_user_sessions("u1")] == [first.session_id]
    other = await sm.create_session("u2", command_id="create-1")  # another user: another session
    assert other.session_id != first.session_id


async def test_a_retried_refusal_gets_the_first_refusal_and_a_different_command_is_refused(
    nats_server: NatsServer,
) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm = bb.session_manager
        await sm.create_session("u1", session_id="s1")  # free tier: api_call 1 per second
        assert await sm.enforce_rate_limit("s1", "api_call", command_id="r-1")
        with pytest.raises(RateLimitError) as first:
            await sm.enforce_rate_limit("s1", "api_call", command_id="r-2")
        logged = await command_ids(bb, "acme", "s1")
        assert logged[-1] == "r-2"  # the refusal is recorded (RateDenied)
        clock.now += 30  # the window has room again: only the recorded answer can refuse now
        with pytest.raises(RateLimitError) as again:
            await sm.enforce_rate_limit("s1", "api_call", command_id="r-2")
        assert (again.value.retry_after, again.value.limit_type) == (first.value.retry_after, first.value.limit_type)
        with pytest.raises(CommandIdReusedError):
            await sm.enforce_rate_limit("s1", "search", command_id="r-2")
        assert await command_ids(bb, "acme", "s1") == logged
        assert await sm.enforce_rate_limit("s1", "api_call", command_id="r-3")  # a new id: admitted


async def test_two_commands_under_one_id_in_one_batch_apply_the_first_only(bb: AsyncBlackbird) -> None:
    assert bb.host is not None
    host, key = bb.host, AggregateKey("acme", "session", "s1")
    await bb.session_manager.create_session("u1", session_id="s1")
    answers: dict[str, Any] = {}

    async def send(name: str, command: Any, command_id: str) -> None:
        answers[name] = await host.ask(key, command, command_id, "tester")

    # the first runs at once; the next three queue and are decided as one batch
    async with anyio.create_task_group() as tg:
        tg.start_soon(send, "lead", TouchSession(operation="lead"), "lead")
        tg.start_soon(send, "first", TouchSession(operation="a"), "dup")
        tg.start_soon(send, "retry", TouchSession(operation="a"), "dup")
        tg.start_soon(send, "other", TouchSession(operation="b"), "dup")
    assert answers["first"].rejection is None and not answers["first"].duplicate
    assert answers["retry"].rejection is None and answers["retry"].duplicate
    assert answers["other"].rejection.code == "command_id_reused"
    assert (await command_ids(bb, "acme", "s1")).count("dup") == 1


# --------------------------------------------------------------------------- replay


async def test_restart_and_snapshot_keep_retries_and_reuse_apart(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        sm = bb.session_manager
        await sm.create_session("u1", session_id="s1", command_id="create-1")
        for i in range(300):  # more than the window: the oldest ids are forgotten
            await sm.touch_session("s1", "chat", command_id=f"t-{i}")
        logged = await command_ids(bb, "acme", "s1")

    async def check(bb: AsyncBlackbird) -> None:
        sm = bb.session_manager
        assert (await sm.touch_session("s1", "chat", command_id="t-299")).version == 301  # a retry
        with pytest.raises(CommandIdReusedError):
            await sm.touch_session("s1", "other", command_id="t-299")
        with pytest.raises(CommandIdReusedError):
            await sm.touch_session("s1", "other", command_id=f"t-{300 - idempotency.WINDOW}")
        assert await command_ids(bb, "acme", "s1") == logged

    # a restart: a new client activates the session from its log alone
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        await check(bb)
        assert bb.host is not None
        await bb.host.snapshot_all()
        assert await bb.journal.load(AggregateKey("acme", "session", "s1")) is not None
    # another restart: from the snapshot (nothing after it to replay)
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        await check(bb)


async def test_commits_from_before_digests_match_any_command(bb: AsyncBlackbird) -> None:
    # An upgrade raises no false alarm: a commit whose Applied carries no digest (as every
    # commit written before digests existed) is taken as a retry whatever the command.
    sm = bb.session_manager
    session = await sm.create_session("u1", session_id="s1")
    key = AggregateKey("acme", "session", "s1")
    old = Applied("legacy-1", "tester", (SessionTouched(at=time.time(), operation="chat"),))
    assert old.digest == ""
    last = await bb.journal.last_seq(key)
    commit = Commit(at=time.time(), version=session.version + 1, commands=(old,))
    await bb.journal.append(key, commit, expected_seq=last, msg_id="legacy-1")
    retried = await sm.touch_session("s1", "anything", command_id="legacy-1")
    assert retried.version == session.version + 1
    assert (await command_ids(bb, "acme", "s1")).count("legacy-1") == 1


# --------------------------------------------------------------------------- pure: digest, window


def test_the_digest_is_equal_for_equal_commands_and_differs_otherwise() -> None:
    a = CreateSession(user_id="u1", metadata={"x": 1, "y": {"p": [1, 2], "q": None}})
    b = CreateSession(user_id="u1", metadata={"y": {"q": None, "p": [1, 2]}, "x": 1})
    decoded = msgspec.json.decode(msgspec.json.encode(a), type=CreateSession)  # as the wire delivers it
    assert idempotency.digest(a) == idempotency.digest(b) == idempotency.digest(decoded)
    assert idempotency.digest(a) != idempotency.digest(CreateSession(user_id="u2", metadata=a.metadata))
    assert idempotency.digest(TouchSession(operation="x")) != idempotency.digest(TerminateSession(reason="x"))
    assert idempotency.digest(TrackUsage(operation="o", resource_type=QuotaType.TOKENS, amount=1.0)) != (
        idempotency.digest(TrackUsage(operation="o", resource_type=QuotaType.TOKENS, amount=2.0))
    )


def _model(entries: list[tuple[str, str]], command_id: str, digest: str) -> Seen:
    """What the window should say: the newest remembered use of the id decides."""
    kept = entries[-idempotency.WINDOW :]
    for cid, recorded in reversed(kept):
        if cid == command_id:
            return Seen.RETRY if recorded in ("", digest) else Seen.REUSED
    return Seen.NEW


ids = st.sampled_from([f"id{i}" for i in range(400)])  # repeats happen, and most ids are evicted
digests = st.sampled_from(["", *(idempotency.digest(TouchSession(operation=str(i))) for i in range(3))])


@given(
    legacy=st.lists(ids, max_size=300),
    batches=st.lists(st.lists(st.tuples(ids, digests), min_size=1, max_size=40), max_size=20),
    probes=st.lists(st.tuples(ids, digests.filter(bool)), min_size=1, max_size=30),
)
@settings(max_examples=150, deadline=None)
def test_the_window_recalls_ids_with_their_digests_like_a_list_of_the_newest(
    legacy: list[str], batches: list[list[tuple[str, str]]], probes: list[tuple[str, str]]
) -> None:
    # ``legacy``: ids remembered by a state from before digests (no digests beside them)
    window, recorded = idempotency.remember(b"", legacy), b""
    entries = [(cid, "") for cid in legacy]
    for batch in batches:
        pair = idempotency.remember_applied(window, recorded, [Applied(c, "p", (), None, d) for c, d in batch])
        window = idempotency.remember(window, (cid for cid, _ in batch))
        recorded = idempotency.remember_digests(recorded, (d for _, d in batch))
        assert pair == (window, recorded)  # the one-pass form the aggregates use
        entries += batch
    assert idempotency.size(window) == min(len(entries), idempotency.WINDOW)
    assert len(recorded) <= len(window)
    for cid, digest in [*probes, *entries[-5:], ("never-sent", probes[0][1])]:
        assert idempotency.recall(window, recorded, cid, digest or probes[0][1]) == _model(
            entries, cid, digest or probes[0][1]
        )


@given(st.lists(st.tuples(ids, digests), min_size=1, max_size=600))
@settings(max_examples=50, deadline=None)
def test_the_session_state_keeps_ids_and_digests_aligned_through_commits(
    commands: list[tuple[str, str]],
) -> None:
    state = SessionState(tenant="t", session_id="s")
    for cid, digest in commands:
        state = apply_commands(state, (Applied(cid, "p", (), None, digest),))
    assert len(state.recent_commands) == len(state.recent_digests)
    for cid, digest in commands[-20:]:
        probe = digest or idempotency.digest(TouchSession())
        assert idempotency.recall(state.recent_commands, state.recent_digests, cid, probe) == _model(
            commands, cid, probe
        )


def test_a_remember_retried_digests_alike_though_its_nonce_clock_and_id_differ() -> None:
    from actors.events import Remember

    def remember(**changes: Any) -> Remember:
        fields: dict[str, Any] = dict(
            memory_id="m1", scope="user", owner="u1", author="u1", key=None, kind="fact", importance=0.5,
            model_id="test/hash-64", size=11, sealed=b"nonce-1|ct", expires_at=100.0, duplicate_of=None,
            text_mac="a" * 32,
        )
        return Remember(**{**fields, **changes})

    first = remember()
    retried = remember(memory_id="m2", sealed=b"nonce-2|ct", expires_at=105.0, duplicate_of="m1")
    assert idempotency.digest(first) == idempotency.digest(retried)  # the same write, tried again
    assert idempotency.digest(first) != idempotency.digest(remember(text_mac="b" * 32))  # another text
    assert idempotency.digest(first) != idempotency.digest(remember(importance=0.9))
