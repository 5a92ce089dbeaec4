"""One validation boundary: an ugly input gets the same typed rejection (code and field) whether
it comes through the SDK, as a raw NATS request or over HTTP, and the log holds nothing of it.

The limits are those of actors/validation.py (README's "Limits" table). Every test here runs on
a real nats-server, with a real actor host answering ``bbcmd.<tenant>.<session_id>`` requests.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NATS

from actors import validation
from actors.events import (
    AdjustQuota,
    Admit,
    CreateSession,
    OpenUserSession,
    SessionCreated,
    TouchSession,
    TrackUsage,
)
from actors.host import ActorHost
from actors.policy import QuotaType
from actors.ports import AggregateKey, NoSnapshots
from actors.tenant import PolicyBook
from actors.user import UserBehaviour
from blackbird import (
    AsyncBlackbird,
    BlackbirdError,
    PayloadTooLargeError,
    SessionLimitError,
    ValidationError,
)
from blackbird._validate import check_metadata
from blackbird.commands.dispatch import CREATION_GRACE, LocalDispatcher, ask_or_raise

from .clock import Clock
from .conftest import NatsServer, new_id, serving_http

pytestmark = pytest.mark.anyio

TENANT = "acme"
TOKENS = {"acme-reader-token-0001": TENANT}
NAN, INF = float("nan"), float("inf")


@pytest.fixture
async def host(nats_server: NatsServer) -> AsyncIterator[AsyncBlackbird]:
    """A client hosting the actors and serving the command subjects, as `blackbird serve` does."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant=TENANT, serve_commands=True) as bb:
        yield bb


async def raw(nc: NATS, session_id: str, command: dict[str, Any] | bytes, **envelope: Any) -> dict[str, Any]:
    """Send a raw request (a dict is encoded by the standard json module, NaN and lone
    surrogates included, as a careless client would) and return the decoded reply."""
    body = command if isinstance(command, bytes) else json.dumps({"command": command, **envelope}).encode()
    msg = await nc.request(f"bbcmd.{TENANT}.{session_id}", body, timeout=10)
    reply: dict[str, Any] = json.loads(msg.data)
    return reply


def nested_list(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def nested_dict(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"down": value}
    return value


DEEP = 100_000
DEEP_BODY = (
    b'{"command":{"type":"CreateSession","user_id":"u1","metadata":{"deep":'
    + b"[" * DEEP + b"1" + b"]" * DEEP + b"}}}"
)

SdkCall = Callable[[AsyncBlackbird, str], Awaitable[Any]]


def create(**options: Any) -> SdkCall:
    return lambda bb, sid: bb.session_manager.create_session(**{"user_id": "u1", **options})


def created(**fields: Any) -> dict[str, Any]:
    return {"type": "CreateSession", "user_id": "u1", **fields}


# name, the SDK call (on a session that exists, or creating one), the same command sent raw
# (a dict, or the request's bytes), the code and field both must be refused with (and the raw
# field where the SDK's parameter has another name than the command's field)
UGLY: list[tuple[str, SdkCall, dict[str, Any] | bytes, str, str, str | None]] = [
    ("a 200,000-character operation", lambda bb, sid: bb.session_manager.touch_session(sid, "x" * 200_000),
     {"type": "TouchSession", "operation": "x" * 200_000}, "validation_error", "operation", None),
    ("200 KB of metadata", create(metadata={"blob": "x" * 200_000}),
     created(metadata={"blob": "x" * 200_000}), "payload_too_large", "metadata", None),
    ("metadata just over 16 KiB", create(metadata={"blob": "x" * 16_380}),
     created(metadata={"blob": "x" * 16_380}), "payload_too_large", "metadata", None),
    ("metadata nested 100,000 deep", create(metadata={"deep": nested_list(DEEP)}),
     DEEP_BODY, "validation_error", "metadata", None),
    ("metadata nested 9 deep", create(metadata=nested_dict(9)),
     created(metadata=nested_dict(9)), "validation_error", "metadata", None),
    ("2**80 in metadata", create(metadata={"n": 2**80}),
     created(metadata={"n": 2**80}), "validation_error", "metadata", None),
    ("-(2**53)-1 in usage metadata",
     lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "tokens", 1, metadata={"n": -(2**53) - 1}),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "tokens", "amount": 1,
      "metadata": {"n": -(2**53) - 1}}, "validation_error", "metadata", None),
    ("NaN in metadata", create(metadata={"x": NAN}), created(metadata={"x": NAN}),
     "validation_error", "metadata", None),
    ("a NaN amount", lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "tokens", NAN),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "tokens", "amount": NAN},
     "validation_error", "amount", None),
    ("an infinite amount", lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "tokens", INF),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "tokens", "amount": INF},
     "validation_error", "amount", None),
    ("an amount as a string", lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "tokens", "12"),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "tokens", "amount": "12"},
     "validation_error", "amount", None),
    ("a negative amount", lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "tokens", -1),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "tokens", "amount": -1},
     "validation_error", "amount", None),
    ("a lone surrogate in an operation", lambda bb, sid: bb.session_manager.touch_session(sid, "op\ud800"),
     {"type": "TouchSession", "operation": "op\ud800"}, "validation_error", "operation", None),
    ("a lone surrogate in a user id", create(user_id="u\udc00"), created(user_id="u\udc00"),
     "validation_error", "user_id", None),
    ("a lone surrogate in a metadata key", create(metadata={"k\ud800": 1}), created(metadata={"k\ud800": 1}),
     "validation_error", "metadata", None),
    ("a lone surrogate in a message",
     lambda bb, sid: bb.session_manager.send_message("hi \ud83d", session_id=sid),
     {"type": "PostMessage", "text": "hi \ud83d"}, "validation_error", "message", "text"),
    ("a 70,000-character message", lambda bb, sid: bb.session_manager.send_message("x" * 70_000, session_id=sid),
     {"type": "PostMessage", "text": "x" * 70_000}, "validation_error", "message", "text"),
    ("a channel ending in a newline",
     lambda bb, sid: bb.session_manager.send_message("hi", session_id=sid, channel="chat\n"),
     {"type": "PostMessage", "text": "hi", "channel": "chat\n"}, "validation_error", "channel", None),
    ("an unknown quota", lambda bb, sid: bb.session_manager.track_usage(sid, "llm", "gold", 1),
     {"type": "TrackUsage", "operation": "llm", "resource_type": "gold", "amount": 1},
     "validation_error", "resource_type", None),
    ("an unknown rate window", lambda bb, sid: bb.session_manager.enforce_rate_limit(sid, "llm", "per_fortnight"),
     {"type": "CheckRate", "operation": "llm", "limit_type": "per_fortnight"}, "validation_error", "limit_type", None),
    ("an unknown tier", create(tier="gold"), created(tier="gold"), "validation_error", "tier", None),
    ("a boolean as a string", lambda bb, sid: bb.session_manager.admit(sid, "llm", rate="false"),  # type: ignore[arg-type]
     {"type": "Admit", "operation": "llm", "rate": "false"}, "validation_error", "rate", None),
    ("a cost of an unknown quota", lambda bb, sid: bb.session_manager.admit(sid, "llm", {"gold": 1}),
     {"type": "Admit", "operation": "llm", "costs": {"gold": 1}}, "validation_error", "costs", None),
    ("a lease of 30 years", lambda bb, sid: bb.session_manager.admit(sid, "llm", lease_seconds=1e9),
     {"type": "Admit", "operation": "llm", "lease_seconds": 1e9}, "validation_error", "lease_seconds", None),
    ("an instant after the year 9999",
     lambda bb, sid: bb.session_manager.adjust_quota(sid, "tokens", 10, until=1e300),
     {"type": "AdjustQuota", "resource_type": "tokens", "limit": 10, "until": 1e300},
     "validation_error", "until", None),
    ("a user id with a dot", create(user_id="a.b"), created(user_id="a.b"), "validation_error", "user_id", None),
    ("a 300-character tier", create(tier="t" * 300), created(tier="t" * 300), "validation_error", "tier", None),
]


def outcome_of(exc: BaseException) -> tuple[str, str]:
    assert isinstance(exc, BlackbirdError), repr(exc)  # typed, never a traceback from deep inside
    return exc.code, exc.fields.get("field", "")


@pytest.mark.parametrize(("name", "sdk", "command", "code", "field", "raw_field"), UGLY, ids=[u[0] for u in UGLY])
async def test_an_ugly_input_gets_the_same_typed_rejection_from_the_sdk_and_raw_nats(
    host: AsyncBlackbird, nc: NATS, name: str, sdk: SdkCall, command: dict[str, Any] | bytes,
    code: str, field: str, raw_field: str | None,
) -> None:
    s = await host.session_manager.create_session("u0", tier="pro")
    before = await host.journal.stream_last_seq()
    with pytest.raises(BlackbirdError) as err:
        await sdk(host, s.session_id)
    assert outcome_of(err.value) == (code, field), err.value
    if code == "payload_too_large":
        assert isinstance(err.value, PayloadTooLargeError)
    creating = isinstance(command, bytes) or command.get("type") == "CreateSession"
    reply = await raw(nc, new_id() if creating else s.session_id, command)
    rejection = reply["rejection"]
    assert rejection is not None
    if creating:
        assert reply["session"] is None
    assert (rejection["code"], rejection["fields"]["field"]) == (code, raw_field or field), rejection
    assert await host.journal.stream_last_seq() == before  # no commit from either


async def test_commands_built_in_process_meet_the_same_rules_on_the_host(host: AsyncBlackbird) -> None:
    """Structs built in process skip the decoding a raw request gets (msgspec does not re-check
    an instance): the host's dispatcher holds them to the same constraints anyway."""
    s = await host.session_manager.create_session("u0", tier="pro")
    assert host.host is not None
    dispatcher = LocalDispatcher(host.host)
    before = await host.journal.stream_last_seq()
    bad: list[tuple[Any, str]] = [
        (TouchSession(operation="x" * 300), "operation"),
        (TouchSession(operation="a\ud800"), "operation"),
        (Admit(operation="llm", rate="false"), "rate"),  # type: ignore[arg-type]
        (TrackUsage(operation="llm", resource_type="gold", amount=1.0), "resource_type"),  # type: ignore[arg-type]
        (TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=NAN), "amount"),
        (TrackUsage(operation="llm", resource_type=QuotaType.TOKENS, amount=1.0, metadata={"n": 2**80}), "metadata"),
        (AdjustQuota(resource_type=QuotaType.TOKENS, limit=-1.0), "limit"),
        (CreateSession(user_id="u\n"), "user_id"),
    ]
    for command, field in bad:
        reply = await dispatcher.dispatch(TENANT, s.session_id, command, new_id(), "test")
        assert reply.rejection is not None and reply.rejection.fields["field"] == field, (command, reply.rejection)
    # the memory, user and tenant command paths validate too
    key = AggregateKey(TENANT, "memory", "user:u0")
    with pytest.raises(ValidationError) as err:
        await ask_or_raise(host.host, key, TouchSession(operation="\udfff"), None, "test")
    assert err.value.field == "operation"
    assert await host.journal.stream_last_seq() == before


async def test_booleans_must_be_booleans(host: AsyncBlackbird) -> None:
    sm = host.session_manager
    s = await sm.create_session("u0", tier="pro")
    before = await host.journal.stream_last_seq()
    for flag in ("false", 0, None):
        with pytest.raises(ValidationError) as err:
            await sm.manage_concurrency(s.session_id, "op", flag)  # type: ignore[arg-type]
        assert err.value.field == "increment"
    for option in ("rate", "slot", "reserve"):
        with pytest.raises(ValidationError) as err:
            await sm.admit(s.session_id, "op", **{option: "no"})
        assert err.value.field == option
    assert (await sm.get_session(s.session_id)).concurrent_operations == 0  # type: ignore[union-attr]
    assert await host.journal.stream_last_seq() == before


# ------------------------------------------------------------------------------------------ limits


async def test_raw_nats_cannot_open_more_sessions_than_the_users_tier_allows(host: AsyncBlackbird, nc: NATS) -> None:
    limit = host.policy.tiers["free"].max_sessions_per_user
    create_u5 = {"type": "CreateSession", "user_id": "u5", "tier": "free"}
    replies: list[dict[str, Any]] = []

    async def one(sid: str) -> None:
        replies.append(await raw(nc, sid, create_u5))

    async with anyio.create_task_group() as tg:  # all at once: the user's actor counts them exactly
        for i in range(limit + 2):
            tg.start_soon(one, f"raw-{i}")
    accepted = [r for r in replies if r["rejection"] is None]
    refused = [r["rejection"] for r in replies if r["rejection"] is not None]
    assert len(accepted) == limit
    assert [(r["code"], r["fields"]["used"], r["fields"]["limit"]) for r in refused] == [
        ("session_limit", limit, limit)
    ] * 2
    with pytest.raises(SessionLimitError):  # the SDK is told the same
        await host.session_manager.create_session("u5", tier="free")
    sessions = [
        e for entry in [x async for x in host.journal.entries(host.journal.subjects.tenant_filter(TENANT))]
        for e in entry.commit.events if isinstance(e, SessionCreated) and e.user_id == "u5"
    ]
    assert len(sessions) == limit
    # terminated over raw NATS, a session makes room over raw NATS
    first = accepted[0]["session"]["session_id"]
    assert (await raw(nc, first, {"type": "TerminateSession"}))["rejection"] is None
    assert (await raw(nc, "raw-again", create_u5))["rejection"] is None
    refused_again = await raw(nc, "raw-more", create_u5)
    assert refused_again["rejection"]["code"] == "session_limit"


async def test_a_remote_client_is_held_to_the_same_rules_by_the_host(
    host: AsyncBlackbird, nats_server: NatsServer
) -> None:
    """A remote client hosts nothing: the host that serves its commands validates them and
    counts its users' sessions."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant=TENANT, remote=True) as client:
        sm = client.session_manager
        limit = host.policy.tiers["free"].max_sessions_per_user
        sessions = [await sm.create_session("u6", tier="free") for _ in range(limit)]
        with pytest.raises(SessionLimitError):
            await sm.create_session("u6", tier="free")
        await sm.terminate_session(sessions[0].session_id)
        await sm.create_session("u6", tier="free")
        before = await host.journal.stream_last_seq()
        with pytest.raises(ValidationError) as err:
            await sm.touch_session(sessions[1].session_id, "op\ud800")
        assert err.value.field == "operation"
        assert await host.journal.stream_last_seq() == before


async def test_a_refused_creation_leaves_the_users_count_as_it_was(host: AsyncBlackbird, nc: NATS) -> None:
    sm = host.session_manager
    limit = host.policy.tiers["free"].max_sessions_per_user
    taken = await sm.create_session("u7", tier="free")
    before = await host.journal.stream_last_seq()
    with pytest.raises(ValidationError):  # unencodable metadata: refused before the user counts it
        await sm.create_session("u7", tier="free", metadata={"bad": 2**80})
    assert (await raw(nc, "u7-x", {"type": "CreateSession", "user_id": "u7", "tier": "gold"}))["rejection"]["code"] == (
        "validation_error"
    )
    assert await host.journal.stream_last_seq() == before
    # a taken session id is refused after the place was counted, and the place is given back
    reply = await raw(nc, taken.session_id, {"type": "CreateSession", "user_id": "u8", "tier": "free"})
    assert reply["rejection"]["code"] == "session_exists"
    for _ in range(limit - 1):
        await sm.create_session("u7", tier="free")
    for _ in range(limit):
        await sm.create_session("u8", tier="free")  # u8 lost nothing to the refused creation


async def test_a_creation_still_in_flight_keeps_its_place_and_one_that_never_came_keeps_it_for_a_while(
    nats_server: NatsServer,
) -> None:
    """The reconciliation at the limit closes sessions that lapsed or never came to exist, but
    not one counted a moment ago whose creation is still on its way (another host's, say)."""
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant=TENANT, clock=clock) as bb:
        sm = bb.session_manager
        limit = bb.policy.tiers["free"].max_sessions_per_user
        for _ in range(limit - 1):
            await sm.create_session("u9", tier="free")
        # a second host counted a session for u9 and has not created it yet
        async with ActorHost(UserBehaviour(PolicyBook(bb.policy)), bb.journal, NoSnapshots(), clock=clock) as other:
            await ask_or_raise(other, AggregateKey(TENANT, "user", "u9"),
                               OpenUserSession(session_id="in-flight", tier="free"), None, "other-host")
        with pytest.raises(SessionLimitError):
            await sm.create_session("u9", tier="free")
        clock.now += CREATION_GRACE + 1  # long enough: that creation is not coming
        await sm.create_session("u9", tier="free")
        with pytest.raises(SessionLimitError):
            await sm.create_session("u9", tier="free")


async def test_a_2_80_metadata_value_cannot_poison_a_session_and_boundary_values_survive_snapshots(
    nats_server: NatsServer, nc: NATS,
) -> None:
    """`create_session(metadata={"n": 2**80})` used to be accepted; at the session's 500th
    commit the msgpack snapshot raised OverflowError and took the host down, again after every
    restart. Now it is refused on every path, and the largest values allowed round-trip through
    the log and snapshots."""
    edge = {"max": 2**53, "min": -(2**53), "big": 1.7976931348623157e308, "tiny": 5e-324, "text": "é😀\u2028",
            "deep": nested_dict(7)}
    async with AsyncBlackbird(nats_url=nats_server.url, tenant=TENANT, serve_commands=True, snapshot_every=20) as bb:
        sm = bb.session_manager
        with pytest.raises(ValidationError) as err:
            await sm.create_session("u1", metadata={"n": 2**80})
        assert err.value.field == "metadata"
        poison = await raw(nc, "poison", {"type": "CreateSession", "user_id": "u1", "metadata": {"n": 2**80}})
        assert poison["rejection"]["fields"]["field"] == "metadata" and poison["session"] is None
        s = await sm.create_session("u1", tier="pro", metadata=edge)
        other = await sm.create_session("u2", tier="pro")
        for i in range(600):  # 30 snapshots of the session on the way
            await sm.touch_session(s.session_id, f"op{i % 7}")
        await sm.touch_session(other.session_id)
        assert bb.host is not None
        await bb.host.snapshot_all()
        assert await bb.journal.load(AggregateKey(TENANT, "session", s.session_id)) is not None
        bb.host.passivate_idle(0)  # reactivated from the snapshot
        again = await sm.get_session(s.session_id)
        assert again is not None and again.metadata == edge and again.is_active
    async with AsyncBlackbird(nats_url=nats_server.url, tenant=TENANT, snapshot_every=20) as restarted:
        sm = restarted.session_manager
        after = await sm.get_session(s.session_id)
        assert after is not None and after.metadata == edge
        await sm.touch_session(s.session_id)
        await sm.touch_session(other.session_id)


# ------------------------------------------------------------------------------------------ memory


async def test_bad_memory_input_is_refused_before_storage_is_charged(host: AsyncBlackbird) -> None:
    sm, memory = host.session_manager, host.memory
    s = await sm.create_session("u0", tier="pro")
    before = await host.journal.stream_last_seq()
    calls: list[tuple[Awaitable[Any], str]] = [
        (memory.remember("fact", session_id=s.session_id, metadata={"n": 2**80}), "metadata"),
        (memory.remember("fact", session_id=s.session_id, metadata={"d": nested_list(DEEP)}), "metadata"),
        (memory.remember("fact \ud800", session_id=s.session_id), "text"),
        (memory.remember("fact", session_id=s.session_id, vector="0.1, 0.2"), "vector"),  # type: ignore[arg-type]
        (memory.remember("fact", session_id=s.session_id, kind="k\udc00"), "kind"),
        (memory.recall("fact", session_id=s.session_id, as_of=NAN), "as_of"),
        (memory.recall("fact", session_id=s.session_id, as_of=1e300), "as_of"),
        (memory.recall("fact", session_id=s.session_id, weights=["similarity"]), "weights"),  # type: ignore[arg-type]
        (memory.recall("fact", session_id=s.session_id, weights={"similarity": "high"}), "weights"),
        (memory.set("k", nested_list(DEEP), session_id=s.session_id), "value"),
        (memory.set("k", {"n": 2**64}, session_id=s.session_id), "value"),
    ]
    for call, field in calls:
        with pytest.raises(ValidationError) as err:
            await call
        assert err.value.field == field, (field, err.value)
    assert (await sm.get_quota(s.session_id, "storage"))["used"] == 0
    assert await host.journal.stream_last_seq() == before


async def test_queries_refuse_numbers_outside_their_range_with_a_typed_error(host: AsyncBlackbird) -> None:
    sm = host.session_manager
    s = await sm.create_session("u0")
    calls: list[tuple[Awaitable[Any], str]] = [
        (host.audit.replay(session_id=s.session_id, until=10**400), "until"),  # was OverflowError
        (host.audit.replay(session_id=s.session_id, until=NAN), "until"),
        (sm.get_usage_history("u0", since=NAN), "since"),  # answered [] before
        (sm.predict_quota_exhaustion(s.session_id, INF), "window"),
    ]
    for call, field in calls:
        with pytest.raises(ValidationError) as err:
            await call
        assert err.value.field == field


# ------------------------------------------------------------------------------------------ HTTP


@pytest.fixture
async def sse(host: AsyncBlackbird) -> AsyncIterator[str]:
    async with serving_http(host, TOKENS) as url:
        yield url


async def test_http_answers_ugly_input_with_the_sdks_typed_error_as_json(host: AsyncBlackbird, sse: str) -> None:
    s = await host.session_manager.create_session("u0")
    auth = {"Authorization": f"Bearer {next(iter(TOKENS))}"}
    digits = "1" * 10_000
    async with httpx.AsyncClient(timeout=10) as http:
        url = f"{sse}/v1/sessions/{s.session_id}/events"
        for headers, query, field in [
            ({"Last-Event-ID": digits}, "", "Last-Event-ID"),
            ({"Last-Event-ID": "9007199254740993"}, "", "Last-Event-ID"),  # 2**53 + 1
            ({}, f"?after={digits}", "after"),
            ({}, "?after=1-2-3", "after"),
        ]:
            bad = await http.get(url + query, headers={**auth, **headers})
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"]["code"] == "validation_error" and bad.json()["error"]["field"] == field
        long_id = await http.get(f"{sse}/v1/sessions/{'s' * 200}/events", headers=auth)
        assert long_id.status_code == 400 and long_id.json()["error"]["field"] == "session_id"
    for after in (digits, "1-2-3"):  # the SDK names the same field
        with pytest.raises(ValidationError) as err:
            async with host.streams.subscribe(s.session_id, after=after):
                pass
        assert err.value.field == "after"
    with pytest.raises(ValidationError) as err:
        await host.session_manager.get_session("s" * 200)
    assert err.value.field == "session_id"


# ------------------------------------------------------------------------------------------ properties

# any character, lone surrogates (which no encoder takes) included
_CHARS = st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
_SCALARS = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70) | st.sampled_from([2**53, -(2**53), 2**53 + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(_CHARS, max_size=20),
)


def _json_like(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        leaves,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(_CHARS, max_size=8), children,
                                                                           max_size=4),
        max_leaves=30,
    )


def _plain(value: Any) -> Any:
    """``value`` as JSON carries it (tuples are lists)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _fits(value: Any) -> bool:
    """What the rules accept, said independently of actors.validation (recursion is fine for
    the small values hypothesis makes)."""

    def ok(v: Any, depth: int) -> bool:
        if isinstance(v, str):
            return not any(0xD800 <= ord(c) <= 0xDFFF for c in v)
        if v is None or isinstance(v, bool):
            return True
        if isinstance(v, int):
            return abs(v) <= 2**53
        if isinstance(v, float):
            return math.isfinite(v)
        if isinstance(v, list | tuple):
            return depth <= validation.MAX_DEPTH and all(ok(x, depth + 1) for x in v)
        if isinstance(v, dict):
            return depth <= validation.MAX_DEPTH and all(ok(k, depth) and ok(x, depth + 1) for k, x in v.items())
        return False

    return ok(value, 1)


@settings(max_examples=400, deadline=None)
@given(_json_like(_SCALARS | st.tuples(_SCALARS) | st.sampled_from([object(), b"bytes", {1, 2}, 1j])))
def test_any_value_is_either_plain_json_that_round_trips_or_a_validation_error(value: Any) -> None:
    document = {"value": value}
    try:
        checked = check_metadata(document)
    except ValidationError as exc:
        assert exc.field == "metadata"
        assert not _fits(document) or len(msgspec.json.encode(document)) > validation.MAX_METADATA_BYTES
        return
    assert _fits(document)
    assert checked == _plain(document)
    assert msgspec.json.decode(msgspec.json.encode(checked)) == checked  # the log
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(checked)) == checked  # snapshots


async def test_arbitrary_metadata_is_kept_exactly_or_refused_alike_by_the_sdk_and_raw_nats(
    host: AsyncBlackbird, nc: NATS
) -> None:
    """Either both paths accept the metadata and it comes back identical from the log and from a
    snapshot, or both refuse it with the same code and field."""
    assert host.host is not None
    actors = host.host
    sm = host.session_manager

    async def attempt(metadata: dict[str, Any]) -> None:
        sid_sdk, sid_raw = new_id(), new_id()
        try:
            via_sdk: Any = await sm.create_session(new_id(), tier="pro", metadata=metadata, session_id=sid_sdk)
        except BlackbirdError as exc:
            via_sdk = outcome_of(exc)
        reply = await raw(nc, sid_raw, {"type": "CreateSession", "user_id": new_id(), "tier": "pro",
                                        "metadata": metadata})
        if isinstance(via_sdk, tuple):
            rejection = reply["rejection"]
            assert rejection is not None, metadata
            assert (rejection["code"], rejection["fields"]["field"]) == via_sdk
            return
        assert reply["rejection"] is None, reply["rejection"]
        assert via_sdk.metadata == metadata and reply["session"]["metadata"] == metadata
        await actors.snapshot_all()
        actors.passivate_idle(0)
        for sid in (sid_sdk, sid_raw):  # from the snapshot, and from the log alone
            session = await sm.get_session(sid)
            assert session is not None and session.metadata == metadata
            commits = await host.journal.read(AggregateKey(TENANT, "session", sid), 0)
            assert [e.metadata for _, c in commits for e in c.events if isinstance(e, SessionCreated)] == [metadata]

    json_leaves = st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(2**60), max_value=2**60),
        st.floats(allow_nan=True, allow_infinity=True), st.text(_CHARS, max_size=10),
    )

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.text(max_size=6), _json_like(json_leaves), max_size=3))
    def run(metadata: dict[str, Any]) -> None:
        anyio.from_thread.run(attempt, metadata)

    await anyio.to_thread.run_sync(run)


def test_readme_states_the_declared_limits() -> None:
    """README's "Limits" table says what actors/validation.py declares (one source, told once)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("### Limits")
    table = readme[start:readme.index("\n#", start + 1)]
    v = validation
    stated = [
        f"1–{v.MAX_ID_LENGTH} characters", f"1–{v.MAX_NAME_LENGTH} characters",
        f"{v.MAX_MESSAGE_LENGTH:,} / {v.MAX_MEMORY_TEXT:,} characters",
        f"{v.MAX_METADATA_BYTES // 1024} KiB encoded and {v.MAX_DEPTH} levels",
        f"{v.MAX_POLICY_BYTES // 1024} KiB encoded and {v.MAX_DEPTH} levels",
        f"at most {v.MAX_INSTANT:.0f}", f"at most {v.MAX_DURATION / 86400:.0f} days",
    ]
    for text in stated:
        assert text in table, text
    assert v.MAX_CACHE_VALUE_BYTES == v.MAX_POLICY_BYTES  # one row says both
    assert v.MAX_SAFE_INT == 2**53 and "±2**53" in table
    assert v.MAX_AMOUNT == 1e15 and "0 to 1e15" in table
