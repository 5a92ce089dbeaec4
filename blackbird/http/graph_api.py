"""The knowledge graph over HTTP: facts, neighbourhoods and entities of a session's memory.

State facts, note entities, query facts and neighbourhoods (now, ``valid_at``, ``as_of``), end
facts, forget entities.

Like memory, they act in the session's own memory: a user key only for its own sessions, an
admin or service key for any session of its tenant; another tenant's session is 404. List
parameters of the GET endpoints (``predicates``, ``scopes``) are comma-separated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from actors.events import Instant, Metadata, Name
from actors.validation import MAX_MEMORY_TEXT
from blackbird.errors import EntityNotFoundError
from blackbird.http.api import Forgotten, ScopeQuery, caller_session, idempotency_key
from blackbird.http.routes import Call, Endpoint, HttpContext
from blackbird.types import Entity, Neighbor, Relation

if TYPE_CHECKING:
    from blackbird.memory.service import AsyncMemory

Evidence = Annotated[str, msgspec.Meta(max_length=MAX_MEMORY_TEXT)]
Csv = Annotated[str, msgspec.Meta(max_length=4096)]  # comma-separated names
Depth = Annotated[int, msgspec.Meta(ge=1, le=3)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class RelateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    subject: Name
    predicate: Name  # lower snake_case
    object: Name
    scope: Name = "user"
    subject_type: Name = "thing"
    object_type: Name = "thing"
    valid_from: Instant | None = None  # default: now
    valid_to: Instant | None = None  # default: until ended
    evidence: Evidence | None = None
    metadata: Metadata = {}
    source: Name | None = None  # the memory it was extracted from


class EntityBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    entity_type: Name = "thing"
    aliases: tuple[Name, ...] = ()
    scope: Name = "user"


class EndBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    scope: Name = "user"
    valid_to: Instant | None = None  # default: now


class FactsQuery(msgspec.Struct, frozen=True):
    entity: Name
    predicates: Csv | None = None
    as_of: Instant | None = None
    valid_at: Instant | None = None
    history: bool = False
    scopes: Csv = "session,user"


class NeighborsQuery(msgspec.Struct, frozen=True):
    entity: Name
    depth: Depth = 1
    predicates: Csv | None = None
    as_of: Instant | None = None
    valid_at: Instant | None = None
    scopes: Csv = "session,user"
    limit: Limit = 100


class EntityQuery(msgspec.Struct, frozen=True):
    scopes: Csv = "session,user"
    as_of: Instant | None = None


class Facts(msgspec.Struct, frozen=True):
    facts: list[Relation]


class Neighbors(msgspec.Struct, frozen=True):
    neighbors: list[Neighbor]


class Ended(msgspec.Struct, frozen=True):
    ended: bool  # False: unknown in the scope, or ended already


def _names(csv: str | None) -> list[str] | None:
    return None if csv is None else [part.strip() for part in csv.split(",") if part.strip()]


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The endpoints of this module, served with ``ctx``."""
    bb = ctx.bb

    def memory() -> AsyncMemory:
        found: AsyncMemory = bb.memory  # looked up per call: it needs the service identity
        return found

    async def own(call: Call) -> Any:
        return await caller_session(bb.session_manager, call, own=True)

    async def relate(call: Call) -> Relation:
        session = await own(call)
        body: RelateBody = call.body
        return await memory().relate(
            body.subject, body.predicate, body.object, session_id=session.session_id, scope=body.scope,
            subject_type=body.subject_type, object_type=body.object_type, valid_from=body.valid_from,
            valid_to=body.valid_to, evidence=body.evidence, metadata=body.metadata, source=body.source,
            tenant=session.tenant, command_id=idempotency_key(call),
        )

    async def note_entity(call: Call) -> Entity:
        session = await own(call)
        body: EntityBody = call.body
        return await memory().note_entity(
            body.name, session_id=session.session_id, scope=body.scope, entity_type=body.entity_type,
            aliases=list(body.aliases), tenant=session.tenant, command_id=idempotency_key(call),
        )

    async def facts(call: Call) -> Facts:
        session = await own(call)
        query: FactsQuery = call.query
        return Facts(await memory().facts_about(
            query.entity, session_id=session.session_id, predicates=_names(query.predicates),
            as_of=query.as_of, valid_at=query.valid_at, history=query.history,
            scopes=_names(query.scopes) or [], tenant=session.tenant,
        ))

    async def neighbors(call: Call) -> Neighbors:
        session = await own(call)
        query: NeighborsQuery = call.query
        return Neighbors(await memory().neighbors(
            query.entity, session_id=session.session_id, depth=query.depth, predicates=_names(query.predicates),
            as_of=query.as_of, valid_at=query.valid_at, scopes=_names(query.scopes) or [], limit=query.limit,
            tenant=session.tenant,
        ))

    async def entity(call: Call) -> Entity:
        session = await own(call)
        query: EntityQuery = call.query
        found = await memory().entity(
            call.path["name"], session_id=session.session_id, scopes=_names(query.scopes) or [],
            as_of=query.as_of, tenant=session.tenant,
        )
        if found is None:
            raise EntityNotFoundError(f"no entity {call.path['name']!r} in those scopes", entity=call.path["name"])
        return found

    async def end_fact(call: Call) -> Ended:
        session = await own(call)
        body: EndBody = call.body
        return Ended(await memory().end_fact(
            call.path["relation_id"], session_id=session.session_id, scope=body.scope, valid_to=body.valid_to,
            tenant=session.tenant,
        ))

    async def forget_entity(call: Call) -> Forgotten:
        session = await own(call)
        query: ScopeQuery = call.query
        return Forgotten(await memory().forget_entity(
            call.path["name"], session_id=session.session_id, scope=query.scope, tenant=session.tenant,
        ))

    at = "/v1/sessions/{session_id}/graph"
    rows: list[tuple[str, str, Any, str, dict[str, Any]]] = [
        ("POST", f"{at}/facts", relate, "state a fact (subject predicate object); a functional one ends the old",
         {"body": RelateBody, "response": Relation, "status": 201}),
        ("GET", f"{at}/facts", facts, "the facts about an entity: holding now, valid_at, as_of or history",
         {"query": FactsQuery, "response": Facts}),
        ("POST", f"{at}/facts/{{relation_id}}/end", end_fact, "end a fact's validity (it stays in history)",
         {"body": EndBody, "response": Ended}),
        ("GET", f"{at}/neighbors", neighbors, "the entities within 1-3 hops of an entity",
         {"query": NeighborsQuery, "response": Neighbors}),
        ("POST", f"{at}/entities", note_entity, "note an entity and its aliases",
         {"body": EntityBody, "response": Entity, "status": 201}),
        ("GET", f"{at}/entities/{{name}}", entity, "an entity by id, name, alias or near-duplicate (404 if none)",
         {"query": EntityQuery, "response": Entity}),
        ("DELETE", f"{at}/entities/{{name}}", forget_entity, "forget an entity and every fact about it",
         {"query": ScopeQuery, "response": Forgotten}),
    ]
    return [Endpoint(method, path, fn, summary, tag="graph", **options) for method, path, fn, summary, options in rows]
