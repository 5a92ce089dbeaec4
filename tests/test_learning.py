"""Learning across sessions: the rule-based extractor's statements, and the learner on a real
nats-server and real LanceDB with the real local embedder: what a user states in one session is
recalled in the next, a newer statement supersedes an older one, other users and agent replies
teach nothing, and a restart learns nothing twice."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.events import MemoryRemembered
from blackbird import AsyncBlackbird, BlackbirdError
from blackbird.agents.learning import ExtractedFact, Extractor, RuleExtractor

from .conftest import NatsServer

RULES = RuleExtractor()


def facts(text: str) -> dict[str, str]:
    return {f.key: f.text for f in RULES.extract_now(text)}


# ------------------------------------------------------------------ the rule-based extractor


@pytest.mark.parametrize(("text", "expected"), [
    ("My name is Ada and I live in Paris", {"name": "The user's name is Ada", "lives_in": "The user lives in Paris"}),
    ("Hi, my name is ada lovelace!", {"name": "The user's name is Ada Lovelace"}),
    ("Call me Ishmael.", {"name": "The user's name is Ishmael"}),
    ("I live in Berlin.", {"lives_in": "The user lives in Berlin"}),
    ("I live in Paris, France", {"lives_in": "The user lives in Paris, France"}),
    ("I live in Saint-Denis", {"lives_in": "The user lives in Saint-Denis"}),
    ("Well, actually I moved to Lisbon last year", {"lives_in": "The user lives in Lisbon"}),
    ("I'm based in Porto because of work", {"lives_in": "The user lives in Porto"}),
    ("I'm from São Paulo", {"from": "The user is from São Paulo"}),
    ("I work for Acme Corp since 2019", {"works_at": "The user works at Acme Corp"}),
    ("I work at the Harbor Clinic", {"works_at": "The user works at the Harbor Clinic"}),
    ("I am a software engineer", {"role": "The user is a software engineer"}),
    ("I'm an architect.", {"role": "The user is an architect"}),
    ("I love black coffee, it wakes me up", {"likes:black coffee": "The user likes black coffee"}),
    ("I really enjoy hiking in the mountains",
     {"likes:hiking in the mountains": "The user likes hiking in the mountains"}),
    ("I hate mushrooms", {"likes:mushrooms": "The user does not like mushrooms"}),
    ("I really don't like jazz", {"likes:jazz": "The user does not like jazz"}),
    ("My favourite colour is blue", {"favourite:colour": "The user's favourite colour is blue"}),
    ("my favorite book is Dune.", {"favourite:book": "The user's favourite book is Dune"}),
    ("I prefer tea over coffee", {"prefers:coffee vs tea": "The user prefers tea over coffee"}),
    ("I’m from Lyon and I’m a nurse", {"from": "The user is from Lyon", "role": "The user is a nurse"}),
    ("I live in Paris and work at Acme", {"lives_in": "The user lives in Paris", "works_at": "The user works at Acme"}),
    ("My friend's name is Bob", {"friend_of:bob": "The user's friend is Bob"}),
    ("My wife is Eve.", {"married_to": "The user's wife is Eve"}),
    ("My manager is Priya Raman", {"reports_to": "The user's manager is Priya Raman"}),
    ("My sister Eve lives in Rome", {"sibling_of:eve": "The user's sister is Eve"}),
])
def test_rules_turn_first_person_statements_into_keyed_facts(text: str, expected: dict[str, str]) -> None:
    assert facts(text) == expected


@pytest.mark.parametrize("text", [
    "Do I live in Paris?",
    "What is my name?",
    "Where do I work? I forgot.",
    "My name is Ada?",
    "I don't live in Paris",
    "I no longer live in Paris",
    "I'm not a doctor",
    "I am not from here",
    "I don't work at Acme",
    "If I lived in Rome I would be happy",
    "I'd like a coffee",
    "I would like to book a table",
    "I'm a bit tired",
    "I like it",
    "I love you",
    "My sister lives in Rome",
    "My boss is annoying",
    "my wife is lovely",
    "Call me tomorrow",
    "You live in Paris",
    "",
    "   ",
])
def test_rules_find_nothing_in_questions_negations_and_other_peoples_facts(text: str) -> None:
    assert RULES.extract_now(text) == []


def test_keys_let_a_later_statement_replace_an_earlier_one() -> None:
    assert facts("I love coffee").keys() == facts("I hate coffee").keys() == {"likes:coffee"}
    assert facts("I prefer tea to coffee").keys() == facts("I prefer coffee over tea").keys()
    assert facts("I live in Paris").keys() == facts("I moved to Berlin").keys() == {"lives_in"}
    # within one message the last word stands
    assert facts("I live in Paris. Actually I live in Berlin.") == {"lives_in": "The user lives in Berlin"}


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_rules_never_fail_on_any_text(text: str) -> None:
    for fact in RULES.extract_now(text):
        assert isinstance(fact, ExtractedFact) and fact.kind in ("fact", "preference")
        assert fact.key and fact.text and len(fact.text) < 200


@given(st.lists(st.sampled_from([
    "I live in", "my name is", "I", "don't", "like", "Paris", "and", "?", ".", ",", "a", "an",
    "not", "I'm", "from", "favourite", "is", "prefer", "over", "work", "at", "Acme", "  ", "\n",
]), max_size=30).map(" ".join))
@settings(max_examples=300, deadline=None)
def test_rules_never_fail_on_statement_like_noise(text: str) -> None:
    assert all(f.key and f.text for f in RULES.extract_now(text))


def test_the_rule_extractor_is_an_extractor() -> None:
    assert isinstance(RULES, Extractor)


# ------------------------------------------------------------------ the learner


async def said(bb: AsyncBlackbird, session_id: str, text: str, author: str | None) -> int:
    """Post ``text`` on the session's chat (as ``author``; None: an agent) and wait until it
    is learned; returns its sequence."""
    posted = await bb.session_manager.send_message(text, session_id=session_id, author=author)
    await bb.learning.caught_up(posted["sequence"], timeout=30)
    return int(posted["sequence"])


async def recalled(bb: AsyncBlackbird, session_id: str, query: str, **options: object) -> list[str]:
    return [m.text for m in await bb.memory.recall(query, session_id=session_id, scopes=["user"], **options)]  # type: ignore[arg-type]


async def remembered_events(bb: AsyncBlackbird) -> int:
    """MemoryRemembered events in the log (every tenant)."""
    count = 0

    def collect(seq: int, subject: str, commit: object) -> None:
        nonlocal count
        count += sum(isinstance(e, MemoryRemembered) for e in commit.events)  # type: ignore[attr-defined]

    await bb.journal.replay(f"{bb.journal.subjects.prefix}.*.memory.>", 0, collect)
    return count


pytestmark_anyio = pytest.mark.anyio


@pytestmark_anyio
async def test_a_second_session_recalls_what_the_user_stated_in_the_first(bb: AsyncBlackbird) -> None:
    first = await bb.session_manager.create_session("u1")
    await said(bb, first.session_id, "My name is Ada and I live in Paris", "u1")
    second = await bb.session_manager.create_session("u1")
    assert (await recalled(bb, second.session_id, "where does the user live"))[0] == "The user lives in Paris"
    assert (await recalled(bb, second.session_id, "what is the user called"))[0] == "The user's name is Ada"
    memory = (await bb.memory.recall("where does the user live", session_id=second.session_id, k=1))[0]
    assert (memory.key, memory.kind, memory.author, memory.scope) == ("lives_in", "fact", "u1", "user")


@pytestmark_anyio
async def test_a_later_statement_supersedes_an_earlier_one_and_as_of_still_finds_it(bb: AsyncBlackbird) -> None:
    s1 = await bb.session_manager.create_session("u1")
    await said(bb, s1.session_id, "I live in Paris", "u1")
    between = time.time()
    await anyio.sleep(0.01)
    s2 = await bb.session_manager.create_session("u1")
    await said(bb, s2.session_id, "I moved to Berlin last month", "u1")
    now = await recalled(bb, s2.session_id, "where does the user live", filters={"key": "lives_in"})
    assert now == ["The user lives in Berlin"]
    then = await recalled(bb, s2.session_id, "where does the user live", filters={"key": "lives_in"}, as_of=between)
    assert then == ["The user lives in Paris"]


@pytestmark_anyio
async def test_what_one_user_states_is_invisible_to_another_user_and_tenant(bb: AsyncBlackbird) -> None:
    theirs = await bb.session_manager.create_session("u2")
    await said(bb, theirs.session_id, "I live in Oslo", "u2")
    other_tenant = await bb.session_manager.create_session("u1", tenant="globex")
    posted = await bb.session_manager.send_message(
        "I live in Madrid", session_id=other_tenant.session_id, tenant="globex", author="u1"
    )
    await bb.learning.caught_up(posted["sequence"], timeout=30)
    mine = await bb.session_manager.create_session("u1")
    await said(bb, mine.session_id, "My name is Ada", "u1")
    assert not {"The user lives in Oslo", "The user lives in Madrid"} & set(
        await recalled(bb, mine.session_id, "where does the user live", k=10)
    )
    assert await recalled(bb, other_tenant.session_id, "where does the user live", tenant="globex") == [
        "The user lives in Madrid"
    ]


@pytestmark_anyio
async def test_agent_replies_and_participants_teach_nothing(bb: AsyncBlackbird) -> None:
    session = await bb.session_manager.create_session("u1")
    await said(bb, session.session_id, "I live in Paris", None)  # an agent's reply: no author
    await bb.session_manager.join_session(session.session_id, "guest")
    await said(bb, session.session_id, "I live in Rome", "guest")  # not the session's user
    posted = await bb.session_manager.send_message(
        "I live in Quito", session_id=session.session_id, channel="progress", author="u1"
    )
    await bb.learning.caught_up(posted["sequence"], timeout=30)
    assert bb.learning.learned == 0
    assert await remembered_events(bb) == 0


@pytestmark_anyio
async def test_a_restart_resumes_where_the_learner_stopped(nats_server: NatsServer, tmp_path: Path) -> None:
    options = {"nats_url": nats_server.url, "tenant": "acme", "memory_dir": str(tmp_path / "memory")}
    async with AsyncBlackbird(**options) as bb:  # type: ignore[arg-type]
        session = await bb.session_manager.create_session("u1")
        await said(bb, session.session_id, "My name is Ada and I live in Paris", "u1")
        await said(bb, session.session_id, "I love black coffee", "u1")
        written = await remembered_events(bb)
        assert written == 3
    async with AsyncBlackbird(**options) as bb:  # type: ignore[arg-type]
        assert bb.learning.seq > 0  # from the checkpoint
        await bb.learning.caught_up(await bb.journal.stream_last_seq(), timeout=30)
        assert bb.learning.learned == 0
        assert await remembered_events(bb) == written
        await said(bb, session.session_id, "I moved to Berlin", "u1")
        assert await recalled(bb, session.session_id, "where does the user live", filters={"key": "lives_in"}) == [
            "The user lives in Berlin"
        ]


@pytestmark_anyio
async def test_a_custom_extractor_is_used_and_its_failures_do_not_stop_learning(nats_server: NatsServer) -> None:
    class Flaky:
        async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
            if "boom" in text:
                raise RuntimeError("the model API is down")
            return [ExtractedFact(key="said", text=f"{user_id} said: {text}", kind="fact")]

    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", extractor=Flaky()) as bb:
        session = await bb.session_manager.create_session("u1")
        await said(bb, session.session_id, "boom", "u1")
        await said(bb, session.session_id, "the sky is green", "u1")
        assert await recalled(bb, session.session_id, "what colour is the sky") == ["u1 said: the sky is green"]


@pytestmark_anyio
async def test_learn_false_runs_no_learner(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", learn=False) as bb:
        with pytest.raises(BlackbirdError, match="runs no learner"):
            bb.learning  # noqa: B018
