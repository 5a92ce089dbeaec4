"""Sessions end to end on a real nats-server: durability, idempotency, validation, tenants."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from actors.events import SessionStatus
from actors.ports import AggregateKey
from blackbird import (
    AsyncBlackbird,
    BlackbirdError,
    BlackbirdSDK,
    PayloadTooLargeError,
    SessionExistsError,
    SessionInactiveError,
    SessionNotFoundError,
    ValidationError,
)

from .conftest import NatsServer, new_id

pytestmark = pytest.mark.anyio


async def stream_count(bb: AsyncBlackbird) -> int:
    return await bb.journal.stream_last_seq()


async def session_commits(bb: AsyncBlackbird, session_id: str) -> int:
    subject = bb.journal.subjects.session(bb.settings.tenant, session_id)
    return len([e async for e in bb.journal.entries(subject)])


async def test_created_session_is_in_the_log_before_the_reply(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("user123", tier="pro", metadata={"dept": "research"})
    assert (s.user_id, s.tier, s.tenant, s.status) == ("user123", "pro", "acme", SessionStatus.ACTIVE)
    assert s.status == "active" and s.is_active and s.sequence > 0
    # the ack came from JetStream: the commit is readable straight from the stream
    entries = [e async for e in bb.journal.entries(bb.journal.subjects.session("acme", s.session_id))]
    assert [type(ev).__name__ for e in entries for ev in e.commit.events] == ["SessionCreated"]
    assert entries[0].seq == s.sequence


async def test_get_session_data_is_json_serialisable(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1", metadata={"n": 1, "tags": ["a"]})
    data = await bb.session_manager.get_session_data(s.session_id)
    assert data is not None
    assert json.loads(json.dumps(data))["metadata"] == {"n": 1, "tags": ["a"]}
    assert data["status"] == "active" and data["is_active"] is True


async def test_unknown_session_reads_as_none(bb: AsyncBlackbird) -> None:
    assert await bb.session_manager.get_session(new_id()) is None
    assert await bb.session_manager.get_session_data(new_id()) is None
    with pytest.raises(SessionNotFoundError):
        await bb.session_manager.touch_session(new_id())


async def test_activity_moves_last_activity(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    t = await bb.session_manager.touch_session(s.session_id, "chat")
    assert t.last_activity >= s.last_activity and t.version == s.version + 1


async def test_terminated_session_refuses_commands(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    await bb.session_manager.terminate_session(s.session_id)
    got = await bb.session_manager.get_session(s.session_id)
    assert got is not None and got.status is SessionStatus.TERMINATED and not got.is_active
    with pytest.raises(SessionInactiveError) as err:
        await bb.session_manager.touch_session(s.session_id)
    assert err.value.reason == "terminated"


async def test_tier_change_is_an_event_and_applies_limits(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1", tier="free")
    up = await bb.session_manager.change_tier(s.session_id, "enterprise")
    assert up.tier == "enterprise" and up.idle_timeout == bb.policy.tiers["enterprise"].idle_timeout
    entries = [e async for e in bb.journal.entries(bb.journal.subjects.session("acme", s.session_id))]
    assert type(entries[-1].commit.events[0]).__name__ == "TierChanged"


async def test_idle_session_expires_and_refuses_commands(nats_server: NatsServer) -> None:
    now = [1_800_000_000.0]
    async with AsyncBlackbird(nats_url=nats_server.url, clock=lambda: now[0]) as bb:
        s = await bb.session_manager.create_session("u1", tier="free")
        now[0] += bb.policy.tiers["free"].idle_timeout + 1
        with pytest.raises(SessionInactiveError) as err:
            await bb.session_manager.touch_session(s.session_id)
        assert err.value.reason == "idle_timeout"
        got = await bb.session_manager.get_session(s.session_id)
        assert got is not None and got.status is SessionStatus.EXPIRED and not got.is_active


async def test_retried_command_is_applied_once(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    s = await sm.create_session("u1", command_id="create-1", session_id="s-retry")
    again = await sm.create_session("u1", command_id="create-1", session_id="s-retry")
    assert again.session_id == s.session_id and again.version == 1
    for _ in range(3):
        await sm.touch_session("s-retry", command_id="touch-1")
    got = await sm.get_session("s-retry")
    assert got is not None and got.version == 2
    assert await session_commits(bb, "s-retry") == 2
    appended = await stream_count(bb)
    # a fresh host (no cached state, as after a crash) still recognises the retry
    assert bb.host is not None
    bb.host.passivate_idle(0)
    await sm.touch_session("s-retry", command_id="touch-1")
    assert await stream_count(bb) == appended
    with pytest.raises(SessionExistsError):
        await sm.create_session("u1", session_id="s-retry")


async def test_restart_on_the_same_data_folder_restores_every_session(tmp_path: Path) -> None:
    created = {}
    async with AsyncBlackbird(data_dir=tmp_path / "data", snapshot_every=3) as bb:
        for i in range(5):
            s = await bb.session_manager.create_session(f"user{i}", tier="basic", metadata={"i": i})
            for _ in range(i):
                s = await bb.session_manager.touch_session(s.session_id)
            created[s.session_id] = s
        await bb.session_manager.terminate_session(s.session_id)
        created[s.session_id] = await bb.session_manager.get_session(s.session_id)
    # the server was stopped with the last client; a new process-equivalent starts it again
    async with AsyncBlackbird(data_dir=tmp_path / "data") as bb:
        for sid, before in created.items():
            after = await bb.session_manager.get_session(sid)
            assert after == before


async def test_killed_server_keeps_every_acknowledged_command(nats_server: NatsServer) -> None:
    acked = []
    async with AsyncBlackbird(nats_url=nats_server.url) as bb:
        for i in range(20):
            acked.append(await bb.session_manager.create_session(f"u{i}"))
    nats_server.kill()  # SIGKILL: no graceful flush
    nats_server.start()
    async with AsyncBlackbird(nats_url=nats_server.url) as bb:
        for s in acked:
            assert await bb.session_manager.get_session(s.session_id) == s


async def test_snapshot_and_full_replay_give_the_same_session(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, snapshot_every=4) as bb:
        s = await bb.session_manager.create_session("u1")
        for _ in range(10):
            await bb.session_manager.touch_session(s.session_id)
        with_snapshot = await bb.session_manager.get_session(s.session_id)
        assert await bb.journal.load(AggregateKey("default", "session", s.session_id)) is not None
        await bb.journal.purge_snapshots()
        assert bb.host is not None
        bb.host.passivate_idle(0)
        assert await bb.session_manager.get_session(s.session_id) == with_snapshot


async def test_an_unreadable_snapshot_is_skipped_for_the_log(nats_server: NatsServer) -> None:
    """A snapshot another version wrote in another shape must not lock an aggregate out."""
    async with AsyncBlackbird(nats_url=nats_server.url, snapshot_every=4) as bb:
        s = await bb.session_manager.create_session("u1")
        for _ in range(10):
            await bb.session_manager.touch_session(s.session_id)
        expected = await bb.session_manager.get_session(s.session_id)
        key = AggregateKey("default", "session", s.session_id)
        await bb.journal.save(key, b"\x93not a snapshot of this shape")
        assert bb.host is not None
        bb.host.passivate_idle(0)
        assert await bb.session_manager.get_session(s.session_id) == expected
        await bb.session_manager.touch_session(s.session_id)  # and it takes commands again


BAD_INPUTS = [
    ("user_id", {"user_id": ""}),
    ("user_id", {"user_id": 42}),
    ("user_id", {"user_id": None}),
    ("user_id", {"user_id": "a.b"}),
    ("user_id", {"user_id": "a b"}),
    ("user_id", {"user_id": "a*"}),
    ("user_id", {"user_id": "a>"}),
    ("user_id", {"user_id": "x" * 10_000}),
    ("tier", {"tier": "gold"}),
    ("tier", {"tier": 3}),
    ("metadata", {"metadata": {"when": object()}}),
    ("metadata", {"metadata": {"x": float("nan")}}),
    ("metadata", ["not", "a", "dict"]),
    ("metadata", {"metadata": {"blob": "x" * 200_000}}),
    ("session_id", {"session_id": "s.1"}),
    ("session_id", {"session_id": "s 1"}),
    ("session_id", {"session_id": "*"}),
    ("tenant", {"tenant": "acme.corp"}),
    ("tenant", {"tenant": ">"}),
    ("command_id", {"command_id": "c 1"}),
]


@pytest.mark.parametrize(("field", "kwargs"), BAD_INPUTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_INPUTS)])
async def test_bad_input_gets_a_typed_error_naming_the_field_and_appends_nothing(
    bb: AsyncBlackbird, field: str, kwargs: object
) -> None:
    args = {"user_id": "u1"}
    if isinstance(kwargs, dict):
        args.update(kwargs)
    else:
        args["metadata"] = kwargs  # type: ignore[assignment]
    before = await stream_count(bb)
    with pytest.raises(ValidationError) as err:
        await bb.session_manager.create_session(**args)  # type: ignore[arg-type]
    assert err.value.field == field
    assert field in str(err.value)
    assert isinstance(err.value, BlackbirdError)
    assert await stream_count(bb) == before


async def test_huge_metadata_is_refused_as_too_large(bb: AsyncBlackbird) -> None:
    with pytest.raises(PayloadTooLargeError):
        await bb.session_manager.create_session("u1", metadata={"blob": "x" * 1_000_000})
    assert await stream_count(bb) == 0


async def test_tenants_cannot_see_or_terminate_each_others_sessions(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    mine = await sm.create_session("u1", tenant="acme", session_id="shared-name")
    assert await sm.get_session("shared-name", tenant="globex") is None
    with pytest.raises(SessionNotFoundError):
        await sm.terminate_session("shared-name", tenant="globex")
    theirs = await sm.create_session("u9", tenant="globex", session_id="shared-name")
    assert theirs.tenant == "globex" and theirs.user_id == "u9"
    still = await sm.get_session("shared-name", tenant="acme")
    assert still is not None and still.user_id == mine.user_id and still.is_active
    # the log keeps them apart too: acme's subject filter sees only acme's commits
    acme = [e async for e in bb.journal.entries(bb.journal.subjects.tenant_filter("acme"))]
    assert [e.subject for e in acme] == ["bb.acme.user.u1", "bb.acme.session.shared-name"]


def test_seed_session_example_runs_on_the_sync_facade() -> None:
    sdk = BlackbirdSDK(development_mode=True)
    try:
        session = sdk.session_manager.create_session(
            user_id="user123",
            tier="pro",
            metadata={"department": "research", "project": "ai_analysis", "created_by": "admin"},
        )
        assert session.status == "active" and session.user_id == "user123"
        data = sdk.session_manager.get_session_data(session.session_id)
        json.dumps(data)
        got = sdk.session_manager.get_session(session.session_id)
        assert got is not None and got.is_active and got.concurrent_operations == 0
        assert got.age_seconds >= 0 and got.idle_seconds >= 0
        data_dir = sdk.data_dir
    finally:
        sdk.close()
    assert data_dir is not None and not data_dir.exists()  # development mode cleans up
    sdk.close()  # idempotent


def test_sync_facade_is_thread_safe() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with BlackbirdSDK(development_mode=True) as sdk:
        s = sdk.session_manager.create_session("u1")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: sdk.session_manager.touch_session(s.session_id, command_id=f"t{i}"), range(64)))
        journal = sdk.async_client.journal

        async def command_ids() -> list[str]:
            subject = journal.subjects.session("default", s.session_id)
            return [cid async for e in journal.entries(subject) for cid in e.commit.command_ids]

        ids = sdk.run(command_ids)
        assert sorted(ids[1:]) == sorted(f"t{i}" for i in range(64))  # each applied exactly once


def test_sync_and_async_managers_expose_the_same_methods() -> None:
    import inspect

    from blackbird import AsyncSessionManager, SessionManager

    async_names = {
        n for n, m in inspect.getmembers(AsyncSessionManager, inspect.iscoroutinefunction) if not n.startswith("_")
    }
    sync_names = {n for n, m in inspect.getmembers(SessionManager, inspect.isfunction) if not n.startswith("_")}
    assert async_names <= sync_names
    assert {"create_session", "get_session", "get_session_data", "terminate_session"} <= async_names


def test_bad_settings_name_the_setting() -> None:
    with pytest.raises(ValidationError) as err:
        AsyncBlackbird(snapshot_every="often")
    assert err.value.field == "snapshot_every"
    with pytest.raises(ValidationError) as err:
        AsyncBlackbird(memory_cache_rows=-1)
    assert err.value.field == "memory_cache_rows" and ">= 0" in str(err.value)
    with pytest.raises(ValidationError):
        AsyncBlackbird(tenant="a.b")


async def test_following_a_tenant_replays_history_then_streams_live_commits(bb: AsyncBlackbird) -> None:
    import anyio

    sm = bb.session_manager
    first = await sm.create_session("u1", tenant="acme")
    await sm.create_session("u2", tenant="globex")  # another tenant: never seen below
    seen: list[tuple[int, str]] = []
    got_live = anyio.Event()

    async def follow() -> None:
        async for entry in bb.journal.follow(bb.journal.subjects.tenant_filter("acme")):
            seen.append((entry.seq, entry.subject))
            if len(seen) == 3:  # the user's session count, the creation, the live touch
                got_live.set()
                return

    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        live = await sm.touch_session(first.session_id, tenant="acme")
        with anyio.fail_after(10):
            await got_live.wait()
    subject = f"bb.acme.session.{first.session_id}"
    assert seen[0][1] == "bb.acme.user.u1" and seen[0][0] < first.sequence
    assert seen[1:] == [(first.sequence, subject), (live.sequence, subject)]
    # resuming after the first event yields exactly the rest: nothing lost, nothing repeated
    rest = [e.seq async for e in bb.journal.entries(bb.journal.subjects.tenant_filter("acme"), first.sequence)]
    assert rest == [live.sequence]


async def test_concurrent_commands_to_one_session_share_commits_and_apply_once(bb: AsyncBlackbird) -> None:
    import anyio

    sm = bb.session_manager
    s = await sm.create_session("u1", session_id="busy")
    answers: dict[str, object] = {}

    async def touch(i: int) -> None:
        answers[f"t{i}"] = await sm.touch_session("busy", command_id=f"t{i}")

    async with anyio.create_task_group() as tg:
        for i in range(200):
            tg.start_soon(touch, i)
    commits = [e.commit async for e in bb.journal.entries(bb.journal.subjects.session("acme", "busy"))]
    ids = [cid for c in commits for cid in c.command_ids]
    assert sorted(ids[1:]) == sorted(answers) and len(set(ids)) == len(ids) == 201
    assert len(commits) < 201  # queued commands were batched into shared commits
    assert [c.version for c in commits] == list(range(1, len(commits) + 1))
    final = await sm.get_session("busy")
    assert final is not None and final.version == len(commits) and s.version == 1


async def test_a_refusal_inside_a_batch_does_not_block_the_others(bb: AsyncBlackbird) -> None:
    import anyio

    sm = bb.session_manager
    await sm.create_session("u1", session_id="mixed")
    outcomes: list[str] = []

    async def run(coro_fn, label: str) -> None:  # type: ignore[no-untyped-def]
        try:
            await coro_fn()
            outcomes.append(f"{label}:ok")
        except SessionInactiveError:
            outcomes.append(f"{label}:inactive")

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(run, lambda: sm.touch_session("mixed"), f"touch{i}")
        tg.start_soon(run, lambda: sm.terminate_session("mixed"), "terminate")
        for i in range(20, 40):
            tg.start_soon(run, lambda: sm.touch_session("mixed"), f"touch{i}")
    assert "terminate:ok" in outcomes and len(outcomes) == 41
    # whatever ran after the termination was refused, and nothing after it reached the log
    entries = [e async for e in bb.journal.entries(bb.journal.subjects.session("acme", "mixed"))]
    kinds = [type(ev).__name__ for e in entries for ev in e.commit.events]
    assert kinds.count("SessionTerminated") == 1 and kinds[-1] == "SessionTerminated"
    ok_touches = sum(1 for o in outcomes if o.startswith("touch") and o.endswith(":ok"))
    assert ok_touches == kinds.count("SessionTouched")


async def test_reading_an_aggregate_returns_its_commits_in_order_however_far_behind(bb: AsyncBlackbird) -> None:
    """Direct gets for the first few commits, an ordered consumer for the rest: the same list."""
    from actors.events import Applied, Commit, SessionTouched

    key, other = AggregateKey("acme", "session", "r1"), AggregateKey("acme", "session", "r2")
    seqs: list[int] = []
    last = {key: 0, other: 0}
    for i in range(20):  # interleaved with another aggregate's commits
        for k in (key, other):
            touched = Applied(new_id(), "t", (SessionTouched(at=float(i), operation=k.id),))
            commit = Commit(at=float(i), version=i + 1, commands=(touched,))
            result = await bb.journal.append(k, commit, expected_seq=last[k], msg_id=commit.commands[0].command_id)
            last[k] = result.seq
            if k == key:
                seqs.append(result.seq)
    for after in (0, seqs[4], seqs[-3], seqs[-1]):
        read = await bb.journal.read(key, after)
        assert [seq for seq, _ in read] == [s for s in seqs if s > after]
        assert [c.version for _, c in read] == [seqs.index(s) + 1 for s in seqs if s > after]
    assert [s for s, _ in await bb.journal.read(key, 0, seqs[9])] == seqs[:10]  # up to a bound


async def test_follow_with_hands_commits_in_order_and_ends_with_the_handlers_error(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    for _ in range(3):
        await bb.session_manager.touch_session(s.session_id)
    subject = bb.journal.subjects.session(s.tenant, s.session_id)
    seen: list[int] = []

    async def on_entry(entry: Any) -> None:
        seen.append(entry.seq)
        if len(seen) == 3:
            raise LookupError("enough")

    with pytest.raises(LookupError, match="enough"):
        await bb.journal.follow_with(subject, 0, on_entry)
    assert seen == sorted(seen) and len(seen) == 3
