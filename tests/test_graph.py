"""The knowledge graph on a real nats-server and LanceDB: entities and bi-temporal facts as
events on the memory aggregates, resolution, queries as of any time, walls and erasure."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from actors.events import EntityNoted, RelationEnded, RelationStated
from blackbird import AsyncBlackbird
from blackbird.errors import ScopeAccessError, SessionNotFoundError, ValidationError

from .clock import Clock
from .conftest import NatsServer
from .embedders import HashEmbedder

pytestmark = pytest.mark.anyio


@pytest.fixture
def clock() -> Clock:
    return Clock(1_800_000_000.0)


@pytest.fixture
async def gb(nats_server: NatsServer, tmp_path: Path, clock: Clock) -> AsyncIterator[AsyncBlackbird]:
    async with AsyncBlackbird(
        nats_url=nats_server.url,
        tenant="acme",
        embedder=HashEmbedder(),
        clock=clock,
        learn=False,
        memory_dir=str(tmp_path / "memory"),
    ) as client:
        yield client


async def _session(bb: AsyncBlackbird, user: str = "alice", tenant: str | None = None) -> str:
    session = await bb.session_manager.create_session(user_id=user, tier="pro", tenant=tenant)
    return session.session_id


async def test_a_contradicting_fact_ends_the_old_one_and_both_stay_queryable(gb: AsyncBlackbird, clock: Clock) -> None:
    sid = await _session(gb)
    t0 = clock.now
    paris = await gb.memory.relate(
        "Ada",
        "lives_in",
        "Paris",
        session_id=sid,
        subject_type="person",
        object_type="place",
        evidence="Ada said she lives in Paris",
    )
    await gb.memory.relate("Ada", "works_at", "Acme", session_id=sid, subject_type="person", object_type="organization")
    clock.now = t1 = t0 + 100
    berlin = await gb.memory.relate(
        "Ada", "lives_in", "Berlin", session_id=sid, subject_type="person", object_type="place"
    )
    assert berlin.subject_id == paris.subject_id  # one node for Ada

    now = await gb.memory.facts_about("Ada", session_id=sid)
    assert sorted((f.predicate, f.object) for f in now) == [("lives_in", "Berlin"), ("works_at", "Acme")]
    history = await gb.memory.facts_about("Ada", session_id=sid, predicates=["lives_in"], history=True)
    ended = next(f for f in history if f.object == "Paris")
    assert ended.valid_to == t1 and ended.ended_by == berlin.relation_id and ended.ended_at == t1
    assert ended.evidence == "Ada said she lives in Paris"
    # what held at t0 (as known now), and what was known at t0
    assert [
        f.object for f in await gb.memory.facts_about("Ada", session_id=sid, predicates=["lives_in"], valid_at=t0 + 50)
    ] == ["Paris"]
    assert [
        f.object for f in await gb.memory.facts_about("Ada", session_id=sid, predicates=["lives_in"], as_of=t0 + 50)
    ] == ["Paris"]
    known_then = await gb.memory.facts_about(
        "Ada", session_id=sid, predicates=["lives_in"], as_of=t0 + 50, history=True
    )
    assert [(f.object, f.valid_to) for f in known_then] == [("Paris", None)]  # its end was not known yet

    # the user's audit shows it on the timeline, and the graph at any instant
    report = await gb.audit.replay(user_id="alice")
    what = [w for row in report.rows for w in row.what]
    assert any(w.startswith(f"RelationEnded {paris.relation_id} ") and "contradicted" in w for w in what)
    assert report.state["graph"] == {"entities": 4, "facts_open": 2, "facts_closed": 1}
    before = await gb.audit.replay(user_id="alice", until=t0 + 50)
    assert before.state["graph"] == {"entities": 3, "facts_open": 2, "facts_closed": 0}


async def test_restating_a_holding_fact_records_nothing_new(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    first = await gb.memory.relate("Ada", "likes", "tea", session_id=sid)
    again = await gb.memory.relate("ada", "likes", "Tea", session_id=sid)
    assert again.relation_id == first.relation_id
    facts = await gb.memory.facts_about("Ada", session_id=sid, history=True)
    assert len(facts) == 1


async def test_a_fact_stated_as_older_than_the_current_one_is_history(gb: AsyncBlackbird, clock: Clock) -> None:
    sid = await _session(gb)
    await gb.memory.relate("Ada", "lives_in", "Berlin", session_id=sid, valid_from=clock.now)
    old = await gb.memory.relate("Ada", "lives_in", "Paris", session_id=sid, valid_from=clock.now - 1000)
    assert old.valid_to == clock.now
    assert [f.object for f in await gb.memory.facts_about("Ada", session_id=sid)] == ["Berlin"]
    assert [f.object for f in await gb.memory.facts_about("Ada", session_id=sid, valid_at=clock.now - 500)] == ["Paris"]


async def test_entity_resolution_merges_aliases_and_near_duplicates(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    ada = await gb.memory.note_entity(
        "Ada Lovelace", session_id=sid, entity_type="person", aliases=["Countess of Lovelace"]
    )
    assert ada.aliases == ("Countess of Lovelace",)
    assert (await gb.memory.entity("countess of lovelace", session_id=sid)).entity_id == ada.entity_id
    # a misspelling is not enough with unrelated embeddings (HashEmbedder): a new node
    fact = await gb.memory.relate(
        "Ada Lovelace", "wrote", "Notes on the Analytical Engine", session_id=sid, subject_type="person"
    )
    assert fact.subject_id == ada.entity_id
    # every word of one known name: that node ("Ada" of "Ada Lovelace") - needs the embedding to agree
    by_id = await gb.memory.entity(ada.entity_id, session_id=sid)
    assert by_id is not None and by_id.name == "Ada Lovelace"
    assert await gb.memory.entity("Grace Hopper", session_id=sid) is None


async def test_neighbors_at_depth_one_and_two_with_predicates(gb: AsyncBlackbird, clock: Clock) -> None:
    sid = await _session(gb)
    await gb.memory.relate("Ada", "works_at", "Acme", session_id=sid)
    await gb.memory.relate("Acme", "located_in", "Lisbon", session_id=sid)
    await gb.memory.relate("Ada", "friend_of", "Grace", session_id=sid)
    await gb.memory.relate("Grace", "lives_in", "Porto", session_id=sid)
    one = await gb.memory.neighbors("Ada", session_id=sid)
    assert sorted(n.entity.name for n in one) == ["Acme", "Grace"] and {n.depth for n in one} == {1}
    two = await gb.memory.neighbors("Ada", session_id=sid, depth=2)
    assert sorted((n.entity.name, n.depth) for n in two) == [("Acme", 1), ("Grace", 1), ("Lisbon", 2), ("Porto", 2)]
    lisbon = next(n for n in two if n.entity.name == "Lisbon")
    assert (lisbon.via.subject, lisbon.via.predicate) == ("Acme", "located_in")
    only_work = await gb.memory.neighbors("Ada", session_id=sid, depth=2, predicates=["works_at", "located_in"])
    assert sorted(n.entity.name for n in only_work) == ["Acme", "Lisbon"]
    # an ended fact is not a path now, but was one then
    t_before = clock.now
    clock.now += 10
    await gb.memory.relate("Ada", "works_at", "Globex", session_id=sid)
    names_now = sorted(n.entity.name for n in await gb.memory.neighbors("Ada", session_id=sid, depth=2))
    assert "Lisbon" not in names_now and "Globex" in names_now
    names_then = sorted(
        n.entity.name for n in await gb.memory.neighbors("Ada", session_id=sid, depth=2, valid_at=t_before)
    )
    assert "Lisbon" in names_then and "Globex" not in names_then


async def test_forget_entity_removes_it_and_its_facts_from_every_query(gb: AsyncBlackbird, clock: Clock) -> None:
    sid = await _session(gb)
    t0 = clock.now
    await gb.memory.relate("Ada", "works_at", "Acme", session_id=sid)
    clock.now += 5
    assert await gb.memory.forget_entity("Acme", session_id=sid) is True
    assert await gb.memory.forget_entity("Acme", session_id=sid) is False
    assert await gb.memory.entity("Acme", session_id=sid) is None
    assert await gb.memory.facts_about("Ada", session_id=sid, history=True) == []
    assert await gb.memory.facts_about("Ada", session_id=sid, as_of=t0, history=True) == []


async def test_end_fact(gb: AsyncBlackbird, clock: Clock) -> None:
    sid = await _session(gb)
    fact = await gb.memory.relate("Ada", "likes", "tea", session_id=sid)
    clock.now += 10
    assert await gb.memory.end_fact(fact.relation_id, session_id=sid) is True
    assert await gb.memory.end_fact(fact.relation_id, session_id=sid) is False
    assert await gb.memory.facts_about("Ada", session_id=sid) == []
    (ended,) = await gb.memory.facts_about("Ada", session_id=sid, history=True)
    assert ended.valid_to == clock.now


async def test_graph_events_are_in_the_log_and_the_projection_verifies(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    await gb.memory.relate("Ada", "lives_in", "Paris", session_id=sid)
    await gb.memory.relate("Ada", "lives_in", "Berlin", session_id=sid)
    kinds: list[type] = []

    def collect(seq: int, subject: str, commit: object) -> None:
        kinds.extend(type(e) for e in commit.events)  # type: ignore[attr-defined]

    await gb.journal.replay("bb.acme.memory.>", 0, collect)
    assert EntityNoted in kinds and RelationStated in kinds and RelationEnded in kinds
    report = await gb.audit.verify()
    assert report["graph"] == []


async def test_bad_input_gets_typed_errors_naming_the_field(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    cases = [
        (dict(subject="", predicate="likes", object="tea"), "subject"),
        (dict(subject="Ada", predicate="Likes Tea", object="tea"), "predicate"),
        (dict(subject="Ada", predicate="likes", object=7), "object"),
        (dict(subject="Ada", predicate="likes", object="x" * 300), "object"),
        (dict(subject="\ud800", predicate="likes", object="tea"), "subject"),
        (dict(subject="Ada", predicate="likes", object="tea", valid_from=float("nan")), "valid_from"),
        (dict(subject="Ada", predicate="likes", object="tea", valid_from=10.0, valid_to=5.0), "valid_to"),
        (dict(subject="Ada", predicate="likes", object="Ada"), "object"),
        (dict(subject="Ada", predicate="likes", object="tea", subject_type="Person!"), "subject_type"),
        (dict(subject="...", predicate="likes", object="tea"), "subject"),
    ]
    for kwargs, field in cases:
        with pytest.raises(ValidationError) as caught:
            await gb.memory.relate(session_id=sid, **kwargs)  # type: ignore[arg-type]
        assert caught.value.field == field, (kwargs, caught.value)
    with pytest.raises(ValidationError) as caught:
        await gb.memory.neighbors("Ada", session_id=sid, depth=9)
    assert caught.value.field == "depth"
    with pytest.raises(ValidationError) as caught:
        await gb.memory.facts_about("Ada", session_id=sid, as_of=float("inf"))
    assert caught.value.field == "as_of"
    with pytest.raises(SessionNotFoundError):
        await gb.memory.relate("Ada", "likes", "tea", session_id="nope")
    assert await gb.memory.facts_about("Ada", session_id=sid, history=True) == []  # nothing half-applied


async def test_tenants_and_users_are_walled(gb: AsyncBlackbird) -> None:
    alice = await _session(gb, "alice")
    bob = await _session(gb, "bob")
    other = await _session(gb, "alice", tenant="globex")
    await gb.memory.relate("Ada", "lives_in", "Paris", session_id=alice)
    assert await gb.memory.entity("Ada", session_id=bob) is None  # bob's user scope is not alice's
    assert await gb.memory.facts_about("Ada", session_id=other, tenant="globex") == []
    with pytest.raises(ScopeAccessError):
        await gb.memory.facts_about("Ada", session_id=bob, scopes=["user:alice"])
    with pytest.raises(ScopeAccessError):
        await gb.memory.forget_entity("Ada", session_id=bob, scope="user:alice")
    assert len(await gb.memory.facts_about("Ada", session_id=alice)) == 1
    # shared through the tenant scope, every user of the tenant sees it, no other tenant does
    await gb.memory.relate("Acme", "located_in", "Lisbon", session_id=alice, scope="tenant")
    assert len(await gb.memory.facts_about("Acme", session_id=bob, scopes=["tenant"])) == 1
    assert await gb.memory.facts_about("Acme", session_id=other, scopes=["tenant"], tenant="globex") == []


async def test_recall_ranks_memories_linked_to_entities_named_in_the_query(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    distractors = [f"Note number {i} about the weather and trains" for i in range(12)]
    await gb.memory.remember_many(distractors, session_id=sid)
    berlin = await gb.memory.remember("The user lives in Berlin", session_id=sid, key="lives_in")
    await gb.memory.note_entity("alice", session_id=sid, entity_type="person", aliases=["Ada"])
    await gb.memory.relate("alice", "lives_in", "Berlin", session_id=sid, subject_type="person",
                           object_type="place", source=berlin.memory_id)
    await gb.memory.relate("alice", "works_at", "Acme", session_id=sid, subject_type="person")

    (top,) = await gb.memory.recall("Tell me about Ada", session_id=sid, k=1)
    assert top.memory_id == berlin.memory_id and top.scores["graph"] == 1.0 and top.facts == ()
    without = await gb.memory.recall("Tell me about Ada", session_id=sid, k=1, weights={"graph": 0})
    assert without[0].memory_id != berlin.memory_id  # no words or vector in common: only the graph finds it

    (expanded,) = await gb.memory.recall("Tell me about Ada", session_id=sid, k=1, expand=1)
    assert sorted((f.subject, f.predicate, f.object) for f in expanded.facts) == [
        ("alice", "lives_in", "Berlin"), ("alice", "works_at", "Acme"),
    ]
    with pytest.raises(ValidationError) as caught:
        await gb.memory.recall("Ada", session_id=sid, expand=2)
    assert caught.value.field == "expand"


async def test_forget_user_erases_the_graph_from_queries_the_projection_and_the_disk(
    nats_server: NatsServer, tmp_path: Path, gb: AsyncBlackbird
) -> None:
    alice = await _session(gb, "alice")
    bob = await _session(gb, "bob")
    secret = "Zanzibarovich"
    await gb.memory.relate(secret, "lives_in", "Quixotic Heights", session_id=alice,
                           evidence=f"{secret} told me about Quixotic Heights")
    await gb.memory.relate(secret, "works_at", "Initech", session_id=alice, scope="tenant")
    await gb.memory.relate("Bob", "likes", "tea", session_id=bob, scope="tenant")

    report = await gb.memory.forget_user("alice")
    assert "tenant:acme" in report["scopes"]
    assert await gb.memory.entity(secret, session_id=bob, scopes=["tenant"]) is None
    assert [f.subject for f in await gb.memory.facts_about("Bob", session_id=bob, scopes=["tenant"])] == ["Bob"]
    graph = (await gb.projections.caught_up("graph", 0)).model.tenants["acme"]  # type: ignore[attr-defined]
    assert {r.author for r in graph.relations.values()} == {"bob"}
    assert {e.author for e in graph.entities.values()} == {"bob"}
    assert (await gb.audit.verify())["graph"] == []
    # what the log holds of alice's names no longer opens: her data key is gone
    sealed: list[bytes] = []

    def collect(seq: int, subject: str, commit: object) -> None:
        sealed.extend(e.sealed for e in commit.events if isinstance(e, EntityNoted) and e.author == "alice")  # type: ignore[attr-defined]

    await gb.journal.replay("bb.acme.memory.>", 0, collect)
    assert len(sealed) == 4
    for blob in sealed:
        assert await gb.memory._keys.decrypt("acme", "alice", blob, aad=b"user:alice") is None

    # nothing readable on disk: the JetStream store and the memory folder
    for root in (Path(nats_server.store), tmp_path / "memory"):
        for path in root.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert secret.encode() not in data and b"Quixotic" not in data, path


async def test_names_and_evidence_are_redacted_per_the_tier(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    fact = await gb.memory.relate("ada@example.com", "works_at", "Acme", session_id=sid,
                                  evidence="write to ada@example.com or call +1 415 555 0100")
    assert "ada@example.com" not in fact.subject and "555" not in (fact.evidence or "")
    (stored,) = await gb.memory.facts_about("Acme", session_id=sid)
    assert stored.subject == fact.subject and stored.evidence == fact.evidence


async def test_the_graph_is_the_same_after_a_restart_and_a_rebuild_from_the_log(
    nats_server: NatsServer, tmp_path: Path, gb: AsyncBlackbird, clock: Clock
) -> None:
    sid = await _session(gb)
    t0 = clock.now
    await gb.memory.relate("Ada", "lives_in", "Paris", session_id=sid)
    clock.now += 10
    await gb.memory.relate("Ada", "lives_in", "Berlin", session_id=sid)
    await gb.memory.relate("Berlin", "located_in", "Germany", session_id=sid)
    await gb.memory.note_entity("Ada", session_id=sid, aliases=["Countess"])

    async def answers(client: AsyncBlackbird) -> list[object]:
        return [
            [f.to_dict() for f in await client.memory.facts_about("Countess", session_id=sid, history=True)],
            [f.to_dict() for f in await client.memory.facts_about("Ada", session_id=sid, as_of=t0 + 5)],
            [n.to_dict() for n in await client.memory.neighbors("Ada", session_id=sid, depth=2)],
        ]

    before = await answers(gb)
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), clock=clock,
                              learn=False, memory_dir=str(tmp_path / "other")) as fresh:
        assert await answers(fresh) == before
        await fresh.projections.rebuild("graph")
        assert await answers(fresh) == before


def test_the_blocking_facade_has_the_graph(nats_server: NatsServer, tmp_path: Path) -> None:
    from blackbird import BlackbirdSDK

    with BlackbirdSDK(nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), learn=False,
                      memory_dir=str(tmp_path / "memory")) as sdk:
        sid = sdk.session_manager.create_session("alice", tier="pro").session_id
        sdk.memory.relate("Ada", "works_at", "Acme", session_id=sid)
        assert [n.entity.name for n in sdk.memory.neighbors("Ada", session_id=sid)] == ["Acme"]
        assert sdk.memory.entity("ada", session_id=sid).name == "Ada"  # type: ignore[union-attr]
        assert sdk.memory.forget_entity("Acme", session_id=sid) is True


async def test_relate_under_load_through_a_kill_9_of_the_server_loses_and_doubles_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """Workers state facts in a loop, each call retried with its command id until acknowledged;
    the server is killed with SIGKILL mid-load and started again. Every acknowledged fact is in
    the graph once, and the graph equals a rebuild from the log."""
    import anyio

    from blackbird import BlackbirdError

    acked: dict[str, list[str]] = {f"W{i}": [] for i in range(4)}
    killed = anyio.Event()

    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), learn=False,
                              command_timeout=2.0, memory_dir=str(tmp_path / "memory")) as bb:
        sid = await _session(bb)

        async def work(worker: str) -> None:
            for k in range(30):
                place = f"{worker} place {k}"
                with anyio.fail_after(60):
                    while True:
                        try:
                            await bb.memory.relate(worker, "visited", place, session_id=sid,
                                                   command_id=f"{worker}-{k}")
                            break
                        except BlackbirdError:
                            await anyio.sleep(0.05)  # a pause between retries, not a synchronisation
                acked[worker].append(place)
                if k == 10 and worker == "W0":
                    killed.set()

        async def strike() -> None:
            await killed.wait()
            nats_server.kill()
            await anyio.to_thread.run_sync(nats_server.start)

        async with anyio.create_task_group() as tg:
            tg.start_soon(strike)
            for worker in acked:
                tg.start_soon(work, worker)

        for worker, places in acked.items():
            facts = await bb.memory.facts_about(worker, session_id=sid, history=True)
            assert sorted(f.object for f in facts) == sorted(places), worker
        assert (await bb.audit.verify())["graph"] == []


async def test_a_scope_too_large_for_one_message_is_snapshotted_as_an_object(
    nats_server: NatsServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A memory scope's state (its memories and graph) outgrows a KV value (one message); the
    snapshot then goes to an object store and activation reads it from there."""
    from actors.ports import AggregateKey
    from blackbird import journal as journal_module

    monkeypatch.setattr(journal_module, "_INLINE_SNAPSHOT", 2048)  # a few facts' worth, not 10,000
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), learn=False,
                              snapshot_every=10_000, memory_dir=str(tmp_path / "memory")) as bb:
        sid = await _session(bb)
        for i in range(12):
            await bb.memory.relate("Ada", "visited", f"City {i}", session_id=sid)
        # written here and awaited: a snapshot taken every N commits is saved in the background,
        # and reading the bucket right after the last command raced it (an older, inline one)
        await bb.memory._host.snapshot_all()
        key = AggregateKey("acme", "memory", "user:alice")
        kv = bb.journal._snapshots()
        raw = (await kv(bb.journal.jetstream).get(bb.journal._kv_key(key))).value
        assert raw[:1] == b"\xc1"  # a pointer to the object
        snapshot = await bb.journal.load(key)
        assert snapshot is not None and len(snapshot) > 2048
        before = await bb.memory.facts_about("Ada", session_id=sid)
        bb.memory._host.passivate_idle(0)  # the next command activates the scope from the large snapshot
        assert key not in bb.memory._host._actors
        more = await bb.memory.relate("Ada", "visited", "City 0", session_id=sid)  # known: nothing new
        assert more.relation_id == before[0].relation_id
        assert await bb.memory.facts_about("Ada", session_id=sid) == before
        await bb.journal.purge_snapshots()
        assert await bb.journal.load(key) is None


async def test_a_fact_between_two_names_of_one_entity_is_refused_and_charges_nothing(gb: AsyncBlackbird) -> None:
    sid = await _session(gb)
    await gb.memory.note_entity("Ada Lovelace", session_id=sid, entity_type="person", aliases=["Countess"])
    before = await gb.session_manager.get_quota(sid, "storage")
    with pytest.raises(ValidationError) as caught:
        await gb.memory.relate("Ada Lovelace", "knows", "countess", session_id=sid)
    assert caught.value.field == "object"
    assert await gb.session_manager.get_quota(sid, "storage") == before
