"""The MCP server (blackbird.mcp_server) with the mcp SDK's own clients, on a real nats-server,
real LanceDB and a real uvicorn server: stdio (``python -m blackbird mcp``), streamable HTTP under
``serve --http`` (tools, admission and refusals recorded in the log, tenant walls, bad
arguments, resumption with Last-Event-ID), and the JetStream event store on its own."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.streamable_http import EventMessage
from mcp_types import CallToolResult, JSONRPCRequest, JSONRPCResponse

from actors.policy import QuotaType
from blackbird import AsyncBlackbird
from blackbird.mcp_server import TOOLS, Connection, JetStreamEventStore, bound_connection

from .conftest import NatsServer, serving_http
from .embedders import HashEmbedder

pytestmark = pytest.mark.anyio

ACME = "acme-bootstrap-token-0001"
GLOBEX = "globex-bootstrap-token-01"
TOKENS = {ACME: "acme", GLOBEX: "globex"}
BLACKBIRD = str(Path(sys.executable).parent / "blackbird")  # the installed entry point
PROTOCOL = "2025-11-25"  # the handshake version whose SSE streams carry resumable event ids


@pytest.fixture
async def hbb(nats_server: NatsServer, tmp_path: Path) -> AsyncIterator[AsyncBlackbird]:
    """A client hosting actors, with the offline hash embedder and its own memory folder."""
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), memory_dir=str(tmp_path / "memory")
    ) as client:
        yield client


@contextlib.asynccontextmanager
async def mcp_http(url: str, token: str) -> AsyncIterator[ClientSession]:
    """An initialized SDK client session on ``url`` with ``token`` as bearer credential."""
    client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
    async with client, streamable_http_client(url, http_client=client) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def data(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result.content
    found: dict[str, Any] | None = result.structured_content
    assert found is not None
    return found


def error_text(result: CallToolResult) -> str:
    assert result.is_error, result.structured_content
    return " ".join(getattr(block, "text", "") for block in result.content)


# --------------------------------------------------------------------------- stdio


async def test_stdio_lists_the_tools_and_remembers_then_recalls(
    nats_server: NatsServer, bb: AsyncBlackbird, tmp_path: Path
) -> None:
    session = await bb.session_manager.create_session("alice", "pro")
    env = {
        **os.environ, "BLACKBIRD_MEMORY_DIR": str(tmp_path / "mcp-memory"), "BLACKBIRD_LOG_LEVEL": "warning",
    }
    params = StdioServerParameters(
        command=BLACKBIRD,
        args=["mcp", "--nats-url", nats_server.url, "--tenant", "acme",
              "--session-id", session.session_id],
        env=env,
    )
    with (tmp_path / "stderr.log").open("w+") as errlog:
        async with stdio_client(params, errlog=errlog) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            tools = {t.name: t for t in (await client.list_tools()).tools}
            assert set(tools) == set(TOOLS)
            assert "query" in tools["recall"].input_schema["properties"]
            assert tools["recall"].input_schema["properties"]["query"].get("maxLength")

            stored = data(await client.call_tool("remember", {"text": "My manager is Priya Raman.",
                                                              "importance": 0.8}))
            assert stored["text"] == "My manager is Priya Raman." and stored["memory_id"]
            timings = []
            for _ in range(5):
                started = time.perf_counter()
                found = data(await client.call_tool("recall", {"query": "Who is my manager?", "k": 3}))
                timings.append(time.perf_counter() - started)
            assert [m["text"] for m in found["memories"]][:1] == ["My manager is Priya Raman."]
            info = data(await client.call_tool("session_info", {}))
            assert info["session_id"] == session.session_id and info["user_id"] == "alice"
        errlog.seek(0)
        assert "Traceback" not in errlog.read()
    print("stdio recall round trips (ms):", [round(t * 1000, 1) for t in timings])  # measured, never asserted
    report = await bb.audit.replay(session_id=session.session_id)
    operations = [json.dumps(row) for row in report.to_dict()["rows"]]
    assert any("mcp.remember" in r for r in operations) and any("mcp.recall" in r for r in operations)


async def test_stdio_refuses_an_unknown_session_with_one_line(nats_server: NatsServer, tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        [BLACKBIRD, "mcp", "--nats-url", nats_server.url, "--tenant", "acme",
         "--session-id", "no-such-session"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        env={**os.environ, "BLACKBIRD_MEMORY_DIR": str(tmp_path / "m")},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == "error: --session-id: no session 'no-such-session' in tenant 'acme'"


# --------------------------------------------------------------------------- streamable HTTP


async def test_http_lists_tools_and_calls_them_under_the_callers_principal(hbb: AsyncBlackbird) -> None:
    session = await hbb.session_manager.create_session("alice", "pro")
    sid = session.session_id
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        assert {t.name for t in (await client.list_tools()).tools} == set(TOOLS)
        stored = data(await client.call_tool("remember", {"text": "I live in Porto.", "key": "home"}))
        timings = []
        for _ in range(5):
            started = time.perf_counter()
            found = data(await client.call_tool("recall", {"query": "I live in Porto.", "k": 1}))
            timings.append(time.perf_counter() - started)
        assert [m["memory_id"] for m in found["memories"]] == [stored["memory_id"]]
        quotas = data(await client.call_tool("quota_status", {}))
        assert quotas["quotas"]["api_calls"]["used"] == 7  # remember, five recalls, quota_status
        forgotten = data(await client.call_tool("forget", {"memory_id": stored["memory_id"]}))
        assert forgotten == {"forgotten": True}
        assert data(await client.call_tool("recall", {"query": "I live in Porto.", "k": 1}))["memories"] == []
        both = await client.call_tool("forget", {"memory_id": stored["memory_id"], "entity": "Porto"})
        assert "exactly one of memory_id or entity" in error_text(both)
    print("http recall round trips (ms):", [round(t * 1000, 1) for t in timings])  # measured, never asserted
    report = (await hbb.audit.replay(session_id=sid)).to_dict()
    mcp_rows = [row for row in report["rows"] if "mcp." in json.dumps(row)]
    assert len(mcp_rows) >= 9 and {row["who"] for row in mcp_rows} == {"token:acme"}


async def test_http_graph_tools_relate_walk_and_forget_an_entity(hbb: AsyncBlackbird) -> None:
    sid = (await hbb.session_manager.create_session("alice", "pro")).session_id
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        works = data(await client.call_tool("relate", {
            "subject": "Ada", "predicate": "works_at", "object": "Initech",
            "subject_type": "person", "object_type": "organisation", "evidence": "Ada said so"}))
        data(await client.call_tool("relate", {"subject": "Initech", "predicate": "located_in", "object": "Porto"}))
        assert works["predicate"] == "works_at"
        facts = data(await client.call_tool("facts_about", {"entity": "Ada"}))["facts"]
        assert [f["predicate"] for f in facts] == ["works_at"]
        near = data(await client.call_tool("neighbors", {"entity": "Ada", "depth": 2}))["neighbors"]
        assert [(n["entity"]["name"], n["depth"]) for n in near] == [("Initech", 1), ("Porto", 2)]
        bad = await client.call_tool("relate", {"subject": "Ada", "predicate": "Works At!", "object": "x"})
        assert "predicate" in error_text(bad)
        assert data(await client.call_tool("forget", {"entity": "Ada"})) == {"forgotten": True}
        assert data(await client.call_tool("facts_about", {"entity": "Ada"}))["facts"] == []
        assert data(await client.call_tool("forget", {"entity": "Ada"})) == {"forgotten": False}


async def test_http_a_call_over_quota_is_refused_naming_it_and_the_log_has_both(hbb: AsyncBlackbird) -> None:
    sm = hbb.session_manager
    sid = (await sm.create_session("alice", "pro")).session_id
    await sm.adjust_quota(sid, QuotaType.API_CALLS, 2)
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        data(await client.call_tool("session_info", {}))
        data(await client.call_tool("remember", {"text": "first"}))
        refused = await client.call_tool("remember", {"text": "second"})
        text = error_text(refused)
        assert refused.structured_content is not None
        detail = refused.structured_content["error"]
        assert detail["code"] == "quota_exceeded" and detail["quota_type"] == "api_calls"
        assert detail["limit"] == 2 and "api_calls" in text
    found = await hbb.memory.recall("second", session_id=sid, k=5)
    assert [m.text for m in found] == ["first"]  # the refused call did nothing
    report = (await hbb.audit.replay(session_id=sid)).to_dict()
    kinds = [row.get("event") or row.get("kind") or json.dumps(row) for row in report["rows"]]
    flat = json.dumps(kinds)
    assert "QuotaDenied" in flat and flat.count("UsageTracked") >= 2


async def test_http_a_rate_limited_call_names_retry_after(hbb: AsyncBlackbird) -> None:
    sm = hbb.session_manager
    sid = (await sm.create_session("alice", "free")).session_id  # the free tier: 2 calls per second
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        results = [await client.call_tool("session_info", {}) for _ in range(3)]
    refused = [r for r in results if r.is_error]
    assert refused, "the free tier allows 2 calls a second"
    assert refused[0].structured_content is not None
    detail = refused[0].structured_content["error"]
    assert detail["code"] == "rate_limited" and detail["retry_after"] > 0
    assert "retry_after" in error_text(refused[0])


async def test_http_an_ended_session_refuses_every_tool(hbb: AsyncBlackbird) -> None:
    sm = hbb.session_manager
    sid = (await sm.create_session("alice", "pro")).session_id
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        data(await client.call_tool("session_info", {}))
        await sm.terminate_session(sid, "done")
        refused = await client.call_tool("remember", {"text": "too late"})
        assert refused.structured_content is not None
        assert refused.structured_content["error"]["code"] == "session_inactive"
        assert "is terminated" in error_text(refused)
    report = (await hbb.audit.replay(session_id=sid)).to_dict()
    print(report["rows"][-1])
    assert not [row for row in report["rows"] if "mcp.remember" in json.dumps(row)]  # nothing admitted


async def test_http_walls_other_tenants_strangers_and_bad_credentials(hbb: AsyncBlackbird) -> None:
    sm = hbb.session_manager
    sid = (await sm.create_session("alice", "pro")).session_id
    bob = (await sm.create_session("bob", "pro")).session_id
    alice_key = (await hbb.api_keys.create(role="user", user_id="alice")).key
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    async with serving_http(hbb, TOKENS) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        other = await http.post(f"/v1/sessions/{sid}/mcp", json=body,
                                headers={**headers, "Authorization": f"Bearer {GLOBEX}"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "session_not_found"
        stranger = await http.post(f"/v1/sessions/{bob}/mcp", json=body,
                                   headers={**headers, "Authorization": f"Bearer {alice_key}"})
        assert stranger.status_code == 404
        nobody = await http.post(f"/v1/sessions/{sid}/mcp", json=body, headers=headers)
        assert nobody.status_code == 401
        own = await http.post(f"/v1/sessions/{sid}/mcp", json=body,
                              headers={**headers, "Authorization": f"Bearer {alice_key}"})
        assert own.status_code == 200, own.text
        mcp_id = own.headers["mcp-session-id"]
        # the MCP connection belongs to alice's key and this session: not to bob's path, nor to acme's admin
        for path, token in ((f"/v1/sessions/{bob}/mcp", ACME), (f"/v1/sessions/{sid}/mcp", ACME)):
            stolen = await http.post(path, json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"}, headers={
                **headers, "Authorization": f"Bearer {token}", "mcp-session-id": mcp_id,
                "mcp-protocol-version": PROTOCOL})
            assert stolen.status_code == 404, (path, stolen.text)


async def test_http_bad_arguments_get_an_error_naming_the_argument(hbb: AsyncBlackbird) -> None:
    sid = (await hbb.session_manager.create_session("alice", "pro")).session_id
    async with serving_http(hbb, TOKENS) as url, mcp_http(f"{url}/v1/sessions/{sid}/mcp", ACME) as client:
        wrong_type = await client.call_tool("recall", {"query": "x", "k": "many"})
        assert "k" in error_text(wrong_type)
        huge = await client.call_tool("remember", {"text": "x" * 100_000})
        assert "text" in error_text(huge)
        missing = await client.call_tool("recall", {})
        assert "query" in error_text(missing)
        bad_scope = await client.call_tool("remember", {"text": "x", "scope": "nowhere"})
        assert "scope" in error_text(bad_scope)
        # the SDK's client sends NaN as null; a raw client can send the literal
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            path = f"/v1/sessions/{sid}/mcp"
            headers = await open_raw(http, path)
            call = ('{"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "remember", '
                    '"arguments": {"text": "x", "importance": NaN}}}')
            events = sse(await http.post(path, content=call, headers=headers))
            answer = json.loads(events[-1]["data"])
            assert answer["result"]["isError"] is True
            text = answer["result"]["content"][0]["text"]
            assert "importance" in text and "finite number" in text and "Traceback" not in text
        quotas = data(await client.call_tool("quota_status", {}))
    # nothing refused at decode was admitted: only bad_scope (refused by the memory service) and quota_status
    assert quotas["quotas"]["api_calls"]["used"] == 2


async def open_raw(http: httpx.AsyncClient, path: str, token: str = ACME) -> dict[str, str]:
    """Open an MCP connection by hand (initialize, initialized); the headers to use it with."""
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json",
               "Authorization": f"Bearer {token}"}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": PROTOCOL, "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    opened = await http.post(path, json=init, headers=headers)
    assert opened.status_code == 200, opened.text
    headers |= {"mcp-session-id": opened.headers["mcp-session-id"], "mcp-protocol-version": PROTOCOL}
    note = await http.post(path, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    assert note.status_code == 202
    return headers


async def test_http_a_client_resuming_with_last_event_id_gets_the_events_it_missed(hbb: AsyncBlackbird) -> None:
    sid = (await hbb.session_manager.create_session("alice", "pro")).session_id
    async with serving_http(hbb, TOKENS) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        path = f"/v1/sessions/{sid}/mcp"
        headers = await open_raw(http, path)
        call = {"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "remember", "arguments": {"text": "resumable"}}}
        events = sse(await http.post(path, json=call, headers=headers))
        priming, answer = events[0], events[-1]
        assert priming["data"] == "" and json.loads(answer["data"])["id"] == 2
        assert int(answer["id"]) > int(priming["id"])
        # a client that lost the connection after the priming event resumes from its id
        async with http.stream("GET", path, headers={**headers, "Last-Event-ID": priming["id"]}) as replay:
            assert replay.status_code == 200
            got = await first_event_with_data(replay)
        assert got is not None and got["id"] == answer["id"] and got["data"] == answer["data"]
        assert json.loads(got["data"])["result"]["structuredContent"]["text"] == "resumable"

        # a second connection to the same session reuses request id 2: each resumes only its own
        other = await open_raw(http, path)
        call["params"]["arguments"] = {"text": "the other one"}  # type: ignore[index]
        theirs = sse(await http.post(path, json=call, headers=other))
        async with http.stream("GET", path, headers={**headers, "Last-Event-ID": priming["id"]}) as replay:
            again = await first_event_with_data(replay)
            assert again is not None and again["id"] == answer["id"]
        async with http.stream("GET", path, headers={**other, "Last-Event-ID": theirs[0]["id"]}) as replay:
            mine = await first_event_with_data(replay)
        assert mine is not None and json.loads(mine["data"])["result"]["structuredContent"]["text"] == "the other one"
        # nor another connection's events, though it names one of their ids: the replay is empty
        async with http.stream("GET", path, headers={**other, "Last-Event-ID": priming["id"]}) as replay:
            assert replay.status_code == 200
            assert await first_event_with_data(replay, or_none=True) is None


def sse(response: httpx.Response) -> list[dict[str, str]]:
    assert response.status_code == 200, response.text
    events: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in response.text.splitlines():
        if not line.strip():
            if current:
                events.append(current)
            current = {}
            continue
        name, _, value = line.partition(":")
        if name in ("id", "data", "event"):
            current[name] = current.get(name, "") + value.removeprefix(" ")
    if current:
        events.append(current)
    return [e for e in events if "id" in e]


async def first_event_with_data(response: httpx.Response, *, or_none: bool = False) -> dict[str, str] | None:
    """The first SSE event with data; at the stream's end None if ``or_none``, else a failure."""
    current: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line.strip():
            if current.get("data"):
                return current
            current = {}
            continue
        name, _, value = line.partition(":")
        if name in ("id", "data"):
            current[name] = value.removeprefix(" ")
    assert or_none, "the replay ended without an event"
    return None


# --------------------------------------------------------------------------- the event store


def request(n: int) -> JSONRPCRequest:
    return JSONRPCRequest(jsonrpc="2.0", id=n, method="tools/list")


async def replayed(store: JetStreamEventStore, after: str) -> tuple[str | None, list[EventMessage]]:
    got: list[EventMessage] = []

    async def collect(event: EventMessage) -> None:
        got.append(event)

    stream_id = await store.replay_events_after(after, collect)
    return stream_id, got


async def test_the_event_store_replays_only_that_streams_later_events_in_order(bb: AsyncBlackbird) -> None:
    store = await JetStreamEventStore(bb.journal).open()
    mine = Connection(tenant="acme", session_id="s1", key="c1", principal="key:1")
    with bound_connection(mine):
        priming = await store.store_event("7", None)
        first = await store.store_event("7", request(1))
        other_stream = await store.store_event("8", request(99))
        second = await store.store_event("7", JSONRPCResponse(jsonrpc="2.0", id=7, result={"ok": True}))
    with bound_connection(Connection(tenant="acme", session_id="s1", key="c2", principal="key:1")):
        await store.store_event("7", request(100))  # another connection, same request id
    assert int(priming) < int(first) < int(other_stream) < int(second)
    with bound_connection(mine):
        stream_id, events = await replayed(store, priming)
        assert stream_id == "7"
        assert [e.event_id for e in events] == [first, second]
        assert events[0].message == request(1)
        assert (await replayed(store, first))[1][0].event_id == second
        assert await replayed(store, second) == ("7", [])
        assert await replayed(store, "999999") == (None, [])  # unknown
        assert await replayed(store, "not-an-id") == (None, [])
    for stranger in (Connection(tenant="globex", session_id="s1", key="c1", principal="key:1"),
                     Connection(tenant="acme", session_id="s1", key="c1", principal="key:2"),
                     Connection(tenant="acme", session_id="s2", key="c1", principal="key:1")):
        with bound_connection(stranger):
            assert await replayed(store, priming) == (None, [])


async def test_the_event_store_survives_a_restart(nats_server: NatsServer, tmp_path: Path) -> None:
    mine = Connection(tenant="acme", session_id="s1", key="c1", principal="p")
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "a")) as before:
        store = await JetStreamEventStore(before.journal).open()
        with bound_connection(mine):
            after = await store.store_event("_GET_stream", None)
            kept = await store.store_event("_GET_stream", request(5))
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "b")) as later:
        info = await later.journal.jetstream.stream_info("BB_MCP")
        assert info.config.max_age == 24 * 3600
        again = await JetStreamEventStore(later.journal).open()
        with bound_connection(mine):
            stream_id, events = await replayed(again, after)
    assert stream_id == "_GET_stream" and [e.event_id for e in events] == [kept]
