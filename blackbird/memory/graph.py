"""The knowledge graph on ``bb.memory``: entities and bi-temporal facts, event-sourced.

Writes go to the memory scope's actor like memories (same scopes, access checks, tenant walls,
redaction, sealing, storage quota and erasure): names, aliases and evidence are sealed with the
author's key; ids, entity types and predicates are in the clear. Reads come from the graph
projection (:mod:`projections.graph`), caught up with this client's own writes first; names are
opened with the authors' keys on first use and kept (bounded, dropped when their node changes).

Entity resolution: a mention is the node with that exact name or alias in the scope; else one
spelled almost the same whose name's embedding agrees; else one whose embedding is nearly the
same; else the one node whose name contains all of its words (:func:`actors.graph.resolve`).
The scope's aggregate also merges exact names of one author, which holds under concurrency.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
import msgspec
import numpy as np
import structlog

from actors.events import (
    EndRelation,
    EntitySpec,
    ForgetEntity,
    NoteEntity,
    Relate,
    RelationStated,
)
from actors.graph import Candidate, normalise, resolve
from actors.policy import QuotaType
from actors.redaction import RedactionPolicy, redact
from actors.validation import MAX_MEMORY_TEXT, PREDICATE_EXPECTED, PREDICATE_PATTERN
from blackbird._projections import Projections
from blackbird._validate import check_epoch, check_metadata, check_text, invalid
from blackbird.errors import ValidationError
from blackbird.ids import derived_id, new_id
from blackbird.types import Entity, Neighbor, Relation
from projections import graph as model
from projections.graph import Graph, TenantGraph, When

log = structlog.get_logger("blackbird.memory")

DEFAULT_SCOPES = ("session", "user")
MAX_DEPTH = 3
MAX_NEIGHBORS = 1000
_PREDICATE = re.compile(PREDICATE_PATTERN)
_NAMES_KEPT = 200_000  # opened entity names kept in memory
_NGRAM = 6  # longest name (in words) recognised in a recall query


class SealedName(msgspec.Struct, frozen=True):
    """What an entity event carries encrypted: a name (canonical, or one alias) and its vector."""

    name: str
    aliases: list[str] = []
    vector: bytes = b""  # float32, little-endian; empty when not embedded


class SealedFact(msgspec.Struct, frozen=True):
    """What a relation event carries encrypted."""

    evidence: str | None = None
    metadata: dict[str, Any] = {}


class _Names(NamedTuple):
    name: str
    aliases: tuple[str, ...]
    vector: np.ndarray | None
    alias_times: tuple[float, ...]  # when the log recorded each alias


class _ScopeIndex:
    """A scope's names, kept in step with the model: new nodes are added as they come (the
    model lists a scope's nodes in recorded order), and the whole index is rebuilt when a node
    got an alias or was forgotten (the scope's version moved)."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.count = 0  # how many of the scope's nodes (in recorded order) are indexed
        self.by_name: dict[str, list[str]] = {}  # normalised name or alias -> entity ids, oldest first
        self.by_word: dict[str, set[str]] = {}  # word -> normalised names holding it
        self.names: list[str] = []  # normalised names, for spelling similarity
        self.ids: list[str] = []  # rows of ``matrix``
        self._vectors: np.ndarray | None = None  # grown by doubling
        self.longest = 0  # words in the longest name

    @property
    def matrix(self) -> np.ndarray | None:
        return None if self._vectors is None else self._vectors[: len(self.ids)]

    def add(self, entity_id: str, names: _Names) -> None:
        for name in (names.name, *names.aliases):
            normal = normalise(name)
            if not normal:
                continue
            ids = self.by_name.get(normal)
            if ids is None:
                ids = self.by_name[normal] = []
                self.names.append(normal)
                for word in normal.split():
                    self.by_word.setdefault(word, set()).add(normal)
                self.longest = max(self.longest, len(normal.split()))
            ids.append(entity_id)
        vector = names.vector
        if vector is None or (self._vectors is not None and self._vectors.shape[1] != len(vector)):
            return
        if self._vectors is None:
            self._vectors = np.empty((16, len(vector)), dtype=np.float32)
        elif len(self.ids) == len(self._vectors):
            grown = np.empty((2 * len(self._vectors), self._vectors.shape[1]), dtype=np.float32)
            grown[: len(self.ids)] = self._vectors
            self._vectors = grown
        self._vectors[len(self.ids)] = vector
        self.ids.append(entity_id)

    def containing(self, words: set[str]) -> set[str]:
        """The names holding every word of ``words`` and more."""
        sets = [self.by_word.get(w, set()) for w in words]
        if not sets:
            return set()
        found = set.intersection(*sets)
        return {n for n in found if len(n.split()) > len(words)}


class FunctionalPredicates:
    """Which predicates have one value at a time (exact names, or ``prefix*``)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        for pattern in patterns:
            if not isinstance(pattern, str) or not _PREDICATE.match(pattern.removesuffix("*")):
                raise invalid("functional_predicates", PREDICATE_EXPECTED + " (a final '*' allowed)", repr(pattern))
        self._exact = {p for p in patterns if not p.endswith("*")}
        self._prefixes = tuple(p for p in patterns if p.endswith("*"))

    def __contains__(self, predicate: object) -> bool:
        return predicate in self._exact or any(fnmatch.fnmatchcase(str(predicate), p) for p in self._prefixes)


class GraphReader:
    """Opens the projection's sealed names and facts (cached) and indexes names per scope."""

    def __init__(self, keys: Any) -> None:
        self._keys = keys
        self._names: collections.OrderedDict[tuple[str, str], tuple[int, _Names]] = collections.OrderedDict()
        self._facts: collections.OrderedDict[tuple[str, str], SealedFact] = collections.OrderedDict()
        self._indexes: dict[tuple[str, str], _ScopeIndex] = {}

    def forget_tenant(self, tenant: str) -> None:
        """Drop every opened name of ``tenant`` (an erasure ran)."""
        for key in [k for k in self._names if k[0] == tenant]:
            del self._names[key]
        for key in [k for k in self._facts if k[0] == tenant]:
            del self._facts[key]
        for key in [k for k in self._indexes if k[0] == tenant]:
            del self._indexes[key]

    async def names(self, tenant: str, entity_id: str, record: model.EntityRecord) -> _Names | None:
        """The entity's names (None if its author's key is gone)."""
        key = (tenant, entity_id)
        held = self._names.get(key)
        if held is not None and held[0] == len(record.aliases):
            self._names.move_to_end(key)
            return held[1]
        aad = record.scope_id.encode()
        first = await self._open(tenant, record.author, record.sealed, aad)
        if first is None:
            return None
        aliases: dict[str, float] = {}
        for alias_record in record.aliases:
            alias = await self._open(tenant, alias_record.author, alias_record.sealed, aad)
            if alias is not None and alias.name != first.name:
                aliases.setdefault(alias.name, alias_record.at)
        vector = np.frombuffer(first.vector, dtype=np.float32) if first.vector else None
        opened = _Names(first.name, tuple(aliases), vector, tuple(aliases.values()))
        self._names[key] = (len(record.aliases), opened)
        while len(self._names) > _NAMES_KEPT:
            self._names.popitem(last=False)
        return opened

    async def _open(self, tenant: str, author: str, sealed: bytes, aad: bytes) -> SealedName | None:
        try:
            plain = await self._keys.decrypt(tenant, author, sealed, aad=aad)
        except ValidationError:
            return None
        return None if plain is None else msgspec.msgpack.decode(plain, type=SealedName)

    async def fact(self, tenant: str, relation_id: str, record: model.RelationRecord) -> SealedFact:
        """A fact's evidence and metadata (empty if its author's key is gone)."""
        key = (tenant, relation_id)
        held = self._facts.get(key)
        if held is not None:
            return held
        try:
            plain = await self._keys.decrypt(tenant, record.author, record.sealed, aad=record.scope_id.encode())
        except ValidationError:
            plain = None
        if plain is None:
            return SealedFact()  # not kept: a key being read again later may open it
        opened = self._facts[key] = msgspec.msgpack.decode(plain, type=SealedFact)
        while len(self._facts) > _NAMES_KEPT:
            self._facts.popitem(last=False)
        return opened

    async def index(self, tenant: str, graph: TenantGraph, scope_id: str) -> _ScopeIndex:
        """The scope's name index, brought up to date with the model."""
        version = graph.versions.get(scope_id, 0)
        index = self._indexes.get((tenant, scope_id))
        if index is None or index.version != version:
            index = self._indexes[(tenant, scope_id)] = _ScopeIndex(version)
        listed = graph.scope_entities.get(scope_id, [])
        for entity_id in listed[index.count :]:
            record = graph.entities.get(entity_id)
            names = None if record is None else await self.names(tenant, entity_id, record)
            if names is not None:
                index.add(entity_id, names)
        index.count = len(listed)
        return index


class GraphMemory:
    """The graph methods of :class:`blackbird.memory.service.AsyncMemory` (mixed in)."""

    # provided by AsyncMemory
    _keys: Any
    _quotas: Any
    _clock: Callable[[], float]
    _written: int
    _timeout: float
    _projections: Projections | None
    _functional: FunctionalPredicates
    _graph_reader: GraphReader
    embedder: Any

    if TYPE_CHECKING:  # AsyncMemory's

        async def _caller(self, session_id: Any, tenant: str | None) -> tuple[Any, Any]: ...
        async def _scope(self, spec: Any, session: Any, *, write: bool) -> str: ...
        async def _ask(self, tenant: str, sid: str, command: Any, command_id: str | None = None) -> Any: ...

    # ------------------------------------------------------------------ writing

    async def relate(
        self,
        subject: str,
        predicate: str,
        object: str,  # noqa: A002 - the third part of a fact, as the API names it
        *,
        session_id: str,
        scope: str = "user",
        subject_type: str = "thing",
        object_type: str = "thing",
        valid_from: float | None = None,
        valid_to: float | None = None,
        evidence: str | None = None,
        metadata: dict[str, Any] | None = None,
        source: str | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Relation:
        """Record the fact ``subject predicate object`` in ``scope``; durable when it returns.

        ``subject`` and ``object`` are names: each is resolved to the node it names in the scope
        (exact name or alias, then near-duplicate spelling or embedding) or becomes a new node
        of ``subject_type``/``object_type``. The fact holds from ``valid_from`` (default now)
        until ``valid_to`` (default: until it is ended). A fact of a functional predicate
        (setting ``functional_predicates``, e.g. ``lives_in``) with a new object ends the
        current one's validity at this one's ``valid_from`` (both stay queryable with
        ``valid_at``/``as_of``). Restating a fact that holds records nothing new. Names and
        ``evidence`` are redacted per the tier and sealed; their bytes count against storage.
        """
        names = (_check_name(subject, "subject"), _check_name(object, "object"))
        predicate = _check_predicate(predicate, "predicate")
        types = (_check_predicate(subject_type, "subject_type"), _check_predicate(object_type, "object_type"))
        start = None if valid_from is None else check_epoch(valid_from, "valid_from")
        end = None if valid_to is None else check_epoch(valid_to, "valid_to")
        if evidence is not None:
            evidence = check_text(evidence, "evidence", MAX_MEMORY_TEXT)
        meta = check_metadata(metadata)
        if source is not None:
            source = check_text(source, "source")
        session, policy = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        rules = RedactionPolicy.of(policy.redact)
        names = (redact(names[0], rules)[0], redact(names[1], rules)[0])
        if evidence is not None:
            evidence = redact(evidence, rules)[0]
        now = self._clock()
        start = now if start is None else start
        if end is not None and end <= start:
            raise invalid("valid_to", f"an instant after valid_from ({start})", repr(end))
        if names[0] == names[1]:
            raise invalid("object", "an entity other than the subject", repr(names[1]))
        specs = await self._mentions(session, sid, list(zip(names, types, strict=True)), command_id)
        if specs[0].resolved is not None and specs[0].resolved == specs[1].resolved:
            raise invalid("object", "an entity other than the subject", f"{names[1]!r}, a name of the subject")
        # charged once the fact can be stated (nothing is charged for a refused one)
        await self._charge(session, sum(len(n.encode()) for n in names) + len((evidence or "").encode()),
                           "memory.relate", command_id)
        relation_id = new_id(12) if command_id is None else derived_id(session.tenant, sid, command_id, "fact")[:24]
        fact = msgspec.msgpack.encode(SealedFact(evidence=evidence, metadata=meta))
        sealed = await self._keys.encrypt(session.tenant, session.user_id, fact, aad=sid.encode())
        content_mac = None if command_id is None else await self._keys.mac(
            session.tenant, session.user_id,
            b"\x00".join(n.encode() for n in (sid, *names, predicate)) + b"\x00" + fact,
        )
        command = Relate(
            relation_id=relation_id, author=session.user_id, model_id=self.embedder.model_id,
            subject=specs[0].spec, predicate=predicate, object=specs[1].spec, valid_from=start, valid_to=end,
            functional=predicate in self._functional, sealed=sealed, source=source, content_mac=content_mac,
        )
        outcome = await self._ask(session.tenant, sid, command, command_id)
        state_graph = outcome.state.graph
        ids = [m.entity_id(state_graph) for m in specs]
        stated = next((e for e in outcome.events if isinstance(e, RelationStated)), None)
        if stated is None:  # it holds already: the open fact with that object
            edges = state_graph.facts.get(ids[0], {})
            relation_id = next(
                (rid for rid, e in edges.items() if e.open and e.predicate == predicate and e.object == ids[1]),
                relation_id,
            )
        kind, owner = sid.split(":", 1)
        return Relation(
            relation_id=relation_id, subject=specs[0].display, predicate=predicate, object=specs[1].display,
            subject_id=ids[0], object_id=ids[1], valid_from=stated.valid_from if stated else start,
            valid_to=stated.valid_to if stated else end, recorded_at=now, sequence=outcome.sequence,
            scope=kind, owner=owner, author=session.user_id, evidence=evidence, source=source, metadata=meta,
        )

    async def note_entity(
        self,
        name: str,
        *,
        session_id: str,
        scope: str = "user",
        entity_type: str = "thing",
        aliases: Sequence[str] = (),
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Entity:
        """The node ``name`` resolves to in ``scope`` (created if none), with ``aliases`` added
        as more of its names (each resolving to it from then on)."""
        name = _check_name(name, "name")
        entity_type = _check_predicate(entity_type, "entity_type")
        if isinstance(aliases, str) or not isinstance(aliases, Sequence) or len(aliases) > 32:
            raise invalid("aliases", "a list of at most 32 names", type(aliases).__name__)
        more = [_check_name(a, "aliases") for a in aliases]
        session, policy = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        rules = RedactionPolicy.of(policy.redact)
        name = redact(name, rules)[0]
        more = list(dict.fromkeys(a for a in (redact(a, rules)[0] for a in more) if normalise(a) != normalise(name)))
        await self._charge(session, sum(len(n.encode()) for n in (name, *more)), "memory.note_entity", command_id)
        (main,) = await self._mentions(session, sid, [(name, entity_type)], command_id)
        extra = await self._mentions(
            session, sid, [(a, entity_type) for a in more], None if command_id is None else f"{command_id}:alias",
            resolve_to=main.resolved or main.spec.entity_id,
        )
        outcome = await self._ask(session.tenant, sid, NoteEntity(
            author=session.user_id, model_id=self.embedder.model_id, entity=main.spec,
            aliases=tuple(m.spec for m in extra),
        ), command_id)
        entity_id = main.entity_id(outcome.state.graph)
        graph = await self._graph(session.tenant)
        now = When.of(self._clock(), None, None)
        found = await self._entities(session.tenant, graph, [entity_id], now, {sid})
        if found:
            return found[0]
        kind, owner = sid.split(":", 1)
        return Entity(entity_id=entity_id, name=name, entity_type=entity_type, aliases=tuple(more), scope=kind,
                      owner=owner, author=session.user_id, sequence=outcome.sequence, recorded_at=self._clock())

    async def end_fact(
        self, relation_id: str, *, session_id: str, scope: str = "user", valid_to: float | None = None,
        tenant: str | None = None,
    ) -> bool:
        """End a fact's validity at ``valid_to`` (default now); it stays queryable with
        ``valid_at``/``as_of``. False if it is unknown here or ended already."""
        relation_id = check_text(relation_id, "relation_id")
        end = None if valid_to is None else check_epoch(valid_to, "valid_to")
        session, _ = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        graph = await self._graph(session.tenant)
        record = graph.relations.get(relation_id)
        if record is None or record.scope_id != sid:
            return False
        outcome = await self._ask(session.tenant, sid, EndRelation(
            relation_id=relation_id, subject=record.subject, valid_to=self._clock() if end is None else end,
        ))
        return bool(outcome.events)

    async def forget_entity(
        self, entity: str, *, session_id: str, scope: str = "user", tenant: str | None = None
    ) -> bool:
        """Delete a node (by id or name) and every fact about it from ``scope``: they leave the
        graph and its queries, ``as_of`` included. False if there is no such node."""
        entity = _check_name(entity, "entity")
        session, _ = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        graph = await self._graph(session.tenant)
        ids = await self._lookup(session.tenant, graph, entity, [sid], When.of(self._clock(), None, None))
        removed = False
        for entity_id in ids:
            outcome = await self._ask(session.tenant, sid, ForgetEntity(entity_id=entity_id))
            removed = removed or bool(outcome.events)
        if removed:
            self._graph_reader.forget_tenant(session.tenant)  # what it opened of them goes too
        return removed

    # ------------------------------------------------------------------ reading

    async def entity(
        self, name: str, *, session_id: str, scopes: Sequence[str] = DEFAULT_SCOPES, as_of: float | None = None,
        tenant: str | None = None,
    ) -> Entity | None:
        """The node ``name`` (an id, a name or an alias; near-duplicates resolve too) in
        ``scopes``, as known ``as_of`` (default now); None if there is none."""
        name = _check_name(name, "name")
        session, sids, graph, when = await self._read(session_id, tenant, scopes, as_of, None)
        ids = await self._lookup(session.tenant, graph, name, sids, when)
        found = await self._entities(session.tenant, graph, ids[:1], when, set(sids))
        return found[0] if found else None

    async def facts_about(
        self, entity: str, *, session_id: str, predicates: Sequence[str] | None = None,
        as_of: float | None = None, valid_at: float | None = None, history: bool = False,
        scopes: Sequence[str] = DEFAULT_SCOPES, tenant: str | None = None,
    ) -> list[Relation]:
        """The facts with ``entity`` as subject or object, in recorded order. By default those
        that hold now; ``valid_at``: those that held then (as known now); ``as_of``: as known
        then (facts and ends recorded later are not seen); ``history``: every fact known,
        ended ones too."""
        entity = _check_name(entity, "entity")
        wanted = _check_predicates(predicates)
        if not isinstance(history, bool):
            raise invalid("history", "a bool", type(history).__name__)
        session, sids, graph, when = await self._read(session_id, tenant, scopes, as_of, valid_at, history)
        ids = await self._lookup(session.tenant, graph, entity, sids, when)
        found = model.facts_about(graph, ids, set(sids), when, wanted)
        return await self._relations(session.tenant, graph, found, when)

    async def neighbors(
        self, entity: str, *, session_id: str, depth: int = 1, predicates: Sequence[str] | None = None,
        as_of: float | None = None, valid_at: float | None = None, scopes: Sequence[str] = DEFAULT_SCOPES,
        limit: int = 100, tenant: str | None = None,
    ) -> list[Neighbor]:
        """The entities within ``depth`` hops of ``entity`` (1 to 3) over facts that hold now
        (or at ``valid_at``, as known ``as_of``), nearest first: each with its distance and the
        fact that reached it."""
        entity = _check_name(entity, "entity")
        if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
            raise invalid("depth", f"an int from 1 to {MAX_DEPTH}", repr(depth))
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_NEIGHBORS:
            raise invalid("limit", f"an int from 1 to {MAX_NEIGHBORS}", repr(limit))
        wanted = _check_predicates(predicates)
        session, sids, graph, when = await self._read(session_id, tenant, scopes, as_of, valid_at)
        starts = await self._lookup(session.tenant, graph, entity, sids, when)
        reached = model.neighbors(graph, starts, depth, set(sids), when, wanted, limit)
        found = await self._entities(session.tenant, graph, [r[0] for r in reached], when, set(sids))
        entities = {e.entity_id: e for e in found}
        facts = {r.relation_id: r for r in await self._relations(session.tenant, graph, [r[2] for r in reached], when)}
        return [
            Neighbor(entity=entities[eid], depth=hops, via=facts[rid])
            for eid, hops, rid in reached if eid in entities and rid in facts
        ]

    # ------------------------------------------------------------------ for recall

    async def _graph_links(
        self, tenant: str, sids: list[str], query: str, as_of: float | None
    ) -> tuple[set[str], set[str]]:
        """The entities named in ``query`` (in ``sids``) and the memories the facts about them
        were extracted from."""
        if self._projections is None:
            return set(), set()
        graph = await self._graph(tenant)
        if not graph.entities:
            return set(), set()
        when = When.of(self._clock(), as_of, None)
        words = normalise(query).split()
        entities: set[str] = set()
        for sid in sids:
            index = await self._graph_reader.index(tenant, graph, sid)
            for size in range(1, min(index.longest, _NGRAM) + 1):
                for i in range(len(words) - size + 1):
                    for eid in index.by_name.get(" ".join(words[i : i + size]), ()):
                        record = graph.entities.get(eid)
                        if record is not None and model.entity_known(record, when):
                            entities.add(eid)
        sources = {
            graph.relations[rid].source or ""
            for rid in model.facts_about(graph, entities, set(sids), when)
        }
        sources.discard("")
        return entities, sources

    async def _facts_of_memories(
        self, tenant: str, memory_ids: list[str], sids: list[str], as_of: float | None, per_memory: int = 20
    ) -> dict[str, tuple[Relation, ...]]:
        """For each memory, the facts one hop from the entities of the facts extracted from it."""
        graph = await self._graph(tenant)
        when = When.of(self._clock(), as_of, None)
        out: dict[str, tuple[Relation, ...]] = {}
        for memory_id in memory_ids:
            linked = {
                node for rid in graph.sources.get(memory_id, ())
                if (r := graph.relations.get(rid)) is not None
                for node in (r.subject, r.object)
            }
            found = model.facts_about(graph, sorted(linked), set(sids), when)[:per_memory]
            out[memory_id] = tuple(await self._relations(tenant, graph, found, when))
        return out

    # ------------------------------------------------------------------ helpers

    async def _graph(self, tenant: str) -> TenantGraph:
        """The tenant's graph, caught up with this client's writes."""
        if self._projections is None:
            return TenantGraph()
        runner = await self._projections.caught_up("graph", self._written)
        graph: Graph = runner.model
        return graph.tenants.get(tenant) or TenantGraph()

    async def _read(
        self, session_id: str, tenant: str | None, scopes: Sequence[str], as_of: float | None,
        valid_at: float | None, history: bool = False,
    ) -> tuple[Any, list[str], TenantGraph, When]:
        if isinstance(scopes, str) or not isinstance(scopes, Sequence) or not scopes:
            raise invalid("scopes", "a non-empty list of scopes", repr(scopes))
        as_of = None if as_of is None else check_epoch(as_of, "as_of")
        valid_at = None if valid_at is None else check_epoch(valid_at, "valid_at")
        session, _ = await self._caller(session_id, tenant)
        sids = sorted({await self._scope(s, session, write=False) for s in scopes})
        graph = await self._graph(session.tenant)
        return session, sids, graph, When.of(self._clock(), as_of, valid_at, history)

    async def _lookup(self, tenant: str, graph: TenantGraph, name: str, sids: list[str], when: When) -> list[str]:
        """The nodes ``name`` (an id, a name, an alias or a near-duplicate) is in ``sids``."""
        record = graph.entities.get(name)
        if record is not None and record.scope_id in sids and model.entity_known(record, when):
            return [name]
        found: list[str] = []
        normal = normalise(name)
        for sid in sids:
            index = await self._graph_reader.index(tenant, graph, sid)
            exact = [
                eid for eid in index.by_name.get(normal, ())
                if (r := graph.entities.get(eid)) is not None and model.entity_known(r, when)
            ]
            if exact:
                found += exact
                continue
            candidates = await self._candidates(tenant, graph, index, name, None)
            resolved = resolve(name, "thing", None, candidates)
            if resolved is not None and model.entity_known(graph.entities[resolved], when):
                found.append(resolved)
        return list(dict.fromkeys(found))

    async def _candidates(
        self, tenant: str, graph: TenantGraph, index: _ScopeIndex, name: str, vector: np.ndarray | None,
        many: int = 16,
    ) -> list[Candidate]:
        """The few nodes of a scope a mention could be: nearest by embedding, closest by
        spelling, and those whose names contain its words (the pure rule decides)."""
        from rapidfuzz import process
        from rapidfuzz.distance import JaroWinkler

        chosen: dict[str, None] = {}
        if vector is not None and index.matrix is not None and index.matrix.shape[1] == len(vector):
            similarity = index.matrix @ vector
            top = np.argsort(-similarity)[:many]
            chosen.update((index.ids[i], None) for i in top)
        normal = normalise(name)
        spelled = process.extract(normal, index.names, scorer=JaroWinkler.normalized_similarity,
                                  limit=many, score_cutoff=0.8)
        for known, _, _ in spelled:
            chosen.update((eid, None) for eid in index.by_name[known])
        for known in index.containing(set(normal.split())):
            chosen.update((eid, None) for eid in index.by_name[known])
        out: list[Candidate] = []
        for eid in sorted(chosen, key=lambda e: graph.entities[e].seq if e in graph.entities else math.inf):
            record = graph.entities.get(eid)
            names = None if record is None else await self._graph_reader.names(tenant, eid, record)
            if record is None or names is None:
                continue
            out.append(Candidate(
                entity_id=eid, entity_type=record.entity_type, names=(names.name, *names.aliases),
                vector=names.vector,
            ))
        return out

    async def _mentions(
        self, session: Any, sid: str, mentions: list[tuple[str, str]], command_id: str | None,
        resolve_to: str | None = None,
    ) -> list[_Mention]:
        """Each ``(name, type)`` as an EntitySpec: resolved against the scope's nodes (or to
        ``resolve_to``), embedded, fingerprinted and sealed."""
        if not mentions:
            return []
        tenant = session.tenant
        graph = await self._graph(tenant)
        index = await self._graph_reader.index(tenant, graph, sid)
        exact = [index.by_name.get(normalise(n), [None])[0] for n, _ in mentions]
        vectors = await anyio.to_thread.run_sync(self.embedder.embed, [n for n, _ in mentions])
        out: list[_Mention] = []
        for i, (name, entity_type) in enumerate(mentions):
            vector = np.asarray(vectors[i], dtype=np.float32)
            resolved = resolve_to or exact[i]
            if resolved is None:
                candidates = await self._candidates(tenant, graph, index, name, vector)
                resolved = resolve(name, entity_type, vector, candidates)
            display = name
            alias = False
            if resolved is not None and resolved in graph.entities:
                names = await self._graph_reader.names(tenant, resolved, graph.entities[resolved])
                if names is not None:
                    display = names.name
                    alias = normalise(name) not in {normalise(n) for n in (names.name, *names.aliases)}
            elif resolve_to is not None:
                alias = True
            sealed = await self._keys.encrypt(
                tenant, session.user_id,
                msgspec.msgpack.encode(SealedName(name=name, vector=vector.astype("<f4").tobytes())),
                aad=sid.encode(),
            )
            mac = await self._keys.mac(
                tenant, session.user_id, b"entity\x00" + sid.encode() + b"\x00" + normalise(name).encode()
            )
            entity_id = new_id(12) if command_id is None else derived_id(tenant, sid, command_id, "entity", str(i))[:24]
            spec = EntitySpec(entity_id=entity_id, entity_type=entity_type, name_mac=mac, sealed=sealed,
                              resolved=resolved, alias=alias)
            out.append(_Mention(spec, resolved, display))
        return out

    async def _charge(self, session: Any, size: int, operation: str, command_id: str | None) -> None:
        """Count ``size`` bytes against the session's storage quota (QuotaExceededError), under an
        id of its own: a retried write (same ``command_id``) is charged once."""
        await self._quotas.track_usage(
            session.session_id, operation, QuotaType.STORAGE, float(size), tenant=session.tenant,
            command_id=None if command_id is None else f"{command_id}:storage",
        )

    async def _entities(
        self, tenant: str, graph: TenantGraph, ids: Sequence[str], when: When, sids: set[str]
    ) -> list[Entity]:
        out: list[Entity] = []
        for eid in ids:
            record = graph.entities.get(eid)
            if record is None or record.scope_id not in sids or not model.entity_known(record, when):
                continue
            names = await self._graph_reader.names(tenant, eid, record)
            if names is None:
                continue
            kind, owner = record.scope_id.split(":", 1)
            aliases = names.aliases
            if when.as_of is not None:  # only the aliases recorded by then
                aliases = tuple(a for a, at in zip(aliases, names.alias_times, strict=True) if at <= when.as_of)
            out.append(Entity(
                entity_id=eid, name=names.name, entity_type=record.entity_type, aliases=aliases, scope=kind,
                owner=owner, author=record.author, recorded_at=record.at, sequence=record.seq,
            ))
        return out

    async def _relations(self, tenant: str, graph: TenantGraph, ids: Sequence[str], when: When) -> list[Relation]:
        out: list[Relation] = []
        for rid in ids:
            record = graph.relations.get(rid)
            if record is None:
                continue
            ends = [graph.entities.get(record.subject), graph.entities.get(record.object)]
            if ends[0] is None or ends[1] is None:
                continue
            subject = await self._graph_reader.names(tenant, record.subject, ends[0])
            obj = await self._graph_reader.names(tenant, record.object, ends[1])
            if subject is None or obj is None:
                continue  # a name whose author's key is gone
            fact = await self._graph_reader.fact(tenant, rid, record)
            end = record.end if record.end is not None and (when.as_of is None or record.end.at <= when.as_of) else None
            kind, owner = record.scope_id.split(":", 1)
            out.append(Relation(
                relation_id=rid, subject=subject.name, predicate=record.predicate, object=obj.name,
                subject_id=record.subject, object_id=record.object, valid_from=record.valid_from,
                valid_to=model.known_end(record, when.as_of), recorded_at=record.at, sequence=record.seq,
                ended_at=None if end is None else end.at, ended_by=None if end is None else end.by,
                scope=kind, owner=owner, author=record.author, evidence=fact.evidence, source=record.source,
                metadata=fact.metadata,
            ))
        return out


class _Mention(NamedTuple):
    spec: EntitySpec
    resolved: str | None  # the node the shell resolved the mention to
    display: str  # that node's canonical name (or the mention's, for a new node)

    def entity_id(self, graph: Any) -> str:
        """The node the aggregate settled on: the resolved one, the one this author named so
        before (``name_mac``), or the new one."""
        if self.resolved is not None and self.resolved in graph.entities:
            return self.resolved
        return str(graph.entity_names.get(self.spec.name_mac, self.spec.entity_id))


def _check_name(value: Any, field: str) -> str:
    name = check_text(value, field)
    if not normalise(name):
        raise invalid(field, "a name with at least one letter or digit", repr(name)[:100])
    return name


def _check_predicate(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _PREDICATE.match(value):
        got = repr(value)[:100] if isinstance(value, str) else type(value).__name__
        raise invalid(field, PREDICATE_EXPECTED, got)
    return value


def _check_predicates(value: Any) -> set[str] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Sequence | set | frozenset) or not value or len(value) > 100:
        raise invalid("predicates", "a non-empty list of at most 100 predicates", repr(value)[:100])
    return {_check_predicate(p, "predicates") for p in value}
