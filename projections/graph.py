"""The knowledge graph's read model: every tenant's entities and facts, bi-temporal, from the log.

A pure fold of the graph events on the memory subjects (``bb.<tenant>.memory.<scope>``): nodes
and facts keep their recorded time (commit time and sequence); a fact keeps its stated validity
and, once ended, when and why it ended and when that was recorded. Queries (also pure) answer
for a set of scopes:

* by default, what holds now as currently known;
* ``valid_at=t``: what held at ``t``, as currently known;
* ``as_of=t``: what was known at ``t`` (facts and ends recorded after ``t`` are not seen), about
  ``t`` unless ``valid_at`` says otherwise.

Names, aliases and evidence stay sealed here (the shell opens them with the authors' keys): the
checkpoint holds nothing in the clear that an erasure would have to find. Forgotten nodes and
facts leave the model.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable

import msgspec

from actors.events import (
    Commit,
    EntityAliased,
    EntityForgotten,
    EntityNoted,
    GraphEvent,
    RelationEnded,
    RelationForgotten,
    RelationStated,
)

INF = math.inf


class AliasRecord(msgspec.Struct, frozen=True, kw_only=True):
    author: str
    sealed: bytes  # SealedName {name: the alias}
    at: float


class EntityRecord(msgspec.Struct, kw_only=True):
    scope_id: str
    entity_type: str
    author: str
    model_id: str
    sealed: bytes  # SealedName {name, aliases, vector}
    aliases: list[AliasRecord] = []  # in recorded order
    seq: int
    at: float


class RelationEnd(msgspec.Struct, frozen=True, kw_only=True):
    valid_to: float
    reason: str
    by: str | None
    seq: int
    at: float


class RelationRecord(msgspec.Struct, kw_only=True):
    scope_id: str
    subject: str
    predicate: str
    object: str
    author: str
    valid_from: float
    valid_to: float | None  # as stated
    source: str | None
    sealed: bytes  # SealedFact {evidence, metadata}
    seq: int
    at: float
    end: RelationEnd | None = None


class TenantGraph(msgspec.Struct, kw_only=True):
    entities: dict[str, EntityRecord] = {}
    relations: dict[str, RelationRecord] = {}
    edges: dict[str, list[str]] = {}  # entity id -> ids of the relations touching it, recorded order
    sources: dict[str, list[str]] = {}  # memory id -> ids of the relations extracted from it
    scope_entities: dict[str, list[str]] = {}  # scope id -> its entity ids, recorded order
    # scope id -> a counter bumped when a node of it gets an alias or is forgotten: name indexes
    # built from this model follow new nodes as they come and are rebuilt when it moves
    versions: dict[str, int] = {}


class Graph(msgspec.Struct):
    tenants: dict[str, TenantGraph] = {}


class GraphProjection:
    name = "graph"
    model_type = Graph
    subjects = "*.memory.*"  # after the prefix: the memory aggregates' commits only

    def initial(self) -> Graph:
        return Graph()

    def apply(self, model: Graph, seq: int, subject: str, commit: Commit) -> list[object]:
        parts = subject.split(".")
        if len(parts) != 4 or parts[2] != "memory":
            return []
        tenant, scope_id = parts[1], parts[3]
        graph: TenantGraph | None = None
        for applied in commit.commands:
            for event in applied.events:
                if not isinstance(event, GraphEvent):
                    continue
                if graph is None:
                    graph = model.tenants.get(tenant) or model.tenants.setdefault(tenant, TenantGraph())
                _fold(graph, scope_id, seq, commit.at, event)
        return []


def _fold(graph: TenantGraph, scope_id: str, seq: int, at: float, event: object) -> None:
    if isinstance(event, EntityNoted):
        graph.entities[event.entity_id] = EntityRecord(
            scope_id=scope_id, entity_type=event.entity_type, author=event.author, model_id=event.model_id,
            sealed=event.sealed, seq=seq, at=at,
        )
        graph.scope_entities.setdefault(scope_id, []).append(event.entity_id)
    elif isinstance(event, EntityAliased):
        entity = graph.entities.get(event.entity_id)
        if entity is not None:
            entity.aliases.append(AliasRecord(author=event.author, sealed=event.sealed, at=at))
            _bump(graph, scope_id)
    elif isinstance(event, RelationStated):
        if event.relation_id in graph.relations:
            return  # ids are unique (random, or derived from a command id): the first one stands
        graph.relations[event.relation_id] = RelationRecord(
            scope_id=scope_id, subject=event.subject, predicate=event.predicate, object=event.object,
            author=event.author, valid_from=event.valid_from, valid_to=event.valid_to, source=event.source,
            sealed=event.sealed, seq=seq, at=at,
        )
        for node in (event.subject, event.object):
            graph.edges.setdefault(node, []).append(event.relation_id)
        if event.source is not None:
            graph.sources.setdefault(event.source, []).append(event.relation_id)
    elif isinstance(event, RelationEnded):
        relation = graph.relations.get(event.relation_id)
        if relation is not None and relation.end is None:
            relation.end = RelationEnd(valid_to=event.valid_to, reason=event.reason, by=event.by, seq=seq, at=at)
    elif isinstance(event, RelationForgotten):
        gone = graph.relations.pop(event.relation_id, None)
        if gone is not None:
            for node in (gone.subject, gone.object):
                _unlink(graph.edges, node, event.relation_id)
            if gone.source is not None:
                _unlink(graph.sources, gone.source, event.relation_id)
    elif isinstance(event, EntityForgotten):
        if graph.entities.pop(event.entity_id, None) is not None:
            _unlink(graph.scope_entities, scope_id, event.entity_id)
            _bump(graph, scope_id)
        for relation_id in graph.edges.pop(event.entity_id, []):  # none left if the aggregate did its part
            gone = graph.relations.pop(relation_id, None)
            if gone is not None:
                _unlink(graph.edges, gone.object if gone.subject == event.entity_id else gone.subject, relation_id)
                if gone.source is not None:
                    _unlink(graph.sources, gone.source, relation_id)


def _unlink(index: dict[str, list[str]], key: str, item: str) -> None:
    ids = index.get(key)
    if ids is None:
        return
    if item in ids:
        ids.remove(item)
    if not ids:
        del index[key]


def _bump(graph: TenantGraph, scope_id: str) -> None:
    graph.versions[scope_id] = graph.versions.get(scope_id, 0) + 1


# --------------------------------------------------------------------------- queries (pure)


class When(msgspec.Struct, frozen=True):
    """A query's two times: knowledge as of ``as_of`` (None: everything recorded), validity at
    ``valid_at`` (None with ``history``: any time)."""

    as_of: float | None
    valid_at: float | None
    history: bool = False

    @classmethod
    def of(cls, now: float, as_of: float | None, valid_at: float | None, history: bool = False) -> When:
        if valid_at is None and not history:
            valid_at = now if as_of is None else as_of
        return cls(as_of, valid_at, history)


def known_end(relation: RelationRecord, as_of: float | None) -> float | None:
    """The end of ``relation``'s validity as known at ``as_of`` (None: open)."""
    end = relation.end
    if end is not None and (as_of is None or end.at <= as_of):
        return end.valid_to if relation.valid_to is None else min(end.valid_to, relation.valid_to)
    return relation.valid_to


def holds(relation: RelationRecord, when: When) -> bool:
    """Whether ``relation`` is seen by a query at ``when``."""
    if when.as_of is not None and relation.at > when.as_of:
        return False  # not recorded yet then
    if when.valid_at is None:
        return True  # history: every fact known
    end = known_end(relation, when.as_of)
    return relation.valid_from <= when.valid_at and (end is None or when.valid_at < end)


def entity_known(entity: EntityRecord, when: When) -> bool:
    return when.as_of is None or entity.at <= when.as_of


def facts_about(
    graph: TenantGraph, entity_ids: Iterable[str], scopes: Collection[str], when: When,
    predicates: Collection[str] | None = None,
) -> list[str]:
    """Ids of the facts with one of ``entity_ids`` as subject or object, in ``scopes``, seen at
    ``when`` (and of ``predicates``), in recorded order."""
    found: dict[str, int] = {}
    for entity_id in entity_ids:
        for relation_id in graph.edges.get(entity_id, ()):
            relation = graph.relations[relation_id]
            if _visible(relation, scopes, when, predicates):
                found[relation_id] = relation.seq
    return sorted(found, key=found.__getitem__)


def neighbors(
    graph: TenantGraph, starts: Iterable[str], depth: int, scopes: Collection[str], when: When,
    predicates: Collection[str] | None = None, limit: int = 100,
) -> list[tuple[str, int, str]]:
    """Breadth first from ``starts``: ``(entity id, hops, relation id that reached it)`` for each
    entity within ``depth`` hops over facts seen at ``when``, nearest first, at most ``limit``."""
    seen = set(starts)
    frontier = list(dict.fromkeys(starts))
    out: list[tuple[str, int, str]] = []
    for hop in range(1, depth + 1):
        following: list[str] = []
        for node in frontier:
            for relation_id in graph.edges.get(node, ()):
                relation = graph.relations[relation_id]
                if not _visible(relation, scopes, when, predicates):
                    continue
                other = relation.object if relation.subject == node else relation.subject
                entity = graph.entities.get(other)
                if other in seen or entity is None or entity.scope_id not in scopes or not entity_known(entity, when):
                    continue
                seen.add(other)
                following.append(other)
                out.append((other, hop, relation_id))
                if len(out) >= limit:
                    return out
        frontier = following
    return out


def _visible(
    relation: RelationRecord, scopes: Collection[str], when: When, predicates: Collection[str] | None
) -> bool:
    return (
        relation.scope_id in scopes
        and (predicates is None or relation.predicate in predicates)
        and holds(relation, when)
    )
