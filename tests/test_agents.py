"""send_message: the agent's reply, with its context, under one admission, streamed, stoppable.

Real nats-server and LanceDB (the ``bb`` fixture, the local embedding model); the agents are
the development agent and scripted test agents that count their calls and wait on events, so
nothing here sleeps to synchronise.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator

import anyio
import pytest

from blackbird import AsyncBlackbird, BlackbirdSDK, QuotaExceededError, ValidationError
from blackbird.agents import AgentChunk, AgentContext, AgentReply, Usage
from blackbird.agents.development import NOTHING_RECALLED, DevelopmentAgent

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ScriptedAgent:
    """A test agent: yields ``chunks``; before the chunk at ``wait_at`` it signals ``waiting``
    and waits for ``go`` (never set: it waits until stopped or cancelled); ``fail`` raises
    after the first chunk. Counts its calls and keeps the contexts it was given."""

    def __init__(
        self, agent_id: str = "scripted", chunks: tuple[str, ...] = ("Hello", ", ", "world."), *,
        wait_at: int | None = None, fail: bool = False, usage: Usage | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.chunks = chunks
        self.wait_at = wait_at
        self.fail = fail
        self.usage = usage
        self.calls = 0
        self.contexts: list[AgentContext] = []
        self.waiting = anyio.Event()
        self.go = anyio.Event()

    async def respond(self, context: AgentContext) -> AsyncIterator[AgentChunk]:
        self.calls += 1
        self.contexts.append(context)
        for i, chunk in enumerate(self.chunks):
            if i == self.wait_at:
                self.waiting.set()
                await self.go.wait()
            yield AgentChunk(text=chunk)
            if self.fail:
                raise RuntimeError("the model fell over")
        if self.usage is not None:
            yield AgentChunk(usage=self.usage)


async def _quota_and_slots(bb: AsyncBlackbird, session_id: str) -> tuple[dict[str, float], int]:
    tokens = await bb.session_manager.get_quota(session_id, "tokens")
    session = await bb.session_manager.get_session(session_id)
    assert session is not None
    return tokens, session.concurrent_operations


async def test_send_message_returns_the_reply_with_its_context_usage_and_audit(bb: AsyncBlackbird) -> None:
    assert bb.agents.default == "development" and isinstance(bb.agents.get("development"), DevelopmentAgent)
    session = await bb.session_manager.create_session("alice", tier="pro")
    remembered = await bb.memory.remember(
        "Alice's favourite colour is teal", session_id=session.session_id, scope="user"
    )

    first = await bb.send_message("What is my favourite colour?")  # the session this client created last
    assert isinstance(first, AgentReply)
    assert first.session_id == session.session_id and first.agent_id == "development"
    assert "teal" in first.text and first.text.startswith("From what I remember:")
    assert remembered.memory_id in first.memory_ids
    assert first.usage.total_tokens > 0 and first.usage.estimated and not first.stopped

    second = await bb.send_message("And what else?", session.session_id)
    assert second.sequence > first.sequence
    # the first exchange is the second one's history: the user's message and the reply
    assert len(second.message_ids) == 2 and second.message_ids[1] == f"{first.sequence}-0"

    tokens, slots = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == first.usage.total_tokens + second.usage.total_tokens
    assert tokens["reserved"] == 0 and slots == 0

    async with bb.streams.subscribe(session.session_id, channels=["chat"]) as chat:
        messages = [await chat.__anext__() for _ in range(4)]
    assert [m.metadata["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    reply = messages[1]
    assert reply.text == first.text and reply.sequence == first.sequence
    assert reply.metadata["memory_ids"] == list(first.memory_ids)
    assert reply.metadata["agent_id"] == "development" and reply.metadata["stopped"] is False
    assert reply.metadata["usage"]["prompt_tokens"] == first.usage.prompt_tokens

    report = await bb.audit.replay(session_id=session.session_id)
    what = " | ".join(" ".join(row.what) for row in report.rows)
    for event in ("Reserved", "SlotAcquired", "RateAllowed", "ReservationSettled", "SlotReleased", "MessagePosted"):
        assert event in what, event


async def test_no_session_yet_is_a_validation_error_naming_session_id(bb: AsyncBlackbird) -> None:
    with pytest.raises(ValidationError) as caught:
        await bb.send_message("hello")
    assert caught.value.field == "session_id"
    session = await bb.session_manager.create_session("alice", tier="pro")
    with pytest.raises(ValidationError) as unknown:
        await bb.send_message("hello", session.session_id, agent="nobody")
    assert unknown.value.field == "agent"


async def test_a_refused_admission_raises_before_any_model_call(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent()
    session = await bb.session_manager.create_session("alice", tier="pro")
    await bb.session_manager.adjust_quota(session.session_id, "tokens", 10)
    with pytest.raises(QuotaExceededError):
        await bb.send_message("hello", session.session_id, agent=agent)
    assert agent.calls == 0
    tokens, slots = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == 0 and tokens["reserved"] == 0 and slots == 0
    report = await bb.audit.replay(session_id=session.session_id)
    assert any(row.decision == "refused" for row in report.rows)


async def test_a_failing_agent_releases_the_reservation_and_raises(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent(fail=True)
    session = await bb.session_manager.create_session("alice", tier="pro")
    with pytest.raises(RuntimeError, match="fell over"):
        await bb.send_message("hello", session.session_id, agent=agent)
    assert agent.calls == 1
    tokens, slots = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == 0 and tokens["reserved"] == 0 and slots == 0


async def test_cancelling_a_reply_releases_the_reservation_and_slot(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent(wait_at=1)
    session = await bb.session_manager.create_session("alice", tier="pro")
    async with anyio.create_task_group() as tg:
        tg.start_soon(functools.partial(bb.send_message, "hello", session.session_id, agent=agent))
        await agent.waiting.wait()
        held, slots = await _quota_and_slots(bb, session.session_id)
        assert held["reserved"] > 0 and slots == 1
        tg.cancel_scope.cancel()
    tokens, slots = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == 0 and tokens["reserved"] == 0 and slots == 0


async def test_stop_reply_from_another_task_ends_generation_and_is_recorded(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent(chunks=("Once upon", " a time", " there was"), wait_at=1)
    session = await bb.session_manager.create_session("alice", tier="pro")
    replies: list[AgentReply] = []

    async def ask() -> None:
        replies.append(await bb.send_message("tell me a story", session.session_id, agent=agent))

    with anyio.fail_after(15):  # a stop that is not heard would leave the agent waiting for ever
        async with anyio.create_task_group() as tg:
            tg.start_soon(ask)
            await agent.waiting.wait()
            await bb.stop_reply(session.session_id)
    (reply,) = replies
    assert reply.stopped and reply.text == "Once upon"
    tokens, slots = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == reply.usage.total_tokens and tokens["reserved"] == 0 and slots == 0
    async with bb.streams.subscribe(session.session_id, channels=["control", "chat"]) as log:
        seen = [await log.__anext__() for _ in range(3)]
    assert [(m.channel, m.text) for m in seen] == [
        ("chat", "tell me a story"), ("control", "stop"), ("chat", "Once upon")
    ]
    assert seen[2].metadata["stopped"] is True


async def test_stream_message_yields_the_pieces_of_the_reply(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent(usage=Usage(prompt_tokens=7, completion_tokens=3))
    session = await bb.session_manager.create_session("alice", tier="pro")
    stream = bb.stream_message("hi", session.session_id, agent=agent)
    pieces = [piece async for piece in stream]
    assert pieces == ["Hello", ", ", "world."]
    assert stream.reply.text == "".join(pieces)
    assert stream.reply.usage == Usage(prompt_tokens=7, completion_tokens=3)  # the model's own figures
    tokens, _ = await _quota_and_slots(bb, session.session_id)
    assert tokens["used"] == 10


async def test_subscribers_see_the_draft_live_then_the_persisted_reply(bb: AsyncBlackbird) -> None:
    agent = ScriptedAgent(chunks=("Thinking", " hard."), wait_at=1)
    session = await bb.session_manager.create_session("alice", tier="pro")
    seen: list[tuple[str, str]] = []

    async def watch() -> None:
        async with bb.streams.subscribe(session.session_id, channels=["draft", "chat"]) as messages:
            async for m in messages:
                seen.append((m.channel, m.text))
                if m.channel == "draft":
                    agent.go.set()  # the draft reached a subscriber while the reply is generated
                if m.channel == "chat" and m.metadata.get("role") == "assistant":
                    return

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        reply = await bb.send_message("hello", session.session_id, agent=agent)
    assert seen == [("chat", "hello"), ("draft", "Thinking"), ("chat", "Thinking hard.")]
    assert reply.text == "Thinking hard."


async def test_the_development_agent_says_so_when_it_recalls_nothing(bb: AsyncBlackbird) -> None:
    session = await bb.session_manager.create_session("bob", tier="pro")
    reply = await bb.send_message("What is the capital of France?", session.session_id)
    assert reply.text == NOTHING_RECALLED and reply.memory_ids == ()


def test_the_sync_facade_sends_and_streams() -> None:
    with BlackbirdSDK(development_mode=True) as sdk:
        session = sdk.session_manager.create_session("alice", tier="pro")
        agent = ScriptedAgent()
        sdk.agents.register(agent)
        reply = sdk.send_message("hello", agent="scripted")
        assert reply.text == "Hello, world." and reply.session_id == session.session_id
        stream = sdk.stream_message("again", session.session_id, agent="scripted")
        assert list(stream) == ["Hello", ", ", "world."]
        assert stream.reply.sequence > reply.sequence
