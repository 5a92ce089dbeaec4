"""Session streams on a real nats-server: history then live, resume by event id with nothing lost
or repeated (inside one commit, across a killed server), channel filters, progress coalescing
for a slow reader, tenant walls, typed errors, and the same over HTTP as Server-Sent Events
(a real uvicorn server and an httpx client)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import msgspec
import pytest

from actors.events import Applied, Commit, MessagePosted
from actors.ports import AggregateKey
from blackbird import AsyncBlackbird, BlackbirdSDK, SessionNotFoundError, ValidationError
from blackbird.http.app import load_tokens
from blackbird.streams.subscription import StreamEvent, Subscription

from .conftest import NatsServer, new_id, serving_http

pytestmark = pytest.mark.anyio


async def take(stream: Subscription, n: int) -> list[StreamEvent]:
    out: list[StreamEvent] = []
    for _ in range(n):
        event = await stream.get(timeout=10)
        assert event is not None, f"only {len(out)} of {n} messages came"
        out.append(event)
    return out


async def post(bb: AsyncBlackbird, sid: str, texts: list[str], channel: str = "chat") -> None:
    for text in texts:
        await bb.session_manager.send_message(text, session_id=sid, channel=channel)


# "Nothing more came" is checked by a sentinel appended after the data: reading up to it shows
# whatever else the stream would deliver (a trailing duplicate, a repeat), with no wait for time.
SENTINEL = "end-of-test-data"


async def until_sentinel(stream: Subscription) -> list[StreamEvent]:
    """Every message before the sentinel (which must come within 10 s)."""
    out: list[StreamEvent] = []
    while True:
        event = await stream.get(timeout=10)
        assert event is not None, f"no sentinel after {[e.text for e in out]}"
        if event.text == SENTINEL:
            return out
        out.append(event)
        assert len(out) <= 1_000, "no sentinel after 1,000 messages"


async def test_a_subscriber_gets_the_history_then_live_messages_in_order(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["a", "b", "c"])
    async with bb.streams.subscribe(s.session_id) as stream:
        history = await take(stream, 3)
        await post(bb, s.session_id, ["d", "e", SENTINEL])
        live = await until_sentinel(stream)
    got = history + live
    assert [e.text for e in got] == ["a", "b", "c", "d", "e"]
    positions = [(e.sequence, e.index) for e in got]
    assert positions == sorted(positions) and len(set(positions)) == 5
    assert all(e.id == f"{e.sequence}-{e.index}" and e.session_id == s.session_id and e.tenant == "acme" for e in got)


async def test_resuming_after_any_id_gives_the_rest_once_even_inside_one_commit(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["before"])
    # one commit holding three messages (as a group commit of three PostMessage would be)
    key = AggregateKey("acme", "session", s.session_id)
    last = await bb.journal.last_seq(key)
    now = time.time()
    events = tuple(
        Applied(new_id(), "t", (MessagePosted(at=now, channel="chat", text=t, metadata={}),)) for t in ("x", "y", "z")
    )
    commit = Commit(at=now, version=s.version + 2, commands=events)
    await bb.journal.append(key, commit, expected_seq=last, msg_id=new_id())
    await post(bb, s.session_id, ["after", SENTINEL])
    async with bb.streams.subscribe(s.session_id) as stream:
        everything = await until_sentinel(stream)
    assert [e.text for e in everything] == ["before", "x", "y", "z", "after"]
    assert [e.index for e in everything[1:4]] == [0, 1, 2] and len({e.sequence for e in everything[1:4]}) == 1
    for i, seen in enumerate(everything):  # resume after each id in turn: exactly the rest, once
        async with bb.streams.subscribe(s.session_id, after=seen.id) as stream:
            rest = await until_sentinel(stream)
        assert [e.id for e in rest] == [e.id for e in everything[i + 1 :]]
    # a plain sequence means "after that whole commit"
    async with bb.streams.subscribe(s.session_id, after=everything[1].sequence) as stream:
        assert [e.text for e in await take(stream, 1)] == ["after"]


async def test_channels_filter_and_a_slow_reader_gets_the_latest_progress(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["hello"])
    await post(bb, s.session_id, [f"{p}%" for p in range(0, 60, 10)], channel="progress")
    await post(bb, s.session_id, ["disk full"], channel="notification")
    await post(bb, s.session_id, ["60%", "70%"], channel="progress")
    async with bb.streams.subscribe(s.session_id) as stream:
        await stream.caught_up()  # the reader has taken nothing yet
        got = await take(stream, stream.backlog)
        assert stream.coalesced == 7  # eight progress messages, the last one kept
    # the notification first (critical), the latest progress only, nothing else dropped
    assert [(e.channel, e.text) for e in got] == [("notification", "disk full"), ("chat", "hello"), ("progress", "70%")]
    # a reconnect after the notification (taken early) still gets "hello", and not the notification
    async with bb.streams.subscribe(s.session_id, after=got[0].resume) as stream:
        again = await take(stream, 2)
    assert [(e.channel, e.text) for e in again] == [("chat", "hello"), ("progress", "70%")]
    async with bb.streams.subscribe(s.session_id, coalesce=(), critical=()) as stream:  # every step, in log order
        await stream.caught_up()
        assert stream.backlog == 10 and stream.coalesced == 0
        in_order = await take(stream, 10)
        assert [e.text for e in in_order][:3] == ["hello", "0%", "10%"]
        assert all(e.resume == e.id or e.resume == str(e.sequence) for e in in_order)
    await post(bb, s.session_id, [SENTINEL])
    async with bb.streams.subscribe(s.session_id, channels=["chat", "notification"], critical=()) as stream:
        assert [e.text for e in await until_sentinel(stream)] == ["hello", "disk full"]  # no progress


async def test_a_killed_server_keeps_every_message_and_streams_resume(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        s = await bb.session_manager.create_session("u1")
        await post(bb, s.session_id, [f"m{i}" for i in range(6)])
        async with bb.streams.subscribe(s.session_id) as stream:
            seen = await take(stream, 3)
    nats_server.kill()  # SIGKILL: no graceful flush
    nats_server.start()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        async with bb.streams.subscribe(s.session_id, after=seen[-1].id) as stream:
            rest = await take(stream, 3)
            await post(bb, s.session_id, ["m6", SENTINEL])
            rest += await until_sentinel(stream)
    assert [e.text for e in seen + rest] == [f"m{i}" for i in range(7)]


async def test_tenants_are_walls_for_streams(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        s = await bb.session_manager.create_session("u1")
        await post(bb, s.session_id, ["acme secret"])
        with pytest.raises(SessionNotFoundError):
            async with bb.streams.subscribe(s.session_id, tenant="globex"):
                pass
        other = await bb.session_manager.create_session("u1", tenant="globex")
        await bb.session_manager.send_message("globex news", session_id=other.session_id, tenant="globex")
        await bb.session_manager.send_message(SENTINEL, session_id=other.session_id, tenant="globex")
        await post(bb, s.session_id, [SENTINEL])
        async with bb.streams.subscribe(other.session_id, tenant="globex") as stream:
            assert [e.text for e in await until_sentinel(stream)] == ["globex news"]
        async with bb.streams.subscribe(s.session_id) as stream:  # each tenant sees its own only
            assert [e.text for e in await until_sentinel(stream)] == ["acme secret"]


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"after": "garbage"}, "after"), ({"after": -3}, "after"), ({"after": "3-x"}, "after"),
        ({"channels": []}, "channels"), ({"channels": "chat"}, "channels"), ({"channels": ["a.b"]}, "channels"),
        ({"max_pending": 0}, "max_pending"), ({"coalesce": ["*"]}, "coalesce"), ({"coalesce": "progress"}, "coalesce"),
        ({"critical": "notification"}, "critical"), ({"after": "3-1+x"}, "after"),
    ],
)
async def test_bad_stream_input_gets_a_typed_error_naming_the_field(
    bb: AsyncBlackbird, options: dict[str, Any], field: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    with pytest.raises(ValidationError) as info:
        async with bb.streams.subscribe(s.session_id, **options):
            pass
    assert info.value.fields["field"] == field


# ------------------------------------------------------------------------------------------ SSE

TOKENS = {"acme-reader-token-0001": "acme", "globex-reader-token-01": "globex"}


async def sse_until_sentinel(lines: AsyncIterator[str]) -> list[dict[str, Any]]:
    """Every SSE event before the sentinel message (which must come within 10 s)."""
    out: list[dict[str, Any]] = []
    while True:
        [event] = await sse_events(lines, 1)
        if event["data"]["text"] == SENTINEL:
            return out
        out.append(event)
        assert len(out) <= 1_000, "no sentinel after 1,000 events"


async def sse_events(lines: AsyncIterator[str], n: int) -> list[dict[str, Any]]:
    """The next ``n`` events from an SSE response's lines: {"id", "event", "data"} each."""
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    with anyio.fail_after(10):
        async for line in lines:
            if not line:
                if "data" in current:
                    events.append(current)
                    if len(events) == n:
                        return events
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = msgspec.json.decode(value) if name == "data" else value
    return events


@pytest.fixture
async def sse(bb: AsyncBlackbird) -> AsyncIterator[str]:
    """The streams of ``bb`` over HTTP on a real uvicorn server; yields its base URL."""
    async with serving_http(bb, TOKENS) as url:
        yield url


async def test_sse_streams_a_session_and_resumes_with_last_event_id(bb: AsyncBlackbird, sse: str) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["one", "two", "three"])
    url = f"{sse}/v1/sessions/{s.session_id}/events"
    auth = {"Authorization": f"Bearer {next(iter(TOKENS))}"}
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", url, headers=auth) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            first = await sse_events(response.aiter_lines(), 2)
        assert [e["data"]["text"] for e in first] == ["one", "two"]
        assert [e["event"] for e in first] == ["chat", "chat"]
        assert all(e["id"] == e["data"]["resume"] for e in first)
        await post(bb, s.session_id, ["four"])
        # reconnect as an EventSource does: the last id it saw, then everything after it once
        async with http.stream("GET", url, headers={**auth, "Last-Event-ID": first[-1]["id"]}) as response:
            lines = response.aiter_lines()
            rest = await sse_events(lines, 2)
            await post(bb, s.session_id, ["five"], channel="progress")
            await post(bb, s.session_id, [SENTINEL])
            rest += await sse_until_sentinel(lines)
        assert [(e["event"], e["data"]["text"]) for e in rest] == [
            ("chat", "three"), ("chat", "four"), ("progress", "five"),
        ]
        # the sentinel on a channel of its own: on "progress" it would replace "five" (coalescing)
        await post(bb, s.session_id, [SENTINEL], channel="end")
        async with http.stream("GET", url + "?channels=progress,end", headers=auth) as response:
            assert [e["data"]["text"] for e in await sse_until_sentinel(response.aiter_lines())] == ["five"]


async def test_sse_resumes_after_a_notification_that_jumped_the_queue_missing_and_repeating_nothing(
    bb: AsyncBlackbird, sse: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["a", "b", "c"])
    async with bb.streams.subscribe(s.session_id) as stream:
        await stream.caught_up()  # the reader is behind: a, b and c wait for it
        await post(bb, s.session_id, ["disk full"], channel="notification")
        with anyio.fail_after(10):
            while stream.backlog < 4:  # the notification has joined the waiting messages
                await anyio.sleep(0.01)
        jumped = await stream.get(timeout=10)
        then = await stream.get(timeout=10)
    assert jumped is not None and then is not None
    assert (jumped.channel, jumped.text, then.text) == ("notification", "disk full", "a")
    # each token lists the notification taken early ("<watermark>+<notification's id>")
    assert jumped.resume.endswith(f"+{jumped.id}") and then.resume.endswith(f"+{jumped.id}")
    assert jumped.resume != then.resume
    await post(bb, s.session_id, ["d", SENTINEL])
    url = f"{sse}/v1/sessions/{s.session_id}/events"
    auth = {"Authorization": f"Bearer {next(iter(TOKENS))}"}
    async with httpx.AsyncClient(timeout=10) as http:
        for token, expected in ((jumped.resume, ["a", "b", "c", "d"]), (then.resume, ["b", "c", "d"])):
            async with http.stream("GET", url, headers={**auth, "Last-Event-ID": token}) as response:
                assert response.status_code == 200
                rest = await sse_until_sentinel(response.aiter_lines())
            assert [e["data"]["text"] for e in rest] == expected  # no notification again, nothing missed
            assert "+" not in rest[-1]["id"]  # past the notification: a plain token again


async def test_sse_resumes_across_a_restart_of_the_nats_server(
    nats_server: NatsServer, bb: AsyncBlackbird, sse: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["m0", "m1", "m2", "m3"])
    url = f"{sse}/v1/sessions/{s.session_id}/events"
    auth = {"Authorization": f"Bearer {next(iter(TOKENS))}"}
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("GET", url, headers=auth) as response:
            seen = await sse_events(response.aiter_lines(), 2)
        nats_server.kill()  # SIGKILL between the two connections
        nats_server.start()  # same port and store
        await post(bb, s.session_id, ["m4", SENTINEL])  # retried by the client until NATS is back
        async with http.stream("GET", url, headers={**auth, "Last-Event-ID": seen[-1]["id"]}) as response:
            assert response.status_code == 200
            rest = await sse_until_sentinel(response.aiter_lines())
    assert [e["data"]["text"] for e in seen + rest] == ["m0", "m1", "m2", "m3", "m4"]
    assert len({e["id"] for e in seen + rest}) == 5


async def test_sse_refuses_without_a_token_across_tenants_and_on_bad_input(bb: AsyncBlackbird, sse: str) -> None:
    s = await bb.session_manager.create_session("u1")
    url = f"{sse}/v1/sessions/{s.session_id}/events"
    acme, globex = ({"Authorization": f"Bearer {t}"} for t in TOKENS)
    async with httpx.AsyncClient(timeout=10) as http:
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers={"Authorization": "Bearer not-a-token"})).status_code == 401
        walled = await http.get(url, headers=globex)  # acme's session, globex's token
        assert walled.status_code == 404 and walled.json()["error"]["code"] == "session_not_found"
        bad = await http.get(url, headers={**acme, "Last-Event-ID": "yesterday"})
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "Last-Event-ID"
        bad = await http.get(url + "?channels=a.b", headers=acme)
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "channels"


async def test_an_idle_sse_stream_sends_keep_alive_comments(bb: AsyncBlackbird, sse: str) -> None:
    s = await bb.session_manager.create_session("u1")
    auth = {"Authorization": f"Bearer {next(iter(TOKENS))}"}
    async with httpx.AsyncClient(timeout=10) as http:
        async with http.stream("GET", f"{sse}/v1/sessions/{s.session_id}/events", headers=auth) as response:
            with anyio.fail_after(5):
                async for line in response.aiter_lines():
                    if line.startswith(":"):
                        break
    assert line == ": keep-alive"


def test_http_tokens_are_checked() -> None:
    assert load_tokens('{"a-long-enough-token-1": "acme"}', "tokens") == {"a-long-enough-token-1": "acme"}
    for raw in ("[1, 2]", '{"short": "acme"}', '{"a-long-enough-token-1": "a.b"}', "not json"):
        with pytest.raises(ValidationError) as info:
            load_tokens(raw, "BLACKBIRD_HTTP_TOKENS")
        assert info.value.fields["field"] == "BLACKBIRD_HTTP_TOKENS"


def test_streams_work_through_the_sync_facade() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        s = sdk.session_manager.create_session("u1")
        for text in ("a", "b"):
            sdk.session_manager.send_message(text, session_id=s.session_id)
        with sdk.streams.subscribe(s.session_id) as stream:
            stream.caught_up()
            assert stream.backlog == 2
            first = stream.get(timeout=10)
            assert first is not None and first.text == "a"
            assert next(iter(stream)).text == "b"
            sdk.session_manager.send_message(SENTINEL, session_id=s.session_id)
            after = stream.get(timeout=10)  # nothing came between "b" and the sentinel
            assert after is not None and after.text == SENTINEL


async def test_caught_up_raises_when_reading_the_history_stalls_not_when_the_reader_is_slow() -> None:
    from blackbird.errors import LogError
    from blackbird.streams.backlog import Backlog, parse_resume

    def subscription(max_pending: int) -> Subscription:
        return Subscription(Backlog(parse_resume(None)), max_pending, until=10, stall=0.2)

    stalled = subscription(100)
    stalled._read_commit(3)
    started = time.monotonic()
    with anyio.fail_after(5), pytest.raises(LogError, match="no commit read"):
        await stalled.caught_up()
    assert time.monotonic() - started < 1.0  # one stall period after the last progress, not forever

    progressing = subscription(100)
    async with anyio.create_task_group() as tg:

        async def read_history() -> None:
            for seq in range(1, 11):
                await anyio.sleep(0.1)  # the pace of a slow log: each commit within the stall period
                progressing._read_commit(seq)

        tg.start_soon(read_history)
        with anyio.fail_after(5):
            await progressing.caught_up()

    failed = subscription(100)
    failed._fail(LogError("replay failed"))
    with anyio.fail_after(5), pytest.raises(LogError, match="replay failed"):
        await failed.caught_up()

    full = subscription(1)  # the reader has not taken the one message it may hold: its own stall
    await full._put(StreamEvent(
        id="1-0", sequence=1, index=0, tenant="t", session_id="s", channel="chat", text="x", metadata={}, at=0.0,
    ))
    with anyio.move_on_after(0.6) as waited:
        await full.caught_up()
    assert waited.cancelled_caught  # still waiting, no error
