"""The JSON HTTP API (blackbird.http.api) on a real nats-server, a real uvicorn server and an
httpx client: every endpoint's happy path, the 400s naming the field, 401, 404 for another
tenant's session, 409, 429 with Retry-After, the OpenAPI document, and the rules for user keys."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from blackbird import AsyncBlackbird
from blackbird.errors import AccessDeniedError, SessionNotFoundError
from blackbird.http import api
from blackbird.http.app import http_app
from blackbird.http.auth import Caller
from blackbird.http.routes import Call, Endpoint, HttpContext

from .conftest import new_id, serving_http

pytestmark = pytest.mark.anyio

ACME = "acme-bootstrap-token-0001"
GLOBEX = "globex-bootstrap-token-01"
TOKENS = {ACME: "acme", GLOBEX: "globex"}
AUTH = {"Authorization": f"Bearer {ACME}"}


@pytest.fixture
async def http(bb: AsyncBlackbird) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on ``bb`` served over HTTP, with acme's bootstrap token (an admin)."""
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as client:
        yield client


async def create(http: httpx.AsyncClient, user_id: str = "u1", **fields: Any) -> dict[str, Any]:
    response = await http.post("/v1/sessions", json={"user_id": user_id, **fields})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def error_field(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    return response.json()["error"]["field"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- sessions


async def test_a_session_is_created_read_listed_touched_retiered_and_terminated(http: httpx.AsyncClient) -> None:
    s = await create(http, "u1", tier="pro", metadata={"app": "chat"}, session_id="s-1")
    assert (s["session_id"], s["user_id"], s["tenant"], s["tier"]) == ("s-1", "u1", "acme", "pro")
    assert s["status"] == "active" and s["is_active"] is True and s["metadata"] == {"app": "chat"}
    await create(http, "u2")

    got = (await http.get("/v1/sessions/s-1")).json()
    assert got["session_id"] == "s-1" and got["tier"] == "pro"

    listed = (await http.get("/v1/sessions")).json()["sessions"]
    assert {x["user_id"] for x in listed} == {"u1", "u2"}
    assert [x["session_id"] for x in (await http.get("/v1/sessions?user_id=u1")).json()["sessions"]] == ["s-1"]
    assert len((await http.get("/v1/sessions?limit=1")).json()["sessions"]) == 1

    touched = (await http.post("/v1/sessions/s-1/touch", json={"operation": "chat"})).json()
    assert touched["last_activity"] >= s["last_activity"]
    assert (await http.post("/v1/sessions/s-1/tier", json={"tier": "enterprise"})).json()["tier"] == "enterprise"

    ended = await http.post("/v1/sessions/s-1/terminate", json={"reason": "done"})
    assert ended.status_code == 200 and ended.json()["status"] == "terminated"
    inactive = await http.post("/v1/sessions/s-1/touch", json={})
    assert inactive.status_code == 409 and inactive.json()["error"]["reason"] == "terminated"
    terminated = (await http.get("/v1/sessions?status=terminated")).json()["sessions"]
    assert [x["session_id"] for x in terminated] == ["s-1"]


async def test_creating_a_taken_session_id_is_409(http: httpx.AsyncClient) -> None:
    await create(http, "u1", session_id="taken")
    again = await http.post("/v1/sessions", json={"user_id": "u2", "session_id": "taken"})
    assert again.status_code == 409 and again.json()["error"]["code"] == "session_exists"


async def test_a_retried_create_with_the_same_idempotency_key_creates_one_session(http: httpx.AsyncClient) -> None:
    headers = {"Idempotency-Key": new_id()}
    first = await http.post("/v1/sessions", json={"user_id": "u1"}, headers=headers)
    second = await http.post("/v1/sessions", json={"user_id": "u1"}, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["session_id"] == second.json()["session_id"]


async def test_an_unknown_session_is_404(http: httpx.AsyncClient) -> None:
    for method, path in [("GET", ""), ("POST", "/touch"), ("GET", "/quota"), ("GET", "/audit")]:
        response = await http.request(method, f"/v1/sessions/nope{path}", json={} if method == "POST" else None)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "session_not_found"


# --------------------------------------------------------------------------- usage and limits


async def test_usage_is_tracked_and_quotas_and_rate_windows_are_read(http: httpx.AsyncClient) -> None:
    s = await create(http)
    sid = s["session_id"]
    tracked = await http.post(f"/v1/sessions/{sid}/usage", json={
        "operation": "llm", "resource_type": "tokens", "amount": 150, "metadata": {"model": "m"},
    })
    assert tracked.status_code == 200 and tracked.json() == {"ok": True}
    quota = (await http.get(f"/v1/sessions/{sid}/quota")).json()
    assert quota["tokens"]["used"] == 150 and quota["tokens"]["limit"] == 10_000
    assert quota["tokens"]["remaining"] == 10_000 - 150
    windows = (await http.get(f"/v1/sessions/{sid}/rate-limits")).json()
    assert windows["api_call"]["per_second"]["limit"] == 1

    over = await http.post(f"/v1/sessions/{sid}/usage", json={
        "operation": "llm", "resource_type": "tokens", "amount": 1_000_000,
    })
    assert over.status_code == 429 and over.json()["error"]["code"] == "quota_exceeded"


async def test_a_rate_limit_is_429_with_retry_after(http: httpx.AsyncClient) -> None:
    sid = (await create(http))["session_id"]
    body = {"operation": "api_call", "limit_type": "per_second"}  # free tier: 1 per second
    allowed = await http.post(f"/v1/sessions/{sid}/rate-check", json=body)
    assert allowed.status_code == 200 and allowed.json() == {"allowed": True}
    refused = await http.post(f"/v1/sessions/{sid}/rate-check", json=body)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limited" and error["limit_type"] == "per_second"
    assert 0 < error["retry_after"] <= 1


async def test_a_slot_is_leased_and_given_back(http: httpx.AsyncClient) -> None:
    sid = (await create(http))["session_id"]
    taken = await http.post(f"/v1/sessions/{sid}/slots", json={"operation": "render", "lease_seconds": 30})
    assert taken.status_code == 201, taken.text
    lease = taken.json()
    assert lease["lease_id"] and lease["operation"] == "render" and lease["expires_at"] > time.time()
    assert (await http.get(f"/v1/sessions/{sid}")).json()["concurrent_operations"] == 1
    full = await http.post(f"/v1/sessions/{sid}/slots", json={"operation": "render"})  # free: 1 per operation
    assert full.status_code == 429 and full.json()["error"]["code"] == "rate_limited"
    released = await http.delete(f"/v1/sessions/{sid}/slots/{lease['lease_id']}?operation=render")
    assert released.status_code == 200 and released.json() == {"in_use": 0}
    missing = await http.delete(f"/v1/sessions/{sid}/slots/{lease['lease_id']}")
    assert error_field(missing) == "operation"


async def test_admission_reservation_and_settlement(http: httpx.AsyncClient) -> None:
    sid = (await create(http, tier="pro"))["session_id"]
    admitted = await http.post(f"/v1/sessions/{sid}/admit", json={
        "operation": "llm", "costs": {"tokens": 100}, "slot": False,
    })
    assert admitted.status_code == 200, admitted.text
    assert admitted.json()["charged"] == {"tokens": 100} and admitted.json()["lease_id"] is None

    held = (await http.post(f"/v1/sessions/{sid}/reserve", json={
        "operation": "llm", "costs": {"tokens": 4000}, "hold_seconds": 60,
    })).json()
    assert held["reserved"] == {"tokens": 4000} and held["reservation_id"]
    assert (await http.get(f"/v1/sessions/{sid}/quota")).json()["tokens"]["reserved"] == 4000

    settled = await http.post(f"/v1/sessions/{sid}/settle", json={
        "reservation_id": held["reservation_id"], "actual": {"tokens": 1234},
    })
    assert settled.status_code == 200 and settled.json() == {"charged": {"tokens": 1234}}
    quota = (await http.get(f"/v1/sessions/{sid}/quota")).json()["tokens"]
    assert quota["used"] == 1334 and quota["reserved"] == 0
    again = await http.post(f"/v1/sessions/{sid}/settle", json={"reservation_id": held["reservation_id"]})
    assert again.status_code == 404 and again.json()["error"]["code"] == "reservation_not_found"


# --------------------------------------------------------------------------- memory, messages, audit


async def test_memories_are_remembered_recalled_and_forgotten_and_the_cache_answers(http: httpx.AsyncClient) -> None:
    sid = (await create(http, tier="pro"))["session_id"]
    written = await http.post(f"/v1/sessions/{sid}/memories", json={
        "text": "My manager is Priya Raman.", "importance": 0.8, "metadata": {"source": "chat"},
    })
    assert written.status_code == 201, written.text
    memory = written.json()
    assert memory["scope"] == "user" and memory["owner"] == "u1" and memory["metadata"] == {"source": "chat"}

    recalled = await http.post(f"/v1/sessions/{sid}/memories/recall", json={"query": "Who is my boss?", "k": 3})
    assert recalled.status_code == 200, recalled.text
    hits = recalled.json()["memories"]
    assert hits[0]["memory_id"] == memory["memory_id"] and hits[0]["score"] > 0

    forgotten = await http.delete(f"/v1/sessions/{sid}/memories/{memory['memory_id']}")
    assert forgotten.status_code == 200 and forgotten.json() == {"forgotten": True}
    assert (await http.delete(f"/v1/sessions/{sid}/memories/{memory['memory_id']}")).json() == {"forgotten": False}

    stored = await http.put(f"/v1/sessions/{sid}/cache/draft", json={"value": {"step": 3}, "ttl": 3600})
    assert stored.status_code == 200 and stored.json() == {"ok": True}
    read = await http.get(f"/v1/sessions/{sid}/cache/draft")
    assert read.status_code == 200 and read.json() == {"key": "draft", "value": {"step": 3}}
    absent = await http.get(f"/v1/sessions/{sid}/cache/nothing-here")
    assert absent.status_code == 404 and absent.json()["error"]["code"] == "not_found"


async def test_a_message_is_posted_and_the_audit_shows_it(http: httpx.AsyncClient, bb: AsyncBlackbird) -> None:
    sid = (await create(http))["session_id"]
    posted = await http.post(f"/v1/sessions/{sid}/messages", json={"channel": "chat", "text": "hello"})
    assert posted.status_code == 201, posted.text
    assert posted.json()["channel"] == "chat" and posted.json()["sequence"] > 0
    async with bb.streams.subscribe(sid) as stream:
        message = await stream.get(timeout=10)
    assert message is not None and message.text == "hello"

    report = await http.get(f"/v1/sessions/{sid}/audit")
    assert report.status_code == 200, report.text
    audit = report.json()
    assert audit["scope"] == "session" and audit["id"] == sid and audit["tenant"] == "acme"
    assert [row["who"] for row in audit["rows"]] == ["token:acme", "token:acme"]  # who asked, over HTTP
    first = (await http.get(f"/v1/sessions/{sid}/audit?until_seq={audit['rows'][0]['seq']}")).json()
    assert len(first["rows"]) == 1
    assert error_field(await http.get(f"/v1/sessions/{sid}/audit?until=yesterday")) == "until"
    assert error_field(await http.get(f"/v1/sessions/{sid}/audit?until_seq=0")) == "until_seq"


async def test_the_tenant_stats_hold_sessions_users_and_usage_per_minute(http: httpx.AsyncClient) -> None:
    a = (await create(http, "u1"))["session_id"]
    await create(http, "u2", tier="pro")
    await http.post(f"/v1/sessions/{a}/usage", json={"operation": "llm", "resource_type": "tokens", "amount": 40})
    await http.post(f"/v1/sessions/{a}/usage", json={"operation": "llm", "resource_type": "tokens", "amount": 2})
    response = await http.get("/v1/tenant/stats")
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["tenant"] == "acme" and stats["active_sessions"] == 2 and stats["total_users"] == 2
    assert stats["sessions_by_tier"] == {"free": 1, "pro": 1}
    by_session = {s["session_id"]: s for s in stats["sessions"]}
    assert by_session[a]["quotas"]["tokens"]["used"] == 42 and by_session[a]["user_id"] == "u1"
    users = {u["user_id"]: u for u in stats["users"]}
    assert users["u1"]["resource_usage"] == {"tokens": 42} and users["u1"]["sessions"] == 1
    minutes = stats["usage_per_minute"]
    assert len(minutes) == 60 and minutes == sorted(minutes, key=lambda b: b["minute"])
    assert sum(b["records"] for b in minutes) == 2
    assert sum(b["amounts"].get("tokens", 0) for b in minutes) == 42


# --------------------------------------------------------------------------- refusals


async def test_bad_bodies_are_400_naming_the_field(http: httpx.AsyncClient) -> None:
    sid = (await create(http))["session_id"]
    usage = f"/v1/sessions/{sid}/usage"
    good = {"operation": "llm", "resource_type": "tokens", "amount": 1}
    assert error_field(await http.post(usage, json={**good, "amount": "ten"})) == "amount"
    assert error_field(await http.post(usage, json={**good, "amount": -1})) == "amount"
    assert error_field(await http.post(usage, json={**good, "resource_type": "gold"})) == "resource_type"
    assert error_field(await http.post(usage, json={**good, "operation": "x" * 10_000})) == "operation"
    assert error_field(await http.post(usage, json={**good, "metadata": "m"})) == "metadata"
    deep: Any = "leaf"
    for _ in range(20):
        deep = {"d": deep}
    assert error_field(await http.post(usage, json={**good, "metadata": deep})) == "metadata"
    # JSON has no NaN: refused as a malformed document
    assert error_field(await http.post(usage, content=b'{"operation": "llm", "resource_type": "tokens", '
                                                        b'"amount": NaN}')) == "body"
    assert error_field(await http.post(usage, content=b'{"operation": "llm", "resource_type": "tokens", '
                                                        b'"amount": 1e999}')) == "amount"
    assert error_field(await http.post(usage, content=b'{"operation": "\xff\xfe"}')) == "body"
    assert error_field(await http.post(usage, content=b"[" * 100_000)) == "body"
    assert error_field(await http.post(usage, content=b"x" * (2 * 1024 * 1024))) == "body"
    assert error_field(await http.post(usage, json={**good, "colour": "red"})) == "colour"
    assert error_field(await http.post(usage, json={"operation": "llm", "amount": 1})) == "resource_type"
    admit = f"/v1/sessions/{sid}/admit"
    assert error_field(await http.post(admit, json={"operation": "llm", "costs": {"gold": 1}})) == "costs"
    assert error_field(await http.post("/v1/sessions", json={"user_id": "a.b"})) == "user_id"
    assert error_field(await http.post("/v1/sessions", json={"user_id": "u", "tier": "platinum"})) == "tier"
    assert error_field(await http.post(f"/v1/sessions/{sid}/messages", json={"text": "t" * 70_000})) == "text"
    assert error_field(await http.get("/v1/sessions?limit=0")) == "limit"
    assert error_field(await http.get("/v1/sessions?status=sleeping")) == "status"
    recall = f"/v1/sessions/{sid}/memories/recall"
    assert error_field(await http.post(recall, json={"query": "q", "k": 0})) == "k"
    assert error_field(await http.put(f"/v1/sessions/{sid}/cache/k", json={"value": 1, "ttl": -5})) == "ttl"
    # nothing of it was counted
    assert (await http.get(f"/v1/sessions/{sid}/quota")).json()["tokens"]["used"] == 0


async def test_no_or_a_bad_token_is_401(http: httpx.AsyncClient) -> None:
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-a-token-we-know"},
                    {"Authorization": "Basic " + ACME}):
        response = await http.get("/v1/sessions", headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
        assert response.json()["error"]["code"] == "unauthorized"


async def test_another_tenants_session_is_404_exactly_as_an_unknown_one(http: httpx.AsyncClient) -> None:
    sid = (await create(http))["session_id"]
    globex = {"Authorization": f"Bearer {GLOBEX}"}
    for method, path, body in [
        ("GET", "", None), ("POST", "/touch", {}), ("POST", "/terminate", {}), ("GET", "/quota", None),
        ("POST", "/usage", {"operation": "x", "resource_type": "tokens", "amount": 1}),
        ("POST", "/messages", {"text": "hi"}), ("GET", "/audit", None), ("GET", "/cache/k", None),
    ]:
        walled = await http.request(method, f"/v1/sessions/{sid}{path}", json=body, headers=globex)
        unknown = await http.request(method, f"/v1/sessions/unknown{path}", json=body, headers=globex)
        assert walled.status_code == unknown.status_code == 404, (method, path, walled.text)
        assert walled.json()["error"]["code"] == unknown.json()["error"]["code"] == "session_not_found"
    assert (await http.get("/v1/sessions", headers=globex)).json() == {"sessions": []}
    assert (await http.get(f"/v1/sessions/{sid}")).status_code == 200  # still acme's


# --------------------------------------------------------------------------- OpenAPI


async def test_the_openapi_document_covers_every_route_and_every_ref_resolves(
    http: httpx.AsyncClient, bb: AsyncBlackbird
) -> None:
    response = await http.get("/openapi.json", headers={})
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    routes = [r for r in http_app(bb, TOKENS).routes if isinstance(r, Route) and r.path.startswith("/v1/")]
    assert len(routes) >= len(api.endpoints(HttpContext(bb=bb, bootstrap={}, keys=None, stream_tokens=None)))
    for route in routes:
        for method in route.methods or ():
            if method != "HEAD":
                assert method.lower() in document["paths"][route.path], (method, route.path)
    operation_ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids))

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if "$ref" in node else []
            return own + [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    found = refs(document)
    assert found
    for ref in found:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref
    usage = document["paths"]["/v1/sessions/{session_id}/usage"]["post"]
    ref = usage["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    schema = document["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(schema["required"]) == {"operation", "resource_type", "amount"}
    assert schema["properties"]["amount"]["minimum"] == 0
    assert schema["additionalProperties"] is False
    listing = document["paths"]["/v1/sessions"]["get"]
    assert {p["name"] for p in listing["parameters"]} == {"user_id", "status", "limit"}

    docs = await http.get("/docs", headers={})
    assert docs.status_code == 200 and "openapi.json" in docs.text


# --------------------------------------------------------------------------- user keys


def user_caller(user_id: str) -> Caller:
    return Caller(tenant="acme", role="user", principal=f"key:k-{user_id}", user_id=user_id)


def handlers(bb: AsyncBlackbird) -> dict[tuple[str, str], Endpoint]:
    table = api.endpoints(HttpContext(bb=bb, bootstrap={}, keys=None, stream_tokens=None))
    return {(e.method, e.path): e for e in table}


async def test_a_user_caller_sees_and_creates_only_its_own_sessions(bb: AsyncBlackbird) -> None:
    table = handlers(bb)
    sm = bb.session_manager
    mine = await sm.create_session("alice")
    theirs = await sm.create_session("bob")
    alice = user_caller("alice")

    async def call(method: str, path: str, session_id: str | None = None, body: Any = None, query: Any = None) -> Any:
        e = table[(method, path)]
        if query is None and e.query is not None:
            query = e.query()  # every query field has a default
        return await e.handler(Call(caller=alice, path={"session_id": session_id or ""}, body=body, query=query))

    got = await call("GET", "/v1/sessions/{session_id}", mine.session_id)
    assert got.session_id == mine.session_id
    with pytest.raises(SessionNotFoundError):
        await call("GET", "/v1/sessions/{session_id}", theirs.session_id)
    with pytest.raises(SessionNotFoundError):
        await call("POST", "/v1/sessions/{session_id}/usage", theirs.session_id,
                   body=api.UsageBody("llm", api.QuotaType.TOKENS, 1))
    listed = await call("GET", "/v1/sessions")
    assert [s.session_id for s in listed.sessions] == [mine.session_id]
    assert (await call("GET", "/v1/sessions", query=api.ListSessionsQuery(user_id="bob"))).sessions == []
    with pytest.raises(AccessDeniedError):
        await call("POST", "/v1/sessions", body=api.CreateSessionBody(user_id="bob"))
    created = await call("POST", "/v1/sessions", body=api.CreateSessionBody(user_id="alice"))
    assert created.user_id == "alice"
    # tier changes and the tenant's figures are for admin and service keys (the app checks roles)
    assert "user" not in table[("POST", "/v1/sessions/{session_id}/tier")].roles
    assert "user" not in table[("GET", "/v1/tenant/stats")].roles
    report = await call("GET", "/v1/sessions/{session_id}/audit", mine.session_id)
    assert report["id"] == mine.session_id


async def test_a_participant_of_someone_elses_session_may_not_use_its_memory_or_audit(bb: AsyncBlackbird) -> None:
    table = handlers(bb)
    owned = await bb.session_manager.create_session("bob")
    if not hasattr(bb.session_manager, "join_session"):
        pytest.skip("sessions have no participants yet")
    await bb.session_manager.join_session(owned.session_id, "alice")
    alice = user_caller("alice")
    path = {"session_id": owned.session_id}
    got = await table[("GET", "/v1/sessions/{session_id}")].handler(Call(caller=alice, path=path))
    assert got.session_id == owned.session_id
    audit = table[("GET", "/v1/sessions/{session_id}/audit")]
    with pytest.raises(AccessDeniedError):
        await audit.handler(Call(caller=alice, path=path, query=api.AuditQuery()))
    remember = table[("POST", "/v1/sessions/{session_id}/memories")]
    with pytest.raises(AccessDeniedError):
        await remember.handler(Call(caller=alice, path=path, body=api.RememberBody("x")))


async def test_user_keys_over_http(bb: AsyncBlackbird) -> None:
    if not hasattr(AsyncBlackbird, "api_keys"):
        pytest.skip("no API keys yet")
    issued = await bb.api_keys.create(role="user", user_id="alice")
    theirs = await bb.session_manager.create_session("bob")
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {issued.key}"}, timeout=30
    ) as http:
        mine = await create(http, "alice")
        assert (await http.post("/v1/sessions", json={"user_id": "bob"})).status_code == 403
        assert (await http.get(f"/v1/sessions/{theirs.session_id}")).status_code == 404
        listed = (await http.get("/v1/sessions")).json()["sessions"]
        assert [s["session_id"] for s in listed] == [mine["session_id"]]
        tier = await http.post(f"/v1/sessions/{mine['session_id']}/tier", json={"tier": "pro"})
        assert tier.status_code == 403 and tier.json()["error"]["code"] == "access_denied"
        assert (await http.get("/v1/tenant/stats")).status_code == 403
        posted = await http.post(f"/v1/sessions/{mine['session_id']}/messages", json={"text": "hi"})
        assert posted.status_code == 201, posted.text
