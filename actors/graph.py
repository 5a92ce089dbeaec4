"""The knowledge graph's pure rules, on the memory aggregates (one per scope).

An entity (a node) has an id, a type and names; a relation (a fact) ``subject predicate
object`` is bi-temporal: it holds from ``valid_from`` until ``valid_to`` (valid time) and the
log recorded it, and its end, at their commits (recorded time). Nothing is overwritten: a fact
of a *functional* predicate (one value at a time, such as ``lives_in``; which ones is
configuration, so the command says) ends the current one's validity when a different object is
stated; a fact stated as starting before the current one began is history, bounded by it.

The aggregate files facts by subject (``facts[subject][relation_id]``): a write copies the
outer map and one subject's facts, not every fact of the scope. Ended facts stay (erasure must
find them); forgotten ones leave.

Entity resolution is two-sided: the shell resolves a mention against the graph projection (names,
aliases, string and embedding similarity: :func:`resolve`, pure) and says so in the command; the
aggregate merges exact names of one author by ``name_mac``, which holds under concurrency.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from typing import Any

import msgspec
import numpy as np

from actors.events import (
    Decision,
    EndRelation,
    EntityAliased,
    EntityForgotten,
    EntityNoted,
    EntitySpec,
    Event,
    ForgetEntity,
    GraphCommand,
    NoteEntity,
    Rejection,
    Relate,
    RelationEnded,
    RelationForgotten,
    RelationStated,
)


class GraphNode(msgspec.Struct, frozen=True, gc=False):
    author: str
    entity_type: str


class GraphEdge(msgspec.Struct, frozen=True, gc=False):
    predicate: str
    object: str
    author: str
    valid_from: float
    open: bool  # not ended, no stated end: the fact holds now as far as is known


class GraphState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The graph part of a memory scope's state."""

    entities: dict[str, GraphNode] = {}
    entity_names: dict[str, str] = {}  # name_mac -> entity id
    facts: dict[str, dict[str, GraphEdge]] = {}  # subject id -> relation id -> edge


# --------------------------------------------------------------------------- decide


def decide(graph: GraphState, command: GraphCommand, now: float) -> Decision:
    if isinstance(command, NoteEntity):
        events: list[Event] = []
        graph, entity_id = _mention(graph, command.entity, command.author, command.model_id, now, events)
        for alias in command.aliases:
            graph, _ = _mention(
                graph, msgspec.structs.replace(alias, resolved=entity_id, alias=True),
                command.author, command.model_id, now, events,
            )
        return Decision(events=tuple(events))
    if isinstance(command, Relate):
        return _relate(graph, command, now)
    if isinstance(command, EndRelation):
        edge = graph.facts.get(command.subject, {}).get(command.relation_id)
        if edge is None or not edge.open:
            return Decision()  # unknown, forgotten or ended already: ending is idempotent
        if command.valid_to < edge.valid_from:
            return _invalid("valid_to", f"an instant at or after the fact's valid_from ({edge.valid_from})",
                            command.valid_to)
        return Decision(events=(RelationEnded(
            at=now, relation_id=command.relation_id, subject=command.subject, valid_to=command.valid_to,
            reason="ended",
        ),))
    if isinstance(command, ForgetEntity):
        if command.entity_id not in graph.entities:
            return Decision()  # forgetting is idempotent
        return Decision(events=forget(graph, {command.entity_id}, (), "deleted", now))
    raise TypeError(f"not a graph command: {command!r}")


def forget(
    graph: GraphState, entity_ids: set[str], authors: Iterable[str], reason: str, now: float
) -> tuple[Event, ...]:
    """Events removing ``entity_ids`` and every fact touching them, and every node and fact by
    one of ``authors`` (erasure)."""
    by = set(authors)
    gone = set(entity_ids) | {eid for eid, node in graph.entities.items() if node.author in by}
    events: list[Event] = []
    for subject, edges in graph.facts.items():
        for relation_id, edge in edges.items():
            if subject in gone or edge.object in gone or edge.author in by:
                events.append(RelationForgotten(at=now, relation_id=relation_id, subject=subject, reason=reason))
    events += [EntityForgotten(at=now, entity_id=eid, reason=reason) for eid in sorted(gone)]
    return tuple(events)


def _relate(graph: GraphState, command: Relate, now: float) -> Decision:
    if command.valid_to is not None and command.valid_to <= command.valid_from:
        return _invalid("valid_to", f"an instant after valid_from ({command.valid_from})", command.valid_to)
    events: list[Event] = []
    graph, subject = _mention(graph, command.subject, command.author, command.model_id, now, events)
    graph, obj = _mention(graph, command.object, command.author, command.model_id, now, events)
    if subject == obj:
        return _invalid("object", "an entity other than the subject", "the subject itself")
    edges = graph.facts.get(subject, {})
    current = [(rid, e) for rid, e in edges.items() if e.open and e.predicate == command.predicate]
    if command.valid_to is None and any(e.object == obj for _, e in current):
        return Decision(events=tuple(events))  # known and holding: nothing new to record
    if command.relation_id in edges:
        return Decision(events=tuple(events))  # a retry that got here first (ids are derived)
    valid_to = command.valid_to
    if command.functional and valid_to is None:
        for rid, edge in current:
            if command.valid_from >= edge.valid_from:
                events.append(RelationEnded(
                    at=now, relation_id=rid, subject=subject, valid_to=command.valid_from,
                    reason="contradicted", by=command.relation_id,
                ))
            else:  # stated as holding before the current fact began: history, bounded by it
                valid_to = edge.valid_from if valid_to is None else min(valid_to, edge.valid_from)
    events.append(RelationStated(
        at=now, relation_id=command.relation_id, author=command.author, subject=subject,
        predicate=command.predicate, object=obj, valid_from=command.valid_from, valid_to=valid_to,
        source=command.source, sealed=command.sealed,
    ))
    return Decision(events=tuple(events))


def _mention(
    graph: GraphState, spec: EntitySpec, author: str, model_id: str, now: float, events: list[Event]
) -> tuple[GraphState, str]:
    """The node ``spec`` names (appending what records it to ``events``) and the state after."""
    known = graph.entity_names.get(spec.name_mac)
    if spec.resolved is not None and spec.resolved in graph.entities:
        target = spec.resolved
    elif known is not None and known in graph.entities:
        return graph, known  # this author named it so before
    elif spec.entity_id in graph.entities:
        return graph, spec.entity_id  # named twice in one command, or a retry
    else:
        event: Event = EntityNoted(
            at=now, entity_id=spec.entity_id, author=author, entity_type=spec.entity_type,
            name_mac=spec.name_mac, model_id=model_id, sealed=spec.sealed,
        )
        events.append(event)
        return evolve(graph, event), spec.entity_id
    if spec.alias and known is None:
        event = EntityAliased(
            at=now, entity_id=target, author=author, name_mac=spec.name_mac, model_id=model_id,
            sealed=spec.sealed,
        )
        events.append(event)
        graph = evolve(graph, event)
    return graph, target


def _invalid(field: str, expected: str, got: object) -> Decision:
    return Decision(rejection=Rejection(
        "validation_error", f"{field}: expected {expected}, got {got!r}"[:300],
        {"field": field, "expected": expected, "got": str(got)[:100]},
    ))


# --------------------------------------------------------------------------- evolve


def evolve(graph: GraphState, event: Event) -> GraphState:
    replace = msgspec.structs.replace
    if isinstance(event, EntityNoted):
        return replace(
            graph, entities={**graph.entities, event.entity_id: GraphNode(event.author, event.entity_type)},
            entity_names={**graph.entity_names, event.name_mac: event.entity_id},
        )
    if isinstance(event, EntityAliased):
        if event.entity_id not in graph.entities:
            return graph
        return replace(graph, entity_names={**graph.entity_names, event.name_mac: event.entity_id})
    if isinstance(event, RelationStated):
        edge = GraphEdge(event.predicate, event.object, event.author, event.valid_from, event.valid_to is None)
        edges = {**graph.facts.get(event.subject, {}), event.relation_id: edge}
        return replace(graph, facts={**graph.facts, event.subject: edges})
    if isinstance(event, RelationEnded):
        ending = graph.facts.get(event.subject, {}).get(event.relation_id)
        if ending is None:
            return graph
        edges = {**graph.facts[event.subject], event.relation_id: replace(ending, open=False)}
        return replace(graph, facts={**graph.facts, event.subject: edges})
    if isinstance(event, RelationForgotten):
        if event.relation_id not in graph.facts.get(event.subject, {}):
            return graph
        edges = {k: v for k, v in graph.facts[event.subject].items() if k != event.relation_id}
        facts = {**graph.facts, event.subject: edges} if edges else {
            k: v for k, v in graph.facts.items() if k != event.subject
        }
        return replace(graph, facts=facts)
    if isinstance(event, EntityForgotten):
        if event.entity_id not in graph.entities:
            return graph
        return replace(
            graph,
            entities={k: v for k, v in graph.entities.items() if k != event.entity_id},
            entity_names={k: v for k, v in graph.entity_names.items() if v != event.entity_id},
        )
    raise TypeError(f"not a graph event: {event!r}")


# --------------------------------------------------------------------------- resolution (pure)

#: two names this similar (rapidfuzz's normalised Jaro-Winkler, 0..1) are one entity if their
#: embeddings also agree at least EMBEDDING_WITH_STRING ("Jon Smith", "John Smith")
STRING_SIMILAR = 0.92
EMBEDDING_WITH_STRING = 0.6
#: embeddings this close are one entity whatever the spelling
EMBEDDING_SAME = 0.93
#: a name whose words are all words of exactly one candidate's ("Ada" of "Ada Lovelace") is that
#: candidate if their embeddings agree at least this much
EMBEDDING_WITH_WORDS = 0.45


class Candidate(msgspec.Struct, frozen=True):
    """A node a mention may be: its names (canonical first) and its name's vector."""

    entity_id: str
    entity_type: str
    names: tuple[str, ...]
    vector: Any = None  # a sequence of floats (a numpy vector from the shell), or None


def normalise(name: str) -> str:
    """A name as compared: NFKC, case folded, punctuation dropped, single spaces."""
    text = unicodedata.normalize("NFKC", name).casefold()
    return " ".join(re.findall(r"\w+", text))


def compatible(a: str, b: str) -> bool:
    """Whether nodes of types ``a`` and ``b`` may be one ("thing" is anything)."""
    return a == b or "thing" in (a, b)


def resolve(
    name: str, entity_type: str, vector: Any, candidates: Iterable[Candidate],
    similarity: object = None,
) -> str | None:
    """The candidate a mention ``name`` (of ``entity_type``, embedded as ``vector``) is, or None.

    In order: a candidate with that exact (normalised) name or alias; else the best one whose
    name is spelled almost the same and whose embedding agrees; else the one whose embedding is
    nearly identical; else the single one whose name contains every word of ``name``. Types
    must be compatible. Ties go to the first candidate given (the shell passes them oldest
    first). ``similarity`` is a ``(a, b) -> 0..1`` string similarity (default rapidfuzz's
    Jaro-Winkler)."""
    wanted = normalise(name)
    if not wanted:
        return None
    pool = [c for c in candidates if compatible(c.entity_type, entity_type)]
    for c in pool:
        if any(normalise(n) == wanted for n in c.names):
            return c.entity_id
    similar = similarity or _jaro_winkler
    best: tuple[float, str] | None = None
    for c in pool:
        cosine = _cosine(vector, c.vector)
        spelled = max((similar(wanted, normalise(n)) for n in c.names), default=0.0)  # type: ignore[operator]
        if spelled >= STRING_SIMILAR and cosine >= EMBEDDING_WITH_STRING or cosine >= EMBEDDING_SAME:
            score = spelled + cosine
            if best is None or score > best[0]:
                best = (score, c.entity_id)
    if best is not None:
        return best[1]
    words = set(wanted.split())
    containing = [
        c for c in pool
        if any(words < set(normalise(n).split()) for n in c.names) and _cosine(vector, c.vector) >= EMBEDDING_WITH_WORDS
    ]
    return containing[0].entity_id if len(containing) == 1 else None


def _cosine(a: Any, b: Any) -> float:
    if a is None or b is None or len(a) != len(b):
        return 0.0
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return float(x @ y) / norm if norm else 0.0


def _jaro_winkler(a: str, b: str) -> float:
    from rapidfuzz.distance import JaroWinkler  # C speed; imported where resolution runs

    return float(JaroWinkler.normalized_similarity(a, b))
