"""The knowledge graph's pure rules (actors.graph), its read model's fold and queries
(projections.graph): contradiction of functional predicates, exact-name merging, ending,
forgetting, erasure, bi-temporal visibility, and resolution of mentions."""

from __future__ import annotations

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.events import (
    Applied,
    Commit,
    EndRelation,
    EntityAliased,
    EntityForgotten,
    EntityNoted,
    EntitySpec,
    Event,
    ForgetAuthor,
    ForgetEntity,
    NoteEntity,
    Relate,
    RelationEnded,
    RelationForgotten,
    RelationStated,
)
from actors.graph import Candidate, normalise, resolve
from actors.memory import MemoryState, decide, evolve
from projections.graph import Graph, GraphProjection, When, facts_about, holds, neighbors

T0 = 1_800_000_000.0
SCOPE = "user:u1"


def state() -> MemoryState:
    return MemoryState(tenant="acme", scope_id=SCOPE)


def spec(name: str, *, resolved: str | None = None, alias: bool = False, kind: str = "thing") -> EntitySpec:
    """A mention of ``name``: its id and fingerprint are the name itself (the shell's are random
    and keyed)."""
    return EntitySpec(entity_id=f"e-{name}", entity_type=kind, name_mac=f"mac-{normalise(name)}", sealed=b"s",
                      resolved=resolved, alias=alias)


def relate(rid: str, s: str, p: str, o: str, *, at: float = T0, until: float | None = None,
           functional: bool = False, author: str = "u1") -> Relate:
    return Relate(relation_id=rid, author=author, model_id="m", subject=spec(s), predicate=p, object=spec(o),
                  valid_from=at, valid_to=until, functional=functional, sealed=b"f")


def run(s: MemoryState, command: object, now: float = T0) -> tuple[MemoryState, tuple[Event, ...]]:
    d = decide(s, command, now)  # type: ignore[arg-type]
    assert d.rejection is None, d.rejection
    for e in d.events:
        s = evolve(s, e)
    return s, d.events


def test_a_new_object_of_a_functional_predicate_ends_the_current_fact() -> None:
    s, first = run(state(), relate("r1", "Ada", "lives_in", "Paris", functional=True))
    assert [type(e) for e in first] == [EntityNoted, EntityNoted, RelationStated]
    s, second = run(s, relate("r2", "Ada", "lives_in", "Berlin", at=T0 + 10, functional=True), T0 + 10)
    assert [type(e) for e in second] == [EntityNoted, RelationEnded, RelationStated]  # Ada is known
    ended = second[1]
    assert isinstance(ended, RelationEnded)
    assert (ended.relation_id, ended.valid_to, ended.reason, ended.by) == ("r1", T0 + 10, "contradicted", "r2")
    edges = s.graph.facts["e-Ada"]
    assert edges["r1"].open is False and edges["r2"].open is True


def test_a_non_functional_predicate_keeps_every_object() -> None:
    s, _ = run(state(), relate("r1", "Ada", "likes", "tea"))
    s, events = run(s, relate("r2", "Ada", "likes", "jazz"))
    assert not any(isinstance(e, RelationEnded) for e in events)
    assert all(edge.open for edge in s.graph.facts["e-Ada"].values())


def test_an_older_statement_of_a_functional_fact_becomes_bounded_history() -> None:
    s, _ = run(state(), relate("r1", "Ada", "lives_in", "Berlin", at=T0, functional=True))
    s, events = run(s, relate("r2", "Ada", "lives_in", "Paris", at=T0 - 100, functional=True))
    (stated,) = [e for e in events if isinstance(e, RelationStated)]
    assert stated.valid_to == T0 and not any(isinstance(e, RelationEnded) for e in events)
    assert s.graph.facts["e-Ada"]["r1"].open and not s.graph.facts["e-Ada"]["r2"].open


def test_restating_a_holding_fact_and_retrying_record_nothing() -> None:
    s, _ = run(state(), relate("r1", "Ada", "likes", "tea"))
    assert run(s, relate("r9", "ada", "likes", "Tea"))[1] == ()  # same names (fingerprints), same fact
    retried = run(s, relate("r1", "Ada", "likes", "coffee"))[1]
    assert not any(isinstance(e, RelationStated) for e in retried)  # r1 is filed under Ada already


def test_mentions_merge_by_resolution_or_fingerprint_and_add_aliases() -> None:
    s, _ = run(state(), NoteEntity(author="u1", model_id="m", entity=spec("Ada Lovelace", kind="person")))
    s, events = run(s, NoteEntity(author="u1", model_id="m", entity=spec("Ada", resolved="e-Ada Lovelace", alias=True)))
    assert [type(e) for e in events] == [EntityAliased]
    assert s.graph.entity_names["mac-ada"] == "e-Ada Lovelace"
    # the alias's fingerprint now resolves the name without the shell's help
    s, events = run(s, relate("r1", "Ada", "works_at", "Acme"))
    assert [type(e) for e in events] == [EntityNoted, RelationStated]
    assert s.graph.facts["e-Ada Lovelace"]["r1"].object == "e-Acme"
    # a resolution to a node that has gone falls back to a new node
    s, _ = run(s, ForgetEntity(entity_id="e-Acme"))
    s, events = run(s, relate("r2", "Ada", "works_at", "Initech"))
    assert [type(e) for e in events] == [EntityNoted, RelationStated]


def test_subject_and_object_must_differ_and_valid_to_follow_valid_from() -> None:
    d = decide(state(), relate("r1", "Ada", "likes", "ada"), T0)
    assert d.rejection is not None and d.rejection.fields["field"] == "object" and d.events == ()
    d = decide(state(), relate("r1", "Ada", "likes", "tea", until=T0), T0)
    assert d.rejection is not None and d.rejection.fields["field"] == "valid_to" and d.events == ()


def test_ending_is_idempotent_and_checked() -> None:
    s, _ = run(state(), relate("r1", "Ada", "likes", "tea"))
    d = decide(s, EndRelation(relation_id="r1", subject="e-Ada", valid_to=T0 - 1), T0)
    assert d.rejection is not None and d.rejection.fields["field"] == "valid_to"
    s, events = run(s, EndRelation(relation_id="r1", subject="e-Ada", valid_to=T0 + 5))
    assert [type(e) for e in events] == [RelationEnded]
    assert run(s, EndRelation(relation_id="r1", subject="e-Ada", valid_to=T0 + 6))[1] == ()
    assert run(s, EndRelation(relation_id="nope", subject="e-Ada", valid_to=T0 + 6))[1] == ()


def test_forgetting_an_entity_takes_every_fact_touching_it() -> None:
    s, _ = run(state(), relate("r1", "Ada", "works_at", "Acme"))
    s, _ = run(s, relate("r2", "Acme", "located_in", "Lisbon"))
    s, _ = run(s, relate("r3", "Ada", "likes", "tea"))
    s, events = run(s, ForgetEntity(entity_id="e-Acme"))
    assert sorted(e.relation_id for e in events if isinstance(e, RelationForgotten)) == ["r1", "r2"]
    assert "e-Acme" not in s.graph.entities and "mac-acme" not in s.graph.entity_names
    assert list(s.graph.facts["e-Ada"]) == ["r3"] and "e-Acme" not in s.graph.facts
    assert run(s, ForgetEntity(entity_id="e-Acme"))[1] == ()


def test_erasing_an_author_takes_their_nodes_and_facts_and_facts_on_their_nodes() -> None:
    s, _ = run(state(), relate("r1", "Ada", "works_at", "Acme", author="u1"))
    s, _ = run(s, relate("r2", "Bob", "likes", "Acme", author="u2"))  # on u1's node Acme
    s, _ = run(s, relate("r3", "Bob", "likes", "tea", author="u2"))
    s, events = run(s, ForgetAuthor(author="u1"))
    assert {e.relation_id for e in events if isinstance(e, RelationForgotten)} == {"r1", "r2"}
    assert {e.entity_id for e in events if isinstance(e, EntityForgotten)} == {"e-Ada", "e-Acme"}
    assert set(s.graph.entities) == {"e-Bob", "e-tea"} and list(s.graph.facts) == ["e-Bob"]


names = st.sampled_from(["Ada", "ada", "Bob", "Paris", "Berlin", "Acme", "tea"])
predicates = st.sampled_from(["lives_in", "works_at", "likes"])
graph_command = st.one_of(
    # relation ids are unique (random, or derived from a command id): one per statement here
    st.builds(lambda s, p, o, d: relate("", s, p, o, at=T0 + d, functional=p != "likes"),
              names, predicates, names, st.integers(-5, 5)),
    st.builds(lambda i, s, d: EndRelation(relation_id=f"r{i}", subject=f"e-{s}", valid_to=T0 + d),
              st.integers(0, 8), names, st.integers(0, 9)),
    st.builds(lambda n: ForgetEntity(entity_id=f"e-{n}"), names),
    st.just(ForgetAuthor(author="u1")),
)


@settings(max_examples=200, deadline=None)
@given(commands=st.lists(graph_command, max_size=25))
def test_invariants_hold_and_the_projection_and_the_aggregate_agree(commands: list[object]) -> None:
    s, model, projection = state(), Graph(), GraphProjection()
    log: list[Event] = []
    for seq, command in enumerate(commands, start=1):
        if isinstance(command, Relate):
            command = msgspec.structs.replace(command, relation_id=f"r{seq}")
        d = decide(s, command, T0 + seq)  # type: ignore[arg-type]
        for e in d.events:
            s = evolve(s, e)
            log.append(e)
        wire = msgspec.json.decode(msgspec.json.encode(_commit(seq, T0 + seq, d.events)), type=Commit)
        projection.apply(model, seq, f"bb.acme.memory.{SCOPE}", wire)
        # at most one open fact per functional (subject, predicate); facts only between known nodes
        for subject, edges in s.graph.facts.items():
            assert subject in s.graph.entities
            opened = [(e.predicate, e.object) for e in edges.values() if e.open and e.predicate != "likes"]
            assert len({p for p, _ in opened}) == len(opened)
            assert all(e.object in s.graph.entities for e in edges.values())
        # the read model holds exactly the aggregate's nodes and facts
        tenant = model.tenants.get("acme")
        assert set(tenant.entities if tenant else {}) == set(s.graph.entities)
        known = {rid for edges in s.graph.facts.values() for rid in edges}
        assert set(tenant.relations if tenant else {}) == known
        if tenant:
            for rid, record in tenant.relations.items():
                open_in_state = s.graph.facts[record.subject][rid].open
                assert open_in_state == (record.end is None and record.valid_to is None)
    replayed = state()
    for e in log:
        replayed = evolve(replayed, msgspec.json.decode(msgspec.json.encode(e), type=type(e)))
    assert replayed == s


def _commit(seq: int, at: float, events: tuple[Event, ...]) -> Commit:
    return Commit(at=at, version=seq, commands=(Applied(command_id=str(seq), principal="p", events=events),))


def test_bitemporal_queries_over_the_read_model() -> None:
    model, projection = Graph(), GraphProjection()
    s = state()
    steps = [
        (T0, relate("r1", "Ada", "lives_in", "Paris", at=T0, functional=True)),
        (T0 + 10, relate("r2", "Ada", "works_at", "Acme", at=T0 + 10, functional=True)),
        (T0 + 20, relate("r3", "Ada", "lives_in", "Berlin", at=T0 + 15, functional=True)),  # told late
        (T0 + 30, relate("r4", "Acme", "located_in", "Lisbon", at=T0 + 30)),
    ]
    for seq, (at, command) in enumerate(steps, start=1):
        d = decide(s, command, at)
        for e in d.events:
            s = evolve(s, e)
        projection.apply(model, seq, f"bb.acme.memory.{SCOPE}", _commit(seq, at, d.events))
    g = model.tenants["acme"]
    scopes = {SCOPE}

    def objects(when: When, predicates: set[str] | None = None) -> list[str]:
        return [g.relations[r].object for r in facts_about(g, ["e-Ada"], scopes, when, predicates)]

    assert objects(When.of(T0 + 40, None, None)) == ["e-Acme", "e-Berlin"]
    assert objects(When.of(T0 + 40, None, T0 + 12)) == ["e-Paris", "e-Acme"]  # as known now
    assert objects(When.of(T0 + 40, T0 + 18, None)) == ["e-Paris", "e-Acme"]  # known at 18: Berlin was not
    assert objects(When.of(T0 + 40, T0 + 18, T0 + 17)) == ["e-Paris", "e-Acme"]
    assert objects(When.of(T0 + 40, T0 + 25, T0 + 17)) == ["e-Acme", "e-Berlin"]  # known at 25, valid at 17
    assert objects(When.of(T0 + 40, None, None, history=True), {"lives_in"}) == ["e-Paris", "e-Berlin"]
    assert objects(When.of(T0 + 40, T0 + 5, None, history=True)) == ["e-Paris"]
    assert not holds(g.relations["r1"], When.of(T0 + 40, None, T0 - 1))
    # neighbors: Lisbon is two hops away, only from the time Acme's location was recorded
    reached = neighbors(g, ["e-Ada"], 2, scopes, When.of(T0 + 40, None, None))
    assert [(e, d) for e, d, _ in reached] == [("e-Acme", 1), ("e-Berlin", 1), ("e-Lisbon", 2)]
    then = neighbors(g, ["e-Ada"], 2, scopes, When.of(T0 + 40, T0 + 25, None))
    assert [e for e, _, _ in then] == ["e-Acme", "e-Berlin"]
    assert neighbors(g, ["e-Ada"], 2, {"user:other"}, When.of(T0 + 40, None, None)) == []
    assert len(neighbors(g, ["e-Ada"], 2, scopes, When.of(T0 + 40, None, None), limit=1)) == 1


def test_resolution_prefers_exact_names_then_spelling_with_embedding_then_words() -> None:
    ada = Candidate(entity_id="a", entity_type="person", names=("Ada Lovelace", "Countess of Lovelace"),
                    vector=(1.0, 0.0))
    paris = Candidate(entity_id="p", entity_type="place", names=("Paris",), vector=(0.0, 1.0))
    hilton = Candidate(entity_id="h", entity_type="person", names=("Paris Hilton",), vector=(0.0, 1.0))
    john = Candidate(entity_id="j", entity_type="person", names=("John Smith",), vector=(0.6, 0.8))
    pool = [ada, paris, hilton, john]
    assert resolve("countess of LOVELACE!", "person", None, pool) == "a"  # an alias, normalised
    assert resolve("Paris", "place", None, pool) == "p"
    assert resolve("Paris", "thing", None, pool) == "p"  # exact name first (oldest)
    assert resolve("Jon Smith", "person", (0.6, 0.8), pool) == "j"  # spelled almost so, embedding agrees
    assert resolve("Jon Smith", "person", (-0.6, -0.8), pool) is None  # spelled so, embedding disagrees
    assert resolve("Ada", "person", (0.9, 0.1), pool) == "a"  # every word of one name
    assert resolve("Ada", "place", (0.9, 0.1), pool) is None  # types differ
    assert resolve("Lovelace", "person", (-1.0, 0.0), pool) is None  # words, embedding far
    assert resolve("Augusta Byron", "person", (0.99, 0.01), pool) == "a"  # embedding alone, above 0.93
    assert resolve("Augusta Byron", "person", (0.9, 0.44), pool) is None  # below it
    assert resolve("...", "thing", None, pool) is None
    assert normalise("  Ａda\tLOVELACE, ") == "ada lovelace"
