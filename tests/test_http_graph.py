"""The knowledge-graph endpoints (blackbird.http.graph_api) on a real nats-server, uvicorn and an
httpx client: facts stated and queried now, valid_at, as_of and in history; neighbours; entities
noted, found and forgotten; 400 naming the field for ugly input; walls between tenants and users."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from blackbird import AsyncBlackbird

from .clock import Clock
from .conftest import NatsServer, serving_http
from .embedders import HashEmbedder

pytestmark = pytest.mark.anyio

ACME = "acme-bootstrap-token-0001"
GLOBEX = "globex-bootstrap-token-01"
TOKENS = {ACME: "acme", GLOBEX: "globex"}


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture
async def gbb(nats_server: NatsServer, tmp_path: Path, clock: Clock) -> AsyncIterator[AsyncBlackbird]:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), learn=False,
                              clock=clock, memory_dir=str(tmp_path / "memory")) as client:
        yield client


@pytest.fixture
async def http(gbb: AsyncBlackbird) -> AsyncIterator[httpx.AsyncClient]:
    async with serving_http(gbb, TOKENS) as url, httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {ACME}"}, timeout=30
    ) as client:
        yield client


async def session(http: httpx.AsyncClient, user_id: str = "u1") -> str:
    response = await http.post("/v1/sessions", json={"user_id": user_id, "tier": "pro"})
    assert response.status_code == 201, response.text
    return str(response.json()["session_id"])


async def relate(http: httpx.AsyncClient, sid: str, **body: Any) -> httpx.Response:
    return await http.post(f"/v1/sessions/{sid}/graph/facts", json=body)


async def test_facts_are_stated_contradicted_and_queried_as_of_any_time(http: httpx.AsyncClient, clock: Clock) -> None:
    sid = await session(http)
    t0 = clock.now
    paris = await relate(http, sid, subject="Ada", predicate="lives_in", object="Paris", subject_type="person")
    assert paris.status_code == 201, paris.text
    clock.now += 100
    berlin = (await relate(http, sid, subject="Ada", predicate="lives_in", object="Berlin")).json()
    now = (await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada"})).json()["facts"]
    assert [f["object"] for f in now] == ["Berlin"]
    then = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada", "as_of": t0 + 50})
    assert [f["object"] for f in then.json()["facts"]] == ["Paris"]
    history = await http.get(f"/v1/sessions/{sid}/graph/facts",
                             params={"entity": "Ada", "history": "true", "predicates": "lives_in"})
    ended = next(f for f in history.json()["facts"] if f["object"] == "Paris")
    assert ended["ended_by"] == berlin["relation_id"] and ended["valid_to"] == t0 + 100

    await relate(http, sid, subject="Berlin", predicate="located_in", object="Germany")
    two = await http.get(f"/v1/sessions/{sid}/graph/neighbors", params={"entity": "Ada", "depth": 2})
    assert [(n["entity"]["name"], n["depth"]) for n in two.json()["neighbors"]] == [("Berlin", 1), ("Germany", 2)]

    noted = await http.post(f"/v1/sessions/{sid}/graph/entities",
                            json={"name": "Ada", "entity_type": "person", "aliases": ["Countess"]})
    assert noted.status_code == 201 and noted.json()["aliases"] == ["Countess"]
    found = await http.get(f"/v1/sessions/{sid}/graph/entities/countess")
    assert found.json()["entity_id"] == berlin["subject_id"]
    assert (await http.get(f"/v1/sessions/{sid}/graph/entities/Grace")).status_code == 404

    likes = (await relate(http, sid, subject="Ada", predicate="likes", object="tea")).json()
    end = await http.post(f"/v1/sessions/{sid}/graph/facts/{likes['relation_id']}/end", json={})
    assert end.json() == {"ended": True}
    gone = await http.delete(f"/v1/sessions/{sid}/graph/entities/Germany")
    assert gone.json() == {"forgotten": True}
    one = await http.get(f"/v1/sessions/{sid}/graph/neighbors", params={"entity": "Ada", "depth": 2})
    assert [n["entity"]["name"] for n in one.json()["neighbors"]] == ["Berlin"]


@pytest.mark.parametrize(("body", "field"), [
    ({"subject": "Ada", "predicate": "Lives In", "object": "Paris"}, "predicate"),
    ({"subject": "", "predicate": "likes", "object": "tea"}, "subject"),
    ({"subject": "Ada", "predicate": "likes", "object": 42}, "object"),
    ({"subject": "Ada", "predicate": "likes", "object": "x" * 300}, "object"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "valid_from": -1}, "valid_from"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "valid_from": 1e300}, "valid_from"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "evidence": "e" * 20_000}, "evidence"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "surprise": 1}, "surprise"),
    ({"subject": "Ada", "predicate": "likes", "object": "Ada"}, "object"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "scope": "user:someone"}, "scope"),
    ({"subject": "Ada", "predicate": "likes", "object": "tea", "metadata": {"a": [[[[[[[[[[1]]]]]]]]]]}},
     "metadata"),
])
async def test_ugly_input_is_400_naming_the_field_and_nothing_is_stated(
    http: httpx.AsyncClient, body: dict[str, Any], field: str
) -> None:
    sid = await session(http)
    response = await relate(http, sid, **body)
    assert response.status_code in (400, 403), response.text
    if response.status_code == 400:
        assert response.json()["error"]["field"] == field
    facts = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada", "history": "true"})
    assert facts.json()["facts"] == []


async def test_raw_ugly_bodies_and_queries(http: httpx.AsyncClient) -> None:
    sid = await session(http)
    for raw in (b"{", b'{"subject": NaN, "predicate": "x", "object": "y"}', b"\xff\xfe", b"[" * 100_000):
        response = await http.post(f"/v1/sessions/{sid}/graph/facts", content=raw,
                                   headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 413), (raw[:20], response.text)
    bad = await http.get(f"/v1/sessions/{sid}/graph/neighbors", params={"entity": "Ada", "depth": 7})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "depth"
    bad = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada", "as_of": "nan"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "as_of"
    bad = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada", "scopes": ","})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "scopes"


async def test_other_tenants_and_other_users_cannot_see_or_change_a_graph(
    http: httpx.AsyncClient, gbb: AsyncBlackbird
) -> None:
    sid = await session(http, "alice")
    await relate(http, sid, subject="Ada", predicate="works_at", object="Acme")
    globex = {"Authorization": f"Bearer {GLOBEX}"}
    for method, path, kwargs in [
        ("GET", "/graph/facts", {"params": {"entity": "Ada"}}),
        ("GET", "/graph/neighbors", {"params": {"entity": "Ada"}}),
        ("GET", "/graph/entities/Ada", {}),
        ("DELETE", "/graph/entities/Ada", {}),
        ("POST", "/graph/facts", {"json": {"subject": "Ada", "predicate": "works_at", "object": "Globex"}}),
    ]:
        response = await http.request(method, f"/v1/sessions/{sid}{path}", headers=globex, **kwargs)
        assert response.status_code == 404, (method, path, response.text)
    bob = await gbb.api_keys.create(role="user", user_id="bob")
    as_bob = {"Authorization": f"Bearer {bob.key}"}
    response = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada"}, headers=as_bob)
    assert response.status_code == 404
    alice = await gbb.api_keys.create(role="user", user_id="alice")
    as_alice = {"Authorization": f"Bearer {alice.key}"}
    mine = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada"}, headers=as_alice)
    assert [f["object"] for f in mine.json()["facts"]] == ["Acme"]
    facts = await http.get(f"/v1/sessions/{sid}/graph/facts", params={"entity": "Ada"})
    assert [f["object"] for f in facts.json()["facts"]] == ["Acme"]  # globex changed nothing


async def test_the_openapi_document_lists_the_graph_endpoints(http: httpx.AsyncClient) -> None:
    paths = (await http.get("/openapi.json")).json()["paths"]
    assert {"/v1/sessions/{session_id}/graph/facts", "/v1/sessions/{session_id}/graph/neighbors",
            "/v1/sessions/{session_id}/graph/entities/{name}"} <= set(paths)
