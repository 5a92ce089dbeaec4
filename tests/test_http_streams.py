"""Streams over HTTP for browsers and operators, on a real nats-server and a real uvicorn server:
stream tokens (issued, resumed with, refused when tampered, expired or for another session, and
accepted after a restart), CORS, gaps in the history made by deleting commits, presence, many
readers and a reader that never reads, the admin monitor (two sessions, an alert, resume, filters,
roles) and broadcast."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx
import pytest

from blackbird import AsyncBlackbird, QuotaExceededError

from .clock import Clock
from .conftest import NatsServer, serving_http
from .test_streams import SENTINEL, TOKENS, post, sse_events, sse_until_sentinel, take

pytestmark = pytest.mark.anyio

ADMIN = {"Authorization": f"Bearer {next(iter(TOKENS))}"}  # a bootstrap token: admin of acme


@pytest.fixture
async def url(bb: AsyncBlackbird) -> AsyncIterator[str]:
    async with serving_http(bb, TOKENS, cors_origins=["https://app.example.com"]) as base:
        yield base


async def key(bb: AsyncBlackbird, role: str, user_id: str | None = None) -> dict[str, str]:
    issued = await bb.api_keys.create(role=role, user_id=user_id)
    return {"Authorization": f"Bearer {issued.key}"}


async def token_for(http: httpx.AsyncClient, url: str, sid: str, auth: dict[str, str], **body: Any) -> dict[str, Any]:
    answer = await http.post(f"{url}/v1/sessions/{sid}/stream-token", headers=auth, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- stream tokens


async def test_a_stream_token_reads_its_session_like_an_event_source_and_resumes(bb: AsyncBlackbird, url: str) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["one", "two", "three"])
    async with httpx.AsyncClient(timeout=10) as http:
        issued = await token_for(http, url, s.session_id, await key(bb, "user", "u1"))
        assert issued["url"] == f"/v1/sessions/{s.session_id}/events?token={issued['token']}"
        assert issued["expires_at"] > Clock().now
        async with http.stream("GET", url + issued["url"]) as response:  # no header, as EventSource
            assert response.status_code == 200
            first = await sse_events(response.aiter_lines(), 2)
        assert [e["data"]["text"] for e in first] == ["one", "two"]
        await post(bb, s.session_id, [SENTINEL])
        async with http.stream("GET", url + issued["url"], headers={"Last-Event-ID": first[-1]["id"]}) as response:
            rest = await sse_until_sentinel(response.aiter_lines())
        assert [e["data"]["text"] for e in rest] == ["three"]
        # ?events=message: every event unnamed for EventSource's onmessage, the channel in the data
        async with http.stream("GET", url + issued["url"] + "&events=message") as response:
            unnamed = await sse_events(response.aiter_lines(), 2)
        assert [(e["event"], e["data"]["channel"], e["data"]["text"]) for e in unnamed] == [
            ("message", "chat", "one"), ("message", "chat", "two")
        ]
        # a stream token is for reading that one stream: no other endpoint takes it
        monitor = await http.get(f"{url}/v1/events?token={issued['token']}")
        assert monitor.status_code == 403
        again = await http.post(f"{url}/v1/sessions/{s.session_id}/stream-token?token={issued['token']}")
        assert again.status_code == 401


async def test_stream_tokens_tampered_expired_or_for_another_session_are_refused(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        a = await bb.session_manager.create_session("u1")
        b = await bb.session_manager.create_session("u1")
        async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(timeout=10) as http:
            issued = await token_for(http, url, a.session_id, ADMIN, ttl=60)
            token = issued["token"]
            body, _, signature = token.partition(".")
            flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
            for bad in (f"{body}.{flipped}", body, "x" + token, ""):
                answer = await http.get(f"{url}/v1/sessions/{a.session_id}/events?token={bad}")
                assert answer.status_code == 401, bad
            foreign = await http.get(f"{url}/v1/sessions/{b.session_id}/events?token={token}")
            assert foreign.status_code == 401
            assert foreign.json()["error"]["message"] == "the stream token is for another session"
            # a user who may not read the session gets no token for it
            assert (await http.post(
                f"{url}/v1/sessions/{a.session_id}/stream-token", headers=await key(bb, "user", "u2")
            )).status_code == 404
            assert (await http.post(
                f"{url}/v1/sessions/{a.session_id}/stream-token", headers=ADMIN, json={"ttl": 0}
            )).json()["error"]["field"] == "ttl"
            clock.now += 61
            expired = await http.get(f"{url}/v1/sessions/{a.session_id}/events?token={token}")
            assert expired.status_code == 401


async def test_a_stream_token_outlives_a_restart_of_the_server(nats_server: NatsServer, bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    await post(bb, s.session_id, ["kept", SENTINEL])
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(timeout=10) as http:
        issued = await token_for(http, url, s.session_id, ADMIN)
    # another process of the deployment: a new client and app, the same master key
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as other:
        async with serving_http(other, TOKENS) as url, httpx.AsyncClient(timeout=10) as http:
            async with http.stream("GET", url + issued["url"]) as response:
                assert response.status_code == 200
                assert [e["data"]["text"] for e in await sse_until_sentinel(response.aiter_lines())] == ["kept"]


# --------------------------------------------------------------------------- CORS


async def test_cors_preflight_and_simple_requests_name_the_allowed_origin(bb: AsyncBlackbird, url: str) -> None:
    s = await bb.session_manager.create_session("u1")
    origin = {"Origin": "https://app.example.com"}
    async with httpx.AsyncClient(timeout=10) as http:
        preflight = await http.options(
            f"{url}/v1/sessions/{s.session_id}/stream-token",
            headers={**origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "Authorization, Content-Type"},
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        refused = await http.options(
            f"{url}/v1/events", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        )
        assert refused.status_code == 400
        issued = await token_for(http, url, s.session_id, {**ADMIN, **origin})
        async with http.stream("GET", url + issued["url"], headers=origin) as response:
            assert response.headers["access-control-allow-origin"] == "https://app.example.com"


def test_serve_takes_cors_origins() -> None:
    from blackbird._cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--http-cors-origin", "https://a.example", "--http-cors-origin", "https://b.example"]
    )
    assert args.http_cors_origin == ["https://a.example", "https://b.example"]


# --------------------------------------------------------------------------- gaps


async def test_a_resume_point_older_than_the_log_gives_a_gap_then_what_is_still_held(
    bb: AsyncBlackbird, url: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    sent = [await bb.session_manager.send_message(t, session_id=s.session_id) for t in ("m0", "m1", "m2", "m3", "m4")]
    async with bb.streams.subscribe(s.session_id) as stream:
        had = (await take(stream, 2))[-1]  # the reader had m0 and m1
    js = bb.journal.jetstream
    for seq in range(1, sent[3]["sequence"] + 1):  # retention took the head of the log, m1..m3 with it
        await js.delete_msg(bb.journal.stream, seq)
    await post(bb, s.session_id, [SENTINEL])
    async with bb.streams.subscribe(s.session_id, after=had.resume) as stream:
        gap, rest = await take(stream, 1), await take(stream, 2)
    assert gap[0].channel == "gap"
    assert gap[0].metadata == {"requested": had.sequence, "first": sent[4]["sequence"]}
    assert [m.text for m in rest] == ["m4", SENTINEL]
    # resuming after the gap does not report it again
    async with bb.streams.subscribe(s.session_id, after=gap[0].resume) as stream:
        assert [m.text for m in await take(stream, 2)] == ["m4", SENTINEL]
    async with httpx.AsyncClient(timeout=10) as http:
        events = f"{url}/v1/sessions/{s.session_id}/events"
        async with http.stream("GET", events, headers={**ADMIN, "Last-Event-ID": had.resume}) as response:
            seen = await sse_events(response.aiter_lines(), 2)
    assert seen[0]["event"] == "gap" and seen[0]["data"]["metadata"]["first"] == sent[4]["sequence"]
    assert seen[1]["data"]["text"] == "m4"


async def test_commits_deleted_inside_the_history_are_a_gap_too(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    sent = [await bb.session_manager.send_message(t, session_id=s.session_id) for t in ("m0", "m1", "m2", "m3")]
    js = bb.journal.jetstream
    await js.delete_msg(bb.journal.stream, sent[1]["sequence"])
    await js.delete_msg(bb.journal.stream, sent[2]["sequence"])
    async with bb.streams.subscribe(s.session_id, after=f"{sent[0]['sequence']}-0") as stream:
        got = await take(stream, 2)
    assert got[0].channel == "gap"
    assert got[0].metadata == {"requested": sent[0]["sequence"], "first": sent[3]["sequence"]}
    assert got[1].text == "m3"


# --------------------------------------------------------------------------- presence


async def test_a_user_keys_stream_posts_presence_when_it_joins_and_leaves(bb: AsyncBlackbird, url: str) -> None:
    s = await bb.session_manager.create_session("u1")
    alice = await key(bb, "user", "u1")
    async with bb.streams.subscribe(s.session_id, channels=["presence"]) as presence:
        async with httpx.AsyncClient(timeout=10) as http:
            events = f"{url}/v1/sessions/{s.session_id}/events"
            async with http.stream("GET", events, headers=alice) as first:
                joined = await presence.get(timeout=10)
                async with http.stream("GET", events, headers=alice) as second:
                    assert first.status_code == second.status_code == 200
                    again = await presence.get(timeout=10)
            left = [await presence.get(timeout=10), await presence.get(timeout=10)]
    assert joined is not None and again is not None and None not in left
    assert joined.metadata == {"user_id": "u1", "state": "joined", "connections": 1}
    assert again.metadata["connections"] == 2
    assert sorted((m.metadata["state"], m.metadata["connections"]) for m in left if m) == [("left", 0), ("left", 1)]


# --------------------------------------------------------------------------- many readers


async def read_texts(http: httpx.AsyncClient, url: str) -> list[str]:
    async with http.stream("GET", url, headers=ADMIN) as response:
        return [e["data"]["text"] for e in await sse_until_sentinel(response.aiter_lines())]


async def test_two_hundred_readers_of_one_session_each_get_every_message_once_in_order(
    bb: AsyncBlackbird, url: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    texts = [f"m{i}" for i in range(20)]
    events = f"{url}/v1/sessions/{s.session_id}/events"
    results: list[list[str]] = []
    limits = httpx.Limits(max_connections=250)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:

        async def reader() -> None:
            results.append(await read_texts(http, events))

        async with anyio.create_task_group() as tg:
            for _ in range(200):
                tg.start_soon(reader)
            await post(bb, s.session_id, [*texts, SENTINEL])  # some read them live, some as history
    assert len(results) == 200
    assert all(r == texts for r in results)


async def test_a_reader_that_never_reads_stalls_no_one_and_holds_a_bounded_backlog(
    bb: AsyncBlackbird, url: str
) -> None:
    s = await bb.session_manager.create_session("u1")
    texts = [f"m{i}-" + "x" * 4000 for i in range(900)]  # 3.6 MB: more than the sockets buffer
    events = f"{url}/v1/sessions/{s.session_id}/events"
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream("GET", events, headers=ADMIN) as stalled:  # headers only, never read
            assert stalled.status_code == 200
            async with bb.streams.subscribe(s.session_id, max_pending=100) as idle:
                await post(bb, s.session_id, [*texts, SENTINEL])
                assert await read_texts(http, events) == texts  # the others are served meanwhile
                with anyio.fail_after(10):
                    while idle.backlog < 100:  # the idle subscriber's backlog fills to its bound...
                        await anyio.sleep(0.01)
                assert idle.backlog == 100  # ...and no further: the log waits on the server


# --------------------------------------------------------------------------- admin monitor


async def test_the_admin_monitor_sees_every_session_and_alerts_resumes_and_filters(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", abuse={"session_burst": 2}) as bb:
        a = await bb.session_manager.create_session("u1")
        b = await bb.session_manager.create_session("u2")
        c = await bb.session_manager.create_session("u2")  # u2's second session: a session burst
        await post(bb, a.session_id, ["from a"])
        await post(bb, b.session_id, ["from b"], channel="progress")
        async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(timeout=20) as http:
            monitor = f"{url}/v1/events?since=start"  # the whole log (by default: live from now)
            async with http.stream("GET", monitor, headers=ADMIN) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                seen = await sse_events(lines, 2)
                await post(bb, c.session_id, ["from c"])
                while not any(e["event"] == "alert" for e in seen):
                    seen += await sse_events(lines, 1)
                while "from c" not in [e["data"]["text"] for e in seen]:
                    seen += await sse_events(lines, 1)
            texts = [(e["event"], e["data"]["session_id"], e["data"]["text"]) for e in seen if e["event"] != "alert"]
            assert texts[:2] == [("chat", a.session_id, "from a"), ("progress", b.session_id, "from b")]
            alert = next(e for e in seen if e["event"] == "alert")
            assert alert["data"]["user_id"] == "u2" and alert["data"]["metadata"]["kind"] == "session_burst"
            ids = [e["id"] for e in seen]
            assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
            # resume after the first event: the rest, not the first again
            await post(bb, a.session_id, [SENTINEL])
            async with http.stream("GET", monitor, headers={**ADMIN, "Last-Event-ID": seen[0]["id"]}) as response:
                rest = await sse_until_sentinel(response.aiter_lines())
            assert [e["id"] for e in rest][: len(seen) - 1] == ids[1:]
            async with http.stream("GET", monitor + "&channels=progress,chat", headers=ADMIN) as response:
                only = await sse_until_sentinel(response.aiter_lines())
            assert [e["data"]["text"] for e in only] == ["from a", "from b", "from c"]
            async with http.stream("GET", monitor + "&user_id=u1", headers=ADMIN) as response:
                mine = await sse_until_sentinel(response.aiter_lines())
            assert [e["data"]["text"] for e in mine] == ["from a"]
            async with http.stream("GET", monitor + "&user_id=u2&channels=alert,chat", headers=ADMIN) as response:
                theirs = await sse_events(response.aiter_lines(), 2)
            assert sorted(e["event"] for e in theirs) == ["alert", "chat"]
            for role, user in (("service", None), ("user", "u1")):
                refused = await http.get(monitor, headers=await key(bb, role, user))
                assert refused.status_code == 403
                refused = await http.post(f"{url}/v1/broadcast", headers=await key(bb, role, user), json={"text": "x"})
                assert refused.status_code == 403


async def test_the_admin_monitor_is_live_from_now_and_shows_denials(bb: AsyncBlackbird, url: str) -> None:
    session = await bb.session_manager.create_session("u1")
    await post(bb, session.session_id, ["before the monitor"])
    async with httpx.AsyncClient(timeout=20) as http, http.stream("GET", f"{url}/v1/events", headers=ADMIN) as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        await post(bb, session.session_id, ["after"])
        first = await sse_events(lines, 1)
        assert [e["data"]["text"] for e in first] == ["after"]  # nothing of before
        quota = await bb.session_manager.get_quota(session.session_id)
        limit = quota["tokens"]["limit"]
        with pytest.raises(QuotaExceededError):
            await bb.session_manager.track_usage(session.session_id, "chat", "tokens", limit + 1)
        denial = (await sse_events(lines, 1))[0]
    assert denial["event"] == "denial" and denial["data"]["session_id"] == session.session_id
    assert denial["data"]["metadata"]["type"] == "QuotaDenied" and "tokens quota" in denial["data"]["text"]


# --------------------------------------------------------------------------- broadcast


async def test_a_broadcast_reaches_every_active_session_of_the_tenant(bb: AsyncBlackbird, url: str) -> None:
    sessions = [await bb.session_manager.create_session(f"u{i}") for i in range(3)]
    ended = await bb.session_manager.create_session("u9")
    await bb.session_manager.terminate_session(ended.session_id)
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.post(
            f"{url}/v1/broadcast", headers=ADMIN, json={"text": "maintenance at noon", "metadata": {"at": "12:00"}}
        )
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"sessions": 3, "skipped": 0}
    for s in sessions:
        async with bb.streams.subscribe(s.session_id) as stream:
            note = (await take(stream, 1))[0]
        assert (note.channel, note.text, note.metadata) == (
            "notification", "maintenance at noon", {"at": "12:00", "broadcast": True}
        )
    async with bb.streams.subscribe(ended.session_id, channels=["notification"]) as stream:
        await stream.caught_up()  # its whole history read: no notification in it
        assert stream.backlog == 0
