"""Relation extraction for the knowledge graph: the rule-based extractor's relations, the
OpenAI-compatible extractor's against a fake LLM API (a real local HTTP server answering as a
model would: the one thing faked), and the learner writing them into the graph on a real
nats-server, after the facts it remembers."""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from blackbird import AsyncBlackbird, Relation
from blackbird.agents.learning import (
    USER,
    ExtractedFact,
    ExtractedRelation,
    GraphExtractor,
    RuleExtractor,
    normal_predicate,
)
from blackbird.agents.openai import OpenAIExtractor

from .conftest import NatsServer
from .embedders import HashEmbedder
from .test_agents_openai import KEY, FakeOpenAIServer, fake_openai_server  # noqa: F401 (its fixture)

pytestmark = pytest.mark.anyio

RULES = RuleExtractor()
PREDICATE_SHAPE = r"^[a-z][a-z0-9_]{0,63}$"


def triples(text: str) -> list[tuple[str, str, str, str, str]]:
    return [
        (r.subject, r.predicate, r.object, r.subject_type, r.object_type) for r in RULES.extract_relations_now(text)
    ]


# ------------------------------------------------------------------ the rule-based extractor


@pytest.mark.parametrize(("text", "expected"), [
    ("My name is Ada", [(USER, "named", "Ada", "person", "person")]),
    ("call me ada lovelace", [(USER, "named", "Ada Lovelace", "person", "person")]),
    ("I live in Paris", [(USER, "lives_in", "Paris", "person", "place")]),
    ("I moved to Berlin last month", [(USER, "lives_in", "Berlin", "person", "place")]),
    ("I'm from São Paulo", [(USER, "comes_from", "São Paulo", "person", "place")]),
    ("I work for Acme Corp since 2019", [(USER, "works_at", "Acme Corp", "person", "organization")]),
    ("I am a software engineer", [(USER, "works_as", "software engineer", "person", "role")]),
    ("I love black coffee", [(USER, "likes", "black coffee", "person", "thing")]),
    ("I really don't like jazz", [(USER, "dislikes", "jazz", "person", "thing")]),
    ("I hate mushrooms", [(USER, "dislikes", "mushrooms", "person", "thing")]),
    ("I prefer tea over coffee", [(USER, "prefers", "tea", "person", "thing")]),
    ("My favourite colour is blue", [(USER, "favourite_colour", "blue", "person", "thing")]),
    ("my favorite board game is Go.", [(USER, "favourite_board_game", "Go", "person", "thing")]),
    ("My wife is Eve", [(USER, "married_to", "Eve", "person", "person")]),
    ("my husband's name is Tom", [(USER, "married_to", "Tom", "person", "person")]),
    ("My partner is Sam.", [(USER, "married_to", "Sam", "person", "person")]),
    ("My manager is Priya Raman", [(USER, "reports_to", "Priya Raman", "person", "person")]),
    ("my boss is called Lee", [(USER, "reports_to", "Lee", "person", "person")]),
    ("My sister is Eve", [(USER, "sibling_of", "Eve", "person", "person")]),
    ("My brother is Max", [(USER, "sibling_of", "Max", "person", "person")]),
    ("My best friend is Bob", [(USER, "friend_of", "Bob", "person", "person")]),
    ("My sister Eve lives in Rome", [
        (USER, "sibling_of", "Eve", "person", "person"), ("Eve", "lives_in", "Rome", "person", "place"),
    ]),
    ("my friend Bob works at Globex", [
        (USER, "friend_of", "Bob", "person", "person"), ("Bob", "works_at", "Globex", "person", "organization"),
    ]),
    ("My name is Ada. I live in Paris and work at Acme.", [
        (USER, "named", "Ada", "person", "person"), (USER, "lives_in", "Paris", "person", "place"),
        (USER, "works_at", "Acme", "person", "organization"),
    ]),
    ("I love cats and hate rain", [
        (USER, "likes", "cats", "person", "thing"), (USER, "dislikes", "rain", "person", "thing"),
    ]),
    # within one message the last word stands, as for facts
    ("I live in Paris. Actually I live in Berlin.", [(USER, "lives_in", "Berlin", "person", "place")]),
    ("I like jazz. Well, I hate jazz.", [(USER, "dislikes", "jazz", "person", "thing")]),
])
def test_rules_turn_statements_into_relations(text: str, expected: list[tuple[str, ...]]) -> None:
    assert triples(text) == expected


@pytest.mark.parametrize("text", [
    "Do I live in Paris?",
    "Is my wife Eve?",
    "I don't live in Paris",
    "I'm not a doctor",
    "I'd like a coffee",
    "My sister lives in Rome",  # no name: nobody to relate
    "My boss is annoying",
    "my wife is lovely",
    "You live in Paris",
    "Eve lives in Rome",
    "",
])
def test_rules_find_no_relation_where_nothing_is_stated(text: str) -> None:
    assert RULES.extract_relations_now(text) == []


def test_each_relation_names_the_fact_it_restates_and_the_words_that_state_it() -> None:
    text = "My name is Ada. I live in Paris and work at Acme."
    keys = {f.key for f in RULES.extract_now(text)}
    relations = RULES.extract_relations_now(text)
    assert {r.fact_key for r in relations} == keys == {"name", "lives_in", "works_at"}
    assert [r.evidence for r in relations] == ["My name is Ada", "I live in Paris", "I work at Acme"]
    # liking and disliking one thing restate the same fact: the later opinion replaces it
    assert RULES.extract_relations_now("I love coffee")[0].fact_key == "likes:coffee"
    assert RULES.extract_relations_now("I hate coffee")[0].fact_key == "likes:coffee"
    # what the user's sister does is no fact about the user
    assert RULES.extract_relations_now("My sister Eve lives in Rome")[1].fact_key is None


def test_the_rule_extractor_is_a_graph_extractor() -> None:
    assert isinstance(RULES, GraphExtractor)


@pytest.mark.parametrize(("raw", "expected"), [
    ("lives_in", "lives_in"), ("Lives In", "lives_in"), ("works-at", "works_at"),
    (" favourite colour ", "favourite_colour"),
    ("__x__", "x"), ("123abc", None), ("", None), ("!!!", None), ("a" * 65, None),
])
def test_predicates_are_made_lower_snake_case_or_refused(raw: str, expected: str | None) -> None:
    assert normal_predicate(raw) == expected


STATEMENTS = st.lists(st.sampled_from([
    "I live in", "my name is", "my sister", "my wife is", "Eve", "Rome", "I", "don't", "like", "Paris",
    "and", "?", ".", ",", "a", "an", "not", "I'm", "from", "favourite", "is", "prefer", "over", "work",
    "at", "Acme", "lives in", "boss", "'s name", "  ", "\n", "My", "friend", "É", "_", "-",
]), max_size=30).map(" ".join)


@given(st.one_of(st.text(max_size=400), STATEMENTS))
@settings(max_examples=400, deadline=None)
def test_rules_never_fail_and_give_only_valid_relations(text: str) -> None:
    for relation in RULES.extract_relations_now(text):
        assert isinstance(relation, ExtractedRelation)
        assert normal_predicate(relation.predicate) == relation.predicate
        assert relation.subject and relation.object and len(relation.object) <= 80
        assert relation.subject_type in ("person",) and relation.object_type in (
            "person", "place", "organization", "role", "thing",
        )


# ------------------------------------------------------------------ the OpenAI-compatible extractor


@pytest.fixture
def fake_llm(fake_openai_server: FakeOpenAIServer) -> FakeOpenAIServer:  # noqa: F811 (the imported fixture)
    """The fake OpenAI-compatible server of the agent's tests: the one thing faked here."""
    return fake_openai_server


ANSWER = json.dumps({
    "facts": [{"key": "lives_in", "text": "The user lives in Lyon", "kind": "fact"}],
    "relations": [
        {"subject": "@user", "predicate": "lives_in", "object": "Lyon", "subject_type": "person",
         "object_type": "place"},
        {"subject": "the user", "predicate": "Sibling Of", "object": "Eve", "subject_type": "person",
         "object_type": "person"},
        {"subject": "Eve", "predicate": "lives-in", "object": "Rome", "subject_type": "Person", "object_type": "city"},
        {"subject": "I", "predicate": "is_named", "object": "Ada", "subject_type": "person", "object_type": "person"},
        {"subject": "Eve", "predicate": "???", "object": "Rome", "subject_type": "person", "object_type": "place"},
        {"subject": "", "predicate": "likes", "object": "tea", "subject_type": "person", "object_type": "thing"},
        {"subject": "Eve", "predicate": "likes"},
        "not an object",
        {"subject": "@user", "predicate": "lives_in", "object": "Lyon", "subject_type": "person",
         "object_type": "place"},
    ],
})


async def test_fake_llm_one_call_answers_both_facts_and_relations(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.content = ANSWER
    text = "I'm Ada; I live in Lyon and my sister Eve lives in Rome."
    async with OpenAIExtractor(fake_llm.url, "fake-model", KEY) as extractor:
        assert isinstance(extractor, GraphExtractor)
        facts = await extractor.extract(text, user_id="ada")
        relations = await extractor.extract_relations(text, user_id="ada")
    assert len(fake_llm.requests) == 1
    assert facts == [ExtractedFact(key="lives_in", text="The user lives in Lyon", kind="fact")]
    assert relations == [  # normalised, malformed and unnameable ones left out, each once
        ExtractedRelation(USER, "lives_in", "Lyon", "person", "place"),
        ExtractedRelation(USER, "sibling_of", "Eve", "person", "person"),
        ExtractedRelation("Eve", "lives_in", "Rome", "person", "thing"),
        ExtractedRelation(USER, "named", "Ada", "person", "person"),
    ]
    schema = fake_llm.requests[0]["body"]["response_format"]["json_schema"]["schema"]
    assert schema["required"] == ["facts", "relations"]
    assert schema["properties"]["relations"]["items"]["required"] == [
        "subject", "predicate", "object", "subject_type", "object_type",
    ]


async def test_fake_llm_a_part_taken_twice_asks_again(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.content = ANSWER
    async with OpenAIExtractor(fake_llm.url, "fake-model", KEY) as extractor:
        await extractor.extract_relations("I live in Lyon", user_id="ada")
        await extractor.extract_relations("I live in Lyon", user_id="ada")  # taken already: a new call
        await extractor.extract("I live in Lyon", user_id="ada")  # the second answer's facts
        await extractor.extract("I live in Lyon", user_id="bob")  # another user: their own call
    assert len(fake_llm.requests) == 3


async def test_fake_llm_answers_are_cached_per_message_within_a_bound(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.content = ANSWER
    async with OpenAIExtractor(fake_llm.url, "fake-model", KEY, cached=2) as extractor:
        for text in ("one", "two", "three"):
            await extractor.extract(text, user_id="ada")
        await extractor.extract_relations("one", user_id="ada")  # pushed out of the cache: asked again
        await extractor.extract_relations("three", user_id="ada")
    assert len(fake_llm.requests) == 4


async def test_fake_llm_an_answer_without_relations_still_gives_its_facts(fake_llm: FakeOpenAIServer) -> None:
    fake_llm.content = json.dumps({"facts": [{"key": "name", "text": "The user's name is Ada", "kind": "fact"}]})

    async with OpenAIExtractor(fake_llm.url, "fake-model", KEY) as extractor:
        assert len(await extractor.extract("My name is Ada", user_id="ada")) == 1
        assert await extractor.extract_relations("My name is Ada", user_id="ada") == []
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize("content", [
    pytest.param("I think you live in Lyon", id="prose"),
    pytest.param('{"relations": "Lyon"}', id="relations-not-a-list"),
    pytest.param('{"facts": [], "relations": [', id="truncated-json"),
    pytest.param('[1, 2, 3]', id="a-list"),
    pytest.param('{"facts": [], "relations": [{"subject": 1, "predicate": [], "object": null}]}', id="wrong-types"),
    pytest.param("", id="empty"),
])
async def test_fake_llm_garbage_gives_no_relations_and_never_raises(
    fake_llm: FakeOpenAIServer, content: str
) -> None:
    fake_llm.content = content
    async with OpenAIExtractor(fake_llm.url, "fake-model", KEY) as extractor:
        with structlog.testing.capture_logs():
            assert await extractor.extract_relations("I live in Lyon.", user_id="ada") == []


# ------------------------------------------------------------------ the learner and the graph

async def said(bb: AsyncBlackbird, session_id: str, text: str, author: str = "u1") -> int:
    """Post ``text`` as the session's user and wait until the learner is done with it."""
    posted = await bb.session_manager.send_message(text, session_id=session_id, author=author)
    await bb.learning.caught_up(posted["sequence"], timeout=30)
    return int(posted["sequence"])


def current(relation: Relation) -> bool:
    return relation.valid_to is None and relation.ended_at is None


def by_object(relations: list[Relation], predicate: str) -> dict[str, Relation]:
    return {r.object: r for r in relations if r.predicate == predicate}


async def test_the_graph_follows_what_the_user_states(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), extractor=RuleExtractor()
    ) as bb:
        session = (await bb.session_manager.create_session("u1")).session_id
        await said(bb, session, "My name is Ada. I live in Paris and work at Acme.")
        await said(bb, session, "I moved to Berlin")
        everything = await bb.memory.facts_about("Ada", session_id=session, history=True)
        homes = by_object(everything, "lives_in")
        assert current(homes["Berlin"]) and not current(homes["Paris"])
        assert current(by_object(everything, "works_at")["Acme"])
        now = await bb.memory.facts_about("Ada", session_id=session, predicates=["lives_in"])
        assert [r.object for r in now] == ["Berlin"]
        # the user id and the stated name are one node
        assert [r.object for r in await bb.memory.facts_about("u1", session_id=session, predicates=["lives_in"])] == [
            "Berlin"
        ]
        # each relation points at the memory of the fact it restates, and says why
        memory = (await bb.memory.recall("where", session_id=session, scopes=["user"], filters={"key": "lives_in"}))[0]
        assert homes["Berlin"].source == memory.memory_id
        assert homes["Berlin"].evidence == "The user lives in Berlin" == memory.text
        assert bb.learning.related >= 4


async def test_a_changed_opinion_ends_the_old_one(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), extractor=RuleExtractor()
    ) as bb:
        session = (await bb.session_manager.create_session("u1")).session_id
        await said(bb, session, "I like jazz")
        await said(bb, session, "I don't like jazz anymore")
        opinions = await bb.memory.facts_about(
            "u1", session_id=session, predicates=["likes", "dislikes"], history=True
        )
        assert not current(by_object(opinions, "likes")["jazz"])
        assert current(by_object(opinions, "dislikes")["jazz"])
        await said(bb, session, "I love jazz")
        now = await bb.memory.facts_about("u1", session_id=session, predicates=["likes", "dislikes"])
        assert [(r.predicate, r.object) for r in now] == [("likes", "jazz")]


async def test_the_raw_memory_is_remembered_before_the_graph_is_written(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), extractor=RuleExtractor()
    ) as bb:
        session = (await bb.session_manager.create_session("u1")).session_id
        order: list[str] = []
        remember, relate = bb.memory.remember, bb.memory.relate

        async def remembering(*args: Any, **kwargs: Any) -> Any:
            order.append("remember")
            return await remember(*args, **kwargs)

        async def relating(*args: Any, **kwargs: Any) -> Any:
            order.append("relate")
            return await relate(*args, **kwargs)

        bb.memory.remember, bb.memory.relate = remembering, relating  # type: ignore[method-assign]
        await said(bb, session, "I live in Paris and work at Acme")
        assert order == ["remember", "remember", "relate", "relate"]


async def test_fake_llm_third_person_relations_reach_the_graph_with_one_call_a_message(
    nats_server: NatsServer, fake_llm: FakeOpenAIServer
) -> None:
    fake_llm.content = json.dumps({
        "facts": [{"key": "sibling_of:eve", "text": "The user's sister is Eve", "kind": "fact"}],
        "relations": [
            {"subject": "@user", "predicate": "sibling_of", "object": "Eve", "subject_type": "person",
             "object_type": "person"},
            {"subject": "Eve", "predicate": "lives_in", "object": "Rome", "subject_type": "person",
             "object_type": "place"},
        ],
    })
    extractor = OpenAIExtractor(fake_llm.url, "fake-model", KEY)
    async with extractor, AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), extractor=extractor
    ) as bb:
        session = (await bb.session_manager.create_session("u1")).session_id
        await said(bb, session, "My sister Eve lives in Rome")
        assert [r.object for r in await bb.memory.facts_about("Eve", session_id=session, predicates=["lives_in"])] == [
            "Rome"
        ]
        siblings = await bb.memory.facts_about("u1", session_id=session, predicates=["sibling_of"])
        assert [r.object for r in siblings] == ["Eve"] and siblings[0].evidence == "The user's sister is Eve"
    assert len(fake_llm.requests) == 1


async def test_a_conversations_graph_is_queryable_as_of_any_time_and_erased_with_the_user(
    nats_server: NatsServer,
) -> None:
    now = [1_800_000_000.0]
    async with AsyncBlackbird(
        nats_url=nats_server.url, tenant="acme", embedder=HashEmbedder(), extractor=RuleExtractor(),
        clock=lambda: now[0],
    ) as bb:
        session = (await bb.session_manager.create_session("u1", tier="pro")).session_id
        await said(bb, session, "My name is Ada. I live in Paris and I work at Acme.")
        in_paris = now[0] + 30
        now[0] += 60
        await said(bb, session, "I moved to Berlin.")
        now[0] += 60
        assert [r.object for r in await bb.memory.facts_about("Ada", session_id=session, predicates=["lives_in"])] == [
            "Berlin"
        ]
        then = await bb.memory.facts_about("Ada", session_id=session, predicates=["lives_in"], as_of=in_paris)
        assert [r.object for r in then] == ["Paris"]
        assert [n.entity.name for n in await bb.memory.neighbors("Ada", session_id=session, as_of=in_paris)] == [
            "Paris", "Acme",
        ]

        await bb.memory.forget_user("u1")
        other = (await bb.session_manager.create_session("u2", tier="pro")).session_id
        assert await bb.memory.facts_about("Ada", session_id=other, scopes=["tenant"], history=True) == []
        graph = (await bb.projections.caught_up("graph", 0)).model.tenants.get("acme")
        assert graph is None or not any(r.author == "u1" for r in graph.relations.values())
        assert graph is None or not any(e.author == "u1" for e in graph.entities.values())
