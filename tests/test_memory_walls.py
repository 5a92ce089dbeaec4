"""Tenant walls on every recall path (real nats-server, real LanceDB, the real local embedder).

Two tenants, ``acme`` and ``globex``, each with a user ``u1`` and a group ``group:research`` that
``u1`` belongs to: the same scope ids on both sides. Each tenant remembers its own texts (so
every recall of the other has rows to search and answers something), and through none of the
paths - ``as_of`` (LanceDB's table, superseded rows included), ``filters=`` (metadata and key
matches), a ``group:`` scope - does one tenant find the other's memories; nor can a session
of one tenant write into the other's group.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

import pytest

from blackbird import AsyncBlackbird, SessionNotFoundError

from .clock import Clock
from .conftest import NatsServer

pytestmark = pytest.mark.anyio

GROUP = "group:research"
SCOPES = ["user", "tenant", GROUP]


class Walls(NamedTuple):
    bb: AsyncBlackbird
    acme: str  # u1's session in acme
    globex: str  # u1's session in globex
    between: float  # after the "old" office memories, before the "new" ones superseded them


def _texts(tenant: str) -> dict[str, str]:
    return {
        "user": f"The {tenant} launch code word is pineapple.",
        "old": f"The {tenant} office was in Lisbon.",
        "new": f"The {tenant} office moved to Porto.",
        "kitchen": f"The {tenant} kitchen fridge is broken.",
        "group": f"The {tenant} research budget is secret.",
    }


@pytest.fixture
async def walls(nats_server: NatsServer) -> AsyncIterator[Walls]:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm, memory = bb.session_manager, bb.memory
        sessions = {}
        for tenant in ("acme", "globex"):
            session = await sm.create_session("u1", tier="pro", tenant=tenant)
            sessions[tenant] = sid = session.session_id
            texts = _texts(tenant)
            await memory.add_members(GROUP, ["u1"], tenant=tenant)
            await memory.remember(texts["user"], session_id=sid, tenant=tenant)
            await memory.remember(
                texts["kitchen"], session_id=sid, scope="tenant", metadata={"room": "kitchen"}, tenant=tenant
            )
            await memory.remember(texts["group"], session_id=sid, scope=GROUP, tenant=tenant)
            await memory.remember(texts["old"], session_id=sid, key="office", tenant=tenant)
        clock.now += 10
        between = clock.now
        clock.now += 10
        for tenant in ("acme", "globex"):
            await memory.remember(_texts(tenant)["new"], session_id=sessions[tenant], key="office", tenant=tenant)
        yield Walls(bb, sessions["acme"], sessions["globex"], between)


def _only_own(found: list[str], tenant: str, other: str) -> None:
    assert found, f"{tenant} found nothing of its own"
    assert all(other not in text for text in found), f"{tenant} sees {other}'s memories: {found}"
    assert all(tenant in text for text in found), found


async def test_as_of_recall_never_crosses_tenants(walls: Walls) -> None:
    memory = walls.bb.memory
    for tenant, sid, other in (("globex", walls.globex, "acme"), ("acme", walls.acme, "globex")):
        found = await memory.recall(
            "office Lisbon Porto launch code", session_id=sid, scopes=SCOPES, k=20, as_of=walls.between,
            tenant=tenant,
        )
        _only_own([m.text for m in found], tenant, other)
        # the superseded row is found (the as_of path, not the present one): the tenant's own only
        assert [m.text for m in found if m.key == "office"] == [_texts(tenant)["old"]]
        assert len(found) == 4  # user, tenant and group memories, and the office as it was then


async def test_filtered_recall_never_crosses_tenants(walls: Walls) -> None:
    memory = walls.bb.memory
    for tenant, sid, other in (("globex", walls.globex, "acme"), ("acme", walls.acme, "globex")):
        by_metadata = await memory.recall(
            "broken fridge", session_id=sid, scopes=SCOPES, k=20, filters={"metadata.room": "kitchen"}, tenant=tenant,
        )
        assert [m.text for m in by_metadata] == [_texts(tenant)["kitchen"]]
        by_key = await memory.recall(
            "office", session_id=sid, scopes=SCOPES, k=20, filters={"key": "office"}, tenant=tenant,
        )
        assert [m.text for m in by_key] == [_texts(tenant)["new"]]
        by_author = await memory.recall(
            "research budget code word", session_id=sid, scopes=SCOPES, k=20, filters={"author": "u1"}, tenant=tenant,
        )
        _only_own([m.text for m in by_author], tenant, other)


async def test_group_scope_recall_never_crosses_tenants(walls: Walls) -> None:
    memory = walls.bb.memory
    for tenant, sid in (("globex", walls.globex), ("acme", walls.acme)):
        found = await memory.recall("research budget", session_id=sid, scopes=[GROUP], k=20, tenant=tenant)
        assert [m.text for m in found] == [_texts(tenant)["group"]]
        assert all(m.scope == "group" and m.owner == "research" for m in found)


async def test_a_session_of_one_tenant_cannot_write_into_the_other_tenants_group(walls: Walls) -> None:
    memory = walls.bb.memory
    # naming the other tenant: its session is unknown there
    with pytest.raises(SessionNotFoundError):
        await memory.remember("Planted by globex.", session_id=walls.globex, scope=GROUP, tenant="acme")
    # its own group of the same name is its own: what it writes there stays in globex
    await memory.remember("Written by globex into its research group.", session_id=walls.globex, scope=GROUP,
                          tenant="globex")
    acme = await memory.recall("planted written by globex", session_id=walls.acme, scopes=[GROUP], k=20,
                               tenant="acme")
    assert [m.text for m in acme] == [_texts("acme")["group"]]
    globex = await memory.recall("written by globex", session_id=walls.globex, scopes=[GROUP], k=20,
                                 tenant="globex")
    assert "Written by globex into its research group." in [m.text for m in globex]
    assert "Planted by globex." not in [m.text for m in globex]
