"""Memory on a real nats-server and real LanceDB with the real local embedder: retrieval
quality, scopes and tenant walls, erasure (crypto-shredding, proven on the raw bytes), TTL and
retention, dedup, supersede and as_of, eviction, storage quota, rebuild, bad input."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import nats
import numpy as np
import pytest

from actors.events import CacheRemoved, MemoryForgotten, MemoryRemembered
from blackbird import (
    AsyncBlackbird,
    BlackbirdSDK,
    MemoryIndexBusyError,
    QuotaExceededError,
    SessionNotFoundError,
    ValidationError,
)
from blackbird.errors import PayloadTooLargeError
from blackbird.memory.index import MemoryIndex
from blackbird.memory.service import EmbeddingModelMismatchError, ScopeAccessError

from .clock import Clock
from .conftest import NatsServer

pytestmark = pytest.mark.anyio

# (fact, a paraphrased question that should find it)
FACTS = [
    ("My daughter Emma was born on March 3rd, 2015.", "When is Emma's birthday?"),
    ("I am allergic to peanuts and shellfish.", "What foods make me sick?"),
    (
        "Our office is on the fourth floor of the Harbor building in Lisbon.",
        "Where is the company's workplace located?",
    ),
    ("The production database runs PostgreSQL 16 on two replicas.", "Which database engine do we use in prod?"),
    ("I prefer my coffee black with no sugar.", "How do I take my coffee?"),
    ("Our quarterly revenue target is 4.2 million euros.", "What is the sales goal for this quarter?"),
    ("The project deadline was moved to the end of November.", "When is the project due now?"),
    ("My manager is called Priya Raman.", "Who is my boss?"),
    ("I drive a blue 2019 Toyota Corolla.", "What car do I own?"),
    ("The API rate limit for partners is 600 requests per minute.", "How many calls per minute can partners make?"),
    ("We deploy to production every Tuesday and Thursday.", "On which days do releases go out?"),
    ("I am learning to play the cello.", "Which instrument am I practicing?"),
    ("The team standup happens at 9:30 every morning.", "What time is the daily meeting?"),
    ("My favourite book is One Hundred Years of Solitude.", "Which novel do I like most?"),
    ("Customer support tickets must be answered within 4 hours.", "What is the response time requirement for support?"),
    ("I run 10 kilometres every Sunday.", "What exercise do I do on weekends?"),
    ("The staging environment is hosted in the Frankfurt region.", "Where is the test environment deployed?"),
    ("Our main competitor is a startup called Nimbus Analytics.", "Which company are we competing against?"),
    ("I speak Portuguese, English and some Japanese.", "What languages do I know?"),
    ("The VPN password rotates every 90 days.", "How often do we change the VPN credentials?"),
    ("My flight to Tokyo leaves on December 12th.", "When do I travel to Japan?"),
    ("The cat's name is Mochi and she is three years old.", "What is my pet called?"),
    ("Invoices are sent on the first business day of each month.", "When do we bill customers?"),
    ("I work remotely on Mondays and Fridays.", "Which days am I working from home?"),
    ("The search service uses Elasticsearch 8 with 12 shards.", "What technology powers search?"),
    ("I am vegetarian and avoid all meat.", "Do I eat meat?"),
    ("Our budget for cloud infrastructure is 30,000 dollars a month.", "How much can we spend on hosting?"),
    ("The design review is scheduled for Wednesday afternoon.", "When is the design meeting?"),
    ("My blood type is O negative.", "What blood group am I?"),
    ("We use GitHub Actions for continuous integration.", "Which CI system runs our builds?"),
    ("The company was founded in 2011 in Porto.", "When and where did the company start?"),
    ("I want to visit Patagonia next year.", "Where am I planning to travel?"),
    ("Passwords must have at least 14 characters.", "What is the minimum password length?"),
    ("My dentist appointment is on Friday at 3 pm.", "When do I see the dentist?"),
    ("The mobile app supports iOS 16 and newer.", "Which iPhone versions does the app run on?"),
    ("I like to read science fiction before bed.", "What do I read at night?"),
    ("Our biggest customer is the retailer Lumen Stores.", "Which client brings the most business?"),
    ("The office wifi network is called Harbor-Guest.", "What's the name of the wireless network at work?"),
    ("My son plays football on Saturday mornings.", "What does my boy do on Saturdays?"),
    ("Backups are kept for 35 days in cold storage.", "How long do we retain backups?"),
    ("I am training for the Berlin marathon in September.", "Which race am I preparing for?"),
    ("The legal team requires two approvals for any contract.", "How many sign-offs does a contract need?"),
]


async def test_the_right_memory_is_in_the_top_three_for_paraphrased_questions(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1", tier="enterprise")
    written = await bb.memory.remember_many([fact for fact, _ in FACTS], session_id=s.session_id)
    ids = [m.memory_id for m in written]
    assert len(set(ids)) == len(FACTS)  # none was taken for a near-duplicate of another
    hits = 0
    for (_fact, question), memory_id in zip(FACTS, ids, strict=True):
        found = await bb.memory.recall(question, session_id=s.session_id, k=3)
        hits += memory_id in [m.memory_id for m in found]
    assert hits / len(FACTS) >= 0.9, f"{hits}/{len(FACTS)} in the top 3"
    top = (await bb.memory.recall("Who is my boss?", session_id=s.session_id, k=1))[0]
    assert top.text == FACTS[7][0]
    assert set(top.scores) == {"similarity", "keyword", "recency", "importance", "graph"}
    assert top.sequence > 0 and top.score is not None


async def test_scopes_are_checked_and_tenants_are_walls(bb: AsyncBlackbird) -> None:
    sm, memory = bb.session_manager, bb.memory
    a1 = await sm.create_session("u1", tier="pro", tenant="acme")
    a2 = await sm.create_session("u2", tier="pro", tenant="acme")
    g1 = await sm.create_session("u1", tier="pro", tenant="globex")  # same user id, other tenant
    await memory.remember("The launch code word is pineapple.", session_id=a1.session_id, tenant="acme")
    await memory.remember("Team lunch is on Friday.", session_id=a1.session_id, scope="tenant", tenant="acme")
    await memory.add_members("group:research", ["u1"], tenant="acme")
    await memory.remember(
        "The research budget is secret.", session_id=a1.session_id, scope="group:research", tenant="acme"
    )
    mine = await memory.recall("code word", session_id=a1.session_id, scopes=["user"], tenant="acme")
    assert [m.text for m in mine][:1] == ["The launch code word is pineapple."]
    # another user of the tenant: not the user scope, yes the tenant scope
    theirs = await memory.recall("code word", session_id=a2.session_id, scopes=["user", "tenant"], tenant="acme")
    assert all(m.scope != "user" for m in theirs)
    assert "Team lunch is on Friday." in [m.text for m in theirs]
    with pytest.raises(ScopeAccessError):
        await memory.recall("budget", session_id=a2.session_id, scopes=["group:research"], tenant="acme")
    with pytest.raises(ScopeAccessError):
        await memory.recall("anything", session_id=a2.session_id, scopes=["user:u1"], tenant="acme")
    assert (await memory.recall("budget", session_id=a1.session_id, scopes=["group:research"], tenant="acme"))
    # the same user id in another tenant sees nothing of acme's
    other = await memory.recall(
        "code word pineapple", session_id=g1.session_id, scopes=["user", "tenant"], tenant="globex"
    )
    assert other == []
    with pytest.raises(SessionNotFoundError):  # a session of acme is unknown to globex
        await memory.recall("code word", session_id=a1.session_id, tenant="globex")


async def test_forget_user_removes_memories_and_makes_the_log_unreadable(
    bb: AsyncBlackbird, nats_server: NatsServer
) -> None:
    sm, memory = bb.session_manager, bb.memory
    s = await sm.create_session("leaver", tier="pro")
    secret = "Zebra-Quartz-7731 is the name of my private diary"
    await memory.remember(secret, session_id=s.session_id)
    await memory.set("note", {"diary": "Zebra-Quartz-7731"}, session_id=s.session_id)
    other = await sm.create_session("stayer", tier="pro")
    await memory.remember("The stayer likes tea.", session_id=other.session_id, scope="tenant")
    assert (await memory.recall("private diary", session_id=s.session_id))[0].text == secret

    async def raw_stream_bytes() -> bytes:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        last = (await js.stream_info("BLACKBIRD")).state.last_seq
        blob = b"".join([(await js.get_msg("BLACKBIRD", seq)).data or b"" for seq in range(1, last + 1)])
        await nc.close()
        return blob

    assert b"Zebra-Quartz" not in await raw_stream_bytes()  # sealed from the start

    def disk() -> bytes:
        return b"".join(p.read_bytes() for p in Path(bb.memory.index.path).rglob("*") if p.is_file())

    assert b"Zebra-Quartz" in disk()  # the index holds the text before (the scan below can fail)
    result = await memory.forget_user("leaver")
    assert result["removed"] >= 2
    assert await memory.recall("private diary", session_id=s.session_id) == []
    assert await memory.get("note", session_id=s.session_id) is None
    tea = await memory.recall("tea", session_id=other.session_id, scopes=["tenant"])
    assert [m.text for m in tea] == ["The stayer likes tea."]
    # the log still holds the sealed bytes, but their key is gone: nothing can open them
    raw = await raw_stream_bytes()
    assert b"Zebra-Quartz" not in raw
    assert await bb.memory._keys.forgotten("acme", "leaver")
    # and the LanceDB files no longer hold the text either (old versions removed); the store
    # folder, every bucket and a second host's index: tests/test_negative_controls.py
    assert b"Zebra-Quartz" not in disk()


async def test_ttl_and_retention_expire_as_events(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        # notes are kept for an hour on this tenant's free tier (retention per memory kind)
        await bb.session_manager.set_tenant_policy(
            {"tiers": {"free": {"idle_timeout": 86400, "memory": {"retention": {"note": 3600, "default": 86400}}}}}
        )
        s = await bb.session_manager.create_session("u1", tier="free")
        await bb.memory.set("token", "abc", ttl=60, session_id=s.session_id)
        assert await bb.memory.get("token", session_id=s.session_id) == "abc"
        await bb.memory.remember("Temporary plan: meet at noon.", session_id=s.session_id, kind="note")
        await bb.memory.remember("Lasting plan: lunch on Fridays.", session_id=s.session_id, kind="fact")
        clock.now += 61
        assert await bb.memory.get("token", session_id=s.session_id) is None
        assert await bb.memory.get("token", session_id=s.session_id, default="gone") == "gone"
        clock.now += 3600
        await bb.memory.remember("A fresh fact an hour later.", session_id=s.session_id)
        found = [m.text for m in await bb.memory.recall("plan", session_id=s.session_id, k=5)]
        assert "Temporary plan: meet at noon." not in found
        assert "Lasting plan: lunch on Fridays." in found
        events = [e async for e in bb.journal.entries("bb.acme.memory.>")]
        reasons = sorted(e.reason for entry in events for e in entry.commit.events
                         if isinstance(e, (MemoryForgotten, CacheRemoved)))
        assert reasons == ["expired", "expired"]


async def test_near_duplicates_update_and_keys_supersede_with_as_of(nats_server: NatsServer) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        s = await bb.session_manager.create_session("u1", tier="pro")
        first = await bb.memory.remember("My favourite colour is green.", session_id=s.session_id)
        again = await bb.memory.remember("My favourite colour is green!", session_id=s.session_id)
        assert again.updated and again.memory_id == first.memory_id
        clock.now += 10
        old = await bb.memory.remember("I live in Lisbon.", session_id=s.session_id, key="home")
        t_between = clock.now + 5
        clock.now += 10
        new = await bb.memory.remember("I moved to Porto.", session_id=s.session_id, key="home")
        assert new.superseded == old.memory_id
        now_found = await bb.memory.recall("Where do I live?", session_id=s.session_id, k=5)
        assert "I moved to Porto." in [m.text for m in now_found]
        assert "I live in Lisbon." not in [m.text for m in now_found]
        then = await bb.memory.recall("Where do I live?", session_id=s.session_id, k=5, as_of=t_between)
        assert "I live in Lisbon." in [m.text for m in then]
        assert "I moved to Porto." not in [m.text for m in then]
        past = next(m for m in then if m.text == "I live in Lisbon.")
        assert past.valid_to is not None


async def test_recall_as_of_answers_from_memory_exactly_what_the_table_held_valid_then(
    nats_server: NatsServer,
) -> None:
    """A scripted history (keys superseded twice, a memory forgotten, a user erased) recalled
    as of every step: the rows in memory valid then are the table's rows valid then (what the
    earlier LanceDB path searched), and the vector side ranks them as LanceDB's prefiltered
    cosine search does."""
    from blackbird.memory.index import quote
    from blackbird.memory.service import _Candidates

    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        sm, memory = bb.session_manager, bb.memory
        s = await sm.create_session("u1", tier="pro")
        leaver = await sm.create_session("u2", tier="pro")
        instants: list[float] = []

        async def step(text: str, session: Any = s, **kw: Any) -> str:
            clock.now += 10
            written = await memory.remember(text, session_id=session.session_id, **kw)
            instants.append(clock.now + 5)
            return written.memory_id

        await step("I live in Lisbon.", key="home")
        await step("My favourite tea is jasmine.", key="tea")
        await step("The team meets on Mondays.", scope="tenant")
        await step("I moved to Porto.", key="home")
        forgotten = await step("My locker code is 4471.")
        await step("The leaver prefers green tea at meetings.", session=leaver, scope="tenant")
        await step("I moved again, to Braga.", key="home")
        await step("My favourite tea is rooibos now.", key="tea")
        clock.now += 10
        assert await memory.forget(forgotten, session_id=s.session_id)
        instants.append(clock.now + 5)
        await memory.forget_user("u2")
        instants.append(clock.now + 6)
        await step("The team meets on Tuesdays now.", scope="tenant")

        sids = sorted(["user:u1", f"session:{s.session_id}", "tenant:acme"])
        model = memory.embedder.model_id
        table = memory.index.table("acme", model)
        query = "Where do I live and which tea and when does the team meet?"
        vector = memory.embedder.embed([query])[0]
        for at in [instants[0] - 10, *instants]:
            where = (f"scope_id IN ({', '.join(quote(x) for x in sids)}) "
                     f"AND valid_from <= {at!r} AND valid_to > {at!r}")
            held = {r["memory_id"]: r for r in table.search().where(where, prefilter=True).limit(None).to_list()}
            found = await memory.recall(query, session_id=s.session_id, scopes=["session", "user", "tenant"],
                                        k=50, as_of=at)
            assert {m.memory_id for m in found} == set(held), at
            for m in found:  # the row as it was then (valid_to of a superseded one included)
                assert (m.text, m.valid_from, m.valid_to) == (
                    held[m.memory_id]["text"], held[m.memory_id]["valid_from"],
                    None if held[m.memory_id]["valid_to"] == float("inf") else held[m.memory_id]["valid_to"])
            past = _Candidates(memory.index, "acme", model, sids, at, past=True)
            by_text = await past.by_text(query, 20)
            assert {r["memory_id"] for r in by_text} <= set(held)
            ours = [r["memory_id"] for r in await past.by_vector(vector, 20)]
            theirs = [r["memory_id"] for r in table.search(vector).metric("cosine").where(
                where, prefilter=True).limit(20).to_list()]
            assert ours == theirs, at
        assert forgotten not in {m.memory_id for m in await memory.recall(
            "locker code", session_id=s.session_id, k=50, as_of=instants[4])}
        texts = {m.text for m in await memory.recall(
            "tea", session_id=s.session_id, scopes=["tenant"], k=50, as_of=instants[5])}
        assert "The leaver prefers green tea at meetings." not in texts  # erased: from every instant


async def test_an_erased_users_superseded_memories_leave_the_table_and_every_instant(
    nats_server: NatsServer,
) -> None:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        s = await bb.session_manager.create_session("leaver", tier="pro")
        stays = await bb.session_manager.create_session("stayer", tier="pro")
        await bb.memory.remember("Quokka-Old-Home is in Lisbon.", session_id=s.session_id, key="home")
        await bb.memory.remember("The stayer used to drink Quokka-tea.", session_id=stays.session_id, key="tea")
        then = clock.now + 5
        clock.now += 10
        await bb.memory.remember("Now I live in Porto.", session_id=s.session_id, key="home")
        await bb.memory.remember("The stayer drinks coffee now.", session_id=stays.session_id, key="tea")
        found = await bb.memory.recall("Quokka", session_id=s.session_id, k=5, as_of=then)
        assert [m.text for m in found][:1] == ["Quokka-Old-Home is in Lisbon."]  # in memory before
        await bb.memory.forget_user("leaver")
        table = bb.memory.index.table("acme", bb.memory.embedder.model_id)
        assert [r["text"] for r in table.to_arrow().to_pylist() if r["author"] == "leaver"] == []
        back = await bb.session_manager.create_session("leaver", tier="pro")
        assert await bb.memory.recall("Quokka", session_id=back.session_id, k=5, as_of=then) == []
        kept = await bb.memory.recall("Quokka", session_id=stays.session_id, k=5, as_of=then)
        assert "The stayer used to drink Quokka-tea." in [m.text for m in kept]  # others' history stays


async def test_an_erased_user_with_nothing_current_left_still_leaves_no_superseded_row(
    nats_server: NatsServer,
) -> None:
    """All of the user's memories superseded and the last one forgotten: no memory of theirs is
    current, so only the erasure's AuthorErased event names them to the index."""
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        s = await bb.session_manager.create_session("leaver", tier="pro")
        await bb.memory.remember("Wombat-Old-Home is in Lisbon.", session_id=s.session_id, key="home")
        then = clock.now + 5
        clock.now += 10
        newer = await bb.memory.remember("Now I live in Porto.", session_id=s.session_id, key="home")
        assert await bb.memory.forget(newer.memory_id, session_id=s.session_id) is True
        assert [m.text for m in await bb.memory.recall("Wombat", session_id=s.session_id, as_of=then)][:1] == [
            "Wombat-Old-Home is in Lisbon."
        ]
        await bb.memory.forget_user("leaver")
        table = bb.memory.index.table("acme", bb.memory.embedder.model_id)
        assert [r["text"] for r in table.to_arrow().to_pylist() if r["author"] == "leaver"] == []
        back = await bb.session_manager.create_session("leaver", tier="pro")
        assert await bb.memory.recall("Wombat", session_id=back.session_id, k=5, as_of=then) == []


async def test_full_text_side_finds_a_rare_token_and_never_a_superseded_row(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1", tier="enterprise")
    await bb.memory.remember_many([fact for fact, _ in FACTS], session_id=s.session_id)
    ticket = await bb.memory.remember("Ticket ZQ-88412 waits for legal review.", session_id=s.session_id, key="ticket")
    top = (await bb.memory.recall("ZQ-88412", session_id=s.session_id, k=1))[0]
    assert top.memory_id == ticket.memory_id
    # fused keyword part: 0.5 is one list's first place; above it, the full-text search found it too
    assert top.scores["keyword"] > 0.5
    await bb.memory.remember("The ticket about the contract is closed.", session_id=s.session_id, key="ticket")
    found = await bb.memory.recall("ZQ-88412 legal review", session_id=s.session_id, k=50)
    assert ticket.memory_id not in [m.memory_id for m in found]
    assert all(m.valid_to is None for m in found)


async def test_redaction_as_the_tier_says_comes_before_embedding_and_storage(bb: AsyncBlackbird) -> None:
    text = "Write to ana.silva@example.com or call +1 415 555 0100 about the refund."
    question = "How do I reach someone about the refund?"

    def similarity(stored: str) -> float:
        vectors = bb.memory.embedder.embed([stored, question])
        return float(vectors[0] @ vectors[1])

    s = await bb.session_manager.create_session("u1", tier="pro", tenant="acme")
    kept = await bb.memory.remember(text, session_id=s.session_id, tenant="acme")
    assert kept.text == "Write to [email] or call [phone] about the refund."
    (found,) = await bb.memory.recall(question, session_id=s.session_id, k=1, tenant="acme")
    assert found.text == kept.text
    # the vector stored is the redacted text's, not the original's
    assert found.scores["similarity"] == pytest.approx(similarity(kept.text), abs=1e-4)
    assert abs(similarity(text) - similarity(kept.text)) > 1e-3

    # another tenant's pro tier redacts nothing: the text is kept, and embedded, as written
    await bb.session_manager.set_tenant_policy({"tiers": {"pro": {"memory": {"redact": []}}}}, tenant="globex")
    g = await bb.session_manager.create_session("u1", tier="pro", tenant="globex")
    verbatim = await bb.memory.remember(text, session_id=g.session_id, tenant="globex")
    assert verbatim.text == text
    (found,) = await bb.memory.recall(question, session_id=g.session_id, k=1, tenant="globex")
    assert found.scores["similarity"] == pytest.approx(similarity(text), abs=1e-4)


async def test_cache_evicts_by_retention_score_not_recency(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.set_tenant_policy({"tiers": {"free": {"memory": {"cache_entries": 3}}}})
    s = await sm.create_session("u1", tier="free")
    await bb.memory.set("important", 1, session_id=s.session_id, importance=0.9)
    await bb.memory.set("popular", 2, session_id=s.session_id, importance=0.1)
    await bb.memory.set("trivial", 3, session_id=s.session_id, importance=0.1)
    for _ in range(5):
        await bb.memory.get("popular", session_id=s.session_id)
    await bb.memory.set("important", 1, session_id=s.session_id, importance=0.9)  # the most recent
    await bb.memory.set("newcomer", 4, session_id=s.session_id)
    assert await bb.memory.get("trivial", session_id=s.session_id) is None  # lowest score went
    assert [await bb.memory.get(k, session_id=s.session_id) for k in ("important", "popular", "newcomer")] == [1, 2, 4]
    events = [e async for e in bb.journal.entries("bb.acme.memory.>")]
    evicted = [
        e for entry in events for e in entry.commit.events if isinstance(e, CacheRemoved) and e.reason == "evicted"
    ]
    assert [e.key for e in evicted] == ["trivial"] and evicted[0].score is not None


async def test_memory_bytes_count_against_the_storage_quota(bb: AsyncBlackbird) -> None:
    sm = bb.session_manager
    await sm.set_tenant_policy({"tiers": {"free": {"quotas": {"storage": {"limit": 100}}}}})
    s = await sm.create_session("u1", tier="free")
    await bb.memory.remember("x" * 60, session_id=s.session_id, vector=[1.0] + [0.0] * 383)
    assert (await sm.get_quota(s.session_id, "storage"))["used"] == 60
    before = await bb.journal.stream_last_seq()
    with pytest.raises(QuotaExceededError):
        await bb.memory.remember("y" * 60, session_id=s.session_id, vector=[0.0, 1.0] + [0.0] * 382)
    memory_commits = [e async for e in bb.journal.entries("bb.acme.memory.>", before)]
    assert memory_commits == []  # refused before anything was written


async def test_rebuilding_the_index_from_the_log_equals_the_live_tables(bb: AsyncBlackbird, tmp_path: Path) -> None:
    s = await bb.session_manager.create_session("u1", tier="pro")
    await bb.memory.remember_many([f for f, _ in FACTS[:10]], session_id=s.session_id)
    await bb.memory.remember("I live in Lisbon.", session_id=s.session_id, key="home")
    await bb.memory.remember("I moved to Porto.", session_id=s.session_id, key="home")
    gone = await bb.memory.remember("To be deleted.", session_id=s.session_id)
    await bb.memory.forget(gone.memory_id, session_id=s.session_id)
    await bb.memory.recall("anything", session_id=s.session_id)  # caught up
    scratch = MemoryIndex(tmp_path / "scratch", bb.journal, bb.memory._keys)
    await scratch.rebuild()
    assert scratch.rows("acme") == bb.memory.index.rows("acme")
    assert len(scratch.rows("acme")) == 12  # 10 facts + 2 homes (one superseded), not the deleted


async def test_bad_memory_input_gets_typed_errors_and_appends_nothing(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1", tier="pro")
    before = await bb.journal.stream_last_seq()
    memory = bb.memory
    cases: list[tuple[Any, str]] = [
        (memory.remember("", session_id=s.session_id), "text"),
        (memory.remember("   ", session_id=s.session_id), "text"),
        (memory.remember(42, session_id=s.session_id), "text"),  # type: ignore[arg-type]
        (memory.remember("x" * 20_000, session_id=s.session_id), "text"),
        (memory.remember("ok", session_id=s.session_id, vector=[0.1] * 10), "vector"),
        (memory.remember("ok", session_id=s.session_id, scope="planet"), "scope"),
        (memory.remember("ok", session_id=s.session_id, importance=2), "importance"),
        (memory.remember("ok", session_id=s.session_id, metadata={"x": object()}), "metadata"),
        (memory.recall("", session_id=s.session_id), "query"),
        (memory.recall("ok", session_id=s.session_id, k=0), "k"),
        (memory.recall("ok", session_id=s.session_id, scopes=["nowhere"]), "scope"),
        (memory.recall("ok", session_id=s.session_id, filters={"colour": "red"}), "filters"),
        (memory.set("k", object(), session_id=s.session_id), "value"),
        (memory.set("", 1, session_id=s.session_id), "key"),
        (memory.add_members("user:u1", ["u2"]), "scope"),
    ]
    for call, field in cases:
        with pytest.raises(ValidationError) as err:
            await call
        assert err.value.field == field, (field, err.value)
    with pytest.raises(PayloadTooLargeError):
        await memory.remember("x" * 20_000, session_id=s.session_id)
    assert await bb.journal.stream_last_seq() == before


async def test_searching_across_embedding_models_is_refused(
    bb: AsyncBlackbird, nats_server: NatsServer, tmp_path: Path
) -> None:
    s = await bb.session_manager.create_session("u1", tier="pro")
    await bb.memory.remember("Plain fact.", session_id=s.session_id)

    class Other:
        model_id = "other/model"
        dimension = 384

        def embed(self, texts: Any) -> Any:
            import numpy as np

            return np.ones((len(texts), 384), dtype=np.float32) / np.sqrt(384)

    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", embedder=Other(),
                              memory_dir=str(tmp_path / "other-index")) as other:
        with pytest.raises(EmbeddingModelMismatchError):
            await other.memory.recall("fact", session_id=s.session_id)
        await other.memory.rebuild_index(reembed=True)  # re-embedding = replaying into new tables
        assert [m.text for m in await other.memory.recall("fact", session_id=s.session_id)] == ["Plain fact."]


def test_memory_works_through_the_sync_facade() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        s = sdk.session_manager.create_session("u1", tier="pro")
        sdk.memory.remember("The wifi password is on the fridge.", session_id=s.session_id,
                            metadata={"room": "kitchen"})
        sdk.memory.set("theme", "dark", session_id=s.session_id)
        found = sdk.memory.recall("Where can I find the wifi password?", session_id=s.session_id,
                                  filters={"metadata.room": "kitchen"})
        assert found[0].metadata == {"room": "kitchen"}
        assert sdk.memory.get("theme", session_id=s.session_id) == "dark"
        assert sdk.memory.delete("theme", session_id=s.session_id) is True
        assert msgspec.to_builtins(found[0])["text"] == "The wifi password is on the fridge."
        assert sdk.memory.embedder.model_id == "sentence-transformers/all-MiniLM-L6-v2"


async def test_many_writes_queued_on_one_scope_are_split_across_commits_that_fit(bb: AsyncBlackbird) -> None:
    """256 memories written at once to one scope queue up on its actor; together they exceed
    the log's message size, so the actor splits the batch instead of failing all of them."""
    import numpy as np

    s = await bb.session_manager.create_session("u1", tier="enterprise")
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(256, 384)).astype(np.float32)
    texts = [f"generated memory number {i} about topic {i % 17}" for i in range(256)]
    written = await bb.memory.remember_many(texts, session_id=s.session_id, vectors=vectors, dedupe=False)
    assert len({m.memory_id for m in written}) == 256
    commits = [e async for e in bb.journal.entries("bb.acme.memory.user:u1")]
    assert len(commits) > 1  # more than one message...
    assert sum(len(e.commit.commands) for e in commits) == 256  # ...holding every write once
    assert all(len(msgspec.json.encode(e.commit)) <= bb.settings.max_payload for e in commits)


async def test_a_near_duplicate_of_an_earlier_process_is_found_in_the_index(tmp_path: Path) -> None:
    async with AsyncBlackbird(data_dir=tmp_path / "d", tenant="acme") as bb:
        s = await bb.session_manager.create_session("u1", tier="pro")
        first = await bb.memory.remember("The garage door code is 4711.", session_id=s.session_id)
        await bb.memory.recall("garage", session_id=s.session_id)  # the index holds it
    async with AsyncBlackbird(data_dir=tmp_path / "d", tenant="acme") as bb:  # a new process
        again = await bb.memory.remember("The garage door code is 4711!", session_id=s.session_id)
        assert again.updated and again.memory_id == first.memory_id
        other = await bb.memory.remember("The garden gate has no lock.", session_id=s.session_id)
        assert not other.updated


async def test_one_writer_per_index_folder_and_clients_sharing_a_data_dir_still_see_everything(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    data = tmp_path / "d"
    async with (
        AsyncBlackbird(data_dir=data, tenant="acme") as first,
        AsyncBlackbird(data_dir=data, tenant="acme") as second,
    ):
        s = await first.session_manager.create_session("u1", tier="pro")
        written = await first.memory.remember("The boat is moored at pier 9.", session_id=s.session_id)
        # the folder is taken: the second client builds its own index from the log
        found = await second.memory.recall("Where is the boat?", session_id=s.session_id, k=1)
        assert [m.memory_id for m in found] == [written.memory_id]
        assert first.memory.index.path == data / "memory"
        assert second.memory.index.path != data / "memory"
        await first.memory.recall("boat", session_id=s.session_id)
        assert [r["memory_id"] for r in first.memory.index.rows("acme")] == [written.memory_id]
    # a folder named explicitly is never silently replaced
    shared = str(tmp_path / "m")
    async with (
        AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=shared) as a,
        AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=shared) as b,
    ):
        s = await a.session_manager.create_session("u2", tier="pro")
        await a.memory.remember("The spare key is under the mat.", session_id=s.session_id)
        with pytest.raises(MemoryIndexBusyError) as info:
            await b.memory.recall("key", session_id=s.session_id)
        assert info.value.fields["path"] == shared


async def test_events_applied_again_after_a_lost_checkpoint_are_not_duplicated(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    folder = tmp_path / "m"
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(folder)) as bb:
        s = await bb.session_manager.create_session("u1", tier="pro")
        for text in ("The tent is in the attic.", "The kayak is at the lake house.", "Skis go in the shed."):
            await bb.memory.remember(text, session_id=s.session_id)
        await bb.memory.recall("tent", session_id=s.session_id)  # the index holds all three
        before = bb.memory.index.rows("acme")
    assert len(before) == 3
    # as if the process died after writing the tables but before saving its checkpoint
    (folder / "checkpoint.json").write_text('{"seq": 0}')
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(folder)) as bb:
        await bb.memory.recall("tent", session_id=s.session_id)
        assert bb.memory.index.rows("acme") == before


async def test_scopes_beyond_the_row_budget_leave_memory_and_come_back_from_the_table(
    nats_server: NatsServer,
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_cache_rows=4) as bb:
        a = await bb.session_manager.create_session("ua", tier="pro")
        b = await bb.session_manager.create_session("ub", tier="pro")
        for i, fact in enumerate(["The red bike is Anna's.", "Anna swims on Tuesdays.", "Anna's cat is Miso."]):
            await bb.memory.remember(fact, session_id=a.session_id, importance=0.1 * i)
        for fact in ["Ben plays the cello.", "Ben lives in Ghent.", "Ben's dog is Pip."]:
            await bb.memory.remember(fact, session_id=b.session_id)
        annas = await bb.memory.recall("Anna's pet", session_id=a.session_id, scopes=["user"], k=1)
        assert [m.text for m in annas] == ["Anna's cat is Miso."]
        bens = await bb.memory.recall("Ben's pet", session_id=b.session_id, scopes=["user"], k=1)
        assert [m.text for m in bens] == ["Ben's dog is Pip."]
        cached = [scope for _, scope in bb.memory.index._current]
        assert "user:ub" in cached and "user:ua" not in cached  # 3 + 3 rows > 4: Anna's went
        # a write while it is out of memory is found when it comes back
        await bb.memory.remember("Anna's second cat is Tofu.", session_id=a.session_id)
        found = await bb.memory.recall("Anna's cats", session_id=a.session_id, scopes=["user"], k=4)
        assert {"Anna's cat is Miso.", "Anna's second cat is Tofu."} <= {m.text for m in found}
        assert len(found) == 4


async def test_a_killed_server_keeps_every_acknowledged_memory(nats_server: NatsServer, tmp_path: Path) -> None:
    things = ["keys", "badge", "laptop", "charger", "umbrella"]
    facts = [f"Locker {i} holds the spare {thing}." for i, thing in enumerate(things)]
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "m1")) as bb:
        s = await bb.session_manager.create_session("u1", tier="pro")
        written = {(await bb.memory.remember(f, session_id=s.session_id)).memory_id: f for f in facts}
    nats_server.kill()  # SIGKILL: no graceful flush
    nats_server.start()
    # a fresh index folder: everything it holds comes from the log that survived the kill
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "m2")) as bb:
        found = await bb.memory.recall("spare", session_id=s.session_id, k=10)
        assert {m.memory_id: m.text for m in found} == written
        storage = await bb.session_manager.get_quota(s.session_id, "storage")
        assert storage["used"] == sum(len(f.encode()) for f in facts)


async def test_two_hosts_writing_one_scope_at_once_lose_and_double_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with (
        AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "a")) as first,
        AsyncBlackbird(nats_url=nats_server.url, tenant="acme", memory_dir=str(tmp_path / "b")) as second,
    ):
        s = await first.session_manager.create_session("u1", tier="enterprise")
        rng = np.random.default_rng(3)
        vectors = rng.normal(size=(60, 384)).astype(np.float32)  # far apart: no near-duplicates

        async def write(client: AsyncBlackbird, start: int) -> None:
            for i in range(start, start + 30):
                await client.memory.remember(f"note {i}", session_id=s.session_id, vector=vectors[i])

        async with anyio.create_task_group() as tg:  # both hosts race on the scope's aggregate
            tg.start_soon(write, first, 0)
            tg.start_soon(write, second, 30)
        last = await first.journal.stream_last_seq()
        for client in (first, second):
            # a client reads its own writes at once, the other's once its index has them
            assert await client.memory.index.wait_for(last, timeout=10)
            found = await client.memory.recall("note", session_id=s.session_id, scopes=["user"], k=100)
            assert sorted(m.text for m in found) == sorted(f"note {i}" for i in range(60))
        commits = [e async for e in first.journal.entries("bb.acme.memory.user:u1")]
        remembered = [
            ev for e in commits for a in e.commit.commands for ev in a.events if isinstance(ev, MemoryRemembered)
        ]
        assert len(remembered) == 60  # each write appended once, none lost to a conflict
