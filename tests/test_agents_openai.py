"""The OpenAI-compatible agent and extractor against a fake OpenAI-compatible server: a real
Starlette app on a real uvicorn server on loopback, answering ``/v1/chat/completions`` as OpenAI
does (a stream of Server-Sent Events, or one JSON completion) or as a broken server would."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from blackbird import AgentError
from blackbird.agents.base import Agent, AgentChunk, AgentContext, ContextMemory, ContextMessage, Usage
from blackbird.agents.learning import ExtractedFact, Extractor
from blackbird.agents.openai import OpenAIAgent, OpenAIExtractor, chat_messages
from blackbird.config import build_settings
from blackbird.http.app import http_server

pytestmark = pytest.mark.anyio

KEY = "sk-fake-0123456789-secret"
PIECES = ["Hello", ", Ada", ". You live", " in Lyon", "."]

Reply = Callable[[dict[str, Any]], Awaitable[Response]]


@dataclass
class FakeOpenAIServer:
    """What the fake answers, and every request it got (headers and JSON body)."""

    url: str = ""
    pieces: list[str] = field(default_factory=lambda: list(PIECES))
    usage: dict[str, int] | None = field(default_factory=lambda: {"prompt_tokens": 57, "completion_tokens": 9})
    # the content of a non-streamed completion (the extractor's JSON)
    content: str = '{"facts": []}'
    refuse_json_schema: bool = False
    reply: Reply | None = None  # answers in place of the behaviour above
    requests: list[dict[str, Any]] = field(default_factory=list)

    def chunk(self, **fields: Any) -> bytes:
        body = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": "fake", **fields}
        return f"data: {json.dumps(body)}\n\n".encode()

    async def sse(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        yield b": a comment, which clients ignore\n\n"
        yield self.chunk(choices=[{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        for piece in self.pieces:
            yield self.chunk(choices=[{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        yield self.chunk(choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if self.usage is not None and body.get("stream_options", {}).get("include_usage"):
            yield self.chunk(choices=[], usage={**self.usage, "total_tokens": sum(self.usage.values())})
        yield b"data: [DONE]\n\n"

    def completion(self, content: str) -> dict[str, Any]:
        return {
            "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": self.usage,
        }

    async def answer(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append({"headers": dict(request.headers), "body": body})
        if self.reply is not None:
            return await self.reply(body)
        if body.get("stream"):
            return StreamingResponse(self.sse(body), media_type="text/event-stream")
        if self.refuse_json_schema and body.get("response_format", {}).get("type") == "json_schema":
            return JSONResponse({"error": {"message": "response_format json_schema is not supported"}}, 400)
        return JSONResponse(self.completion(self.content))


@pytest.fixture
def fake_openai_server() -> Iterator[FakeOpenAIServer]:
    """The fake on a free loopback port, served by uvicorn in its own thread and event loop."""
    fake = FakeOpenAIServer()
    app = Starlette(routes=[Route("/v1/chat/completions", fake.answer, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # listening before the server runs: no request can arrive too early
    server = http_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    try:
        yield fake
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def context(**changes: Any) -> AgentContext:
    fields: dict[str, Any] = {
        "tenant": "acme", "session_id": "s1", "user_id": "ada", "tier": "pro", "agent_id": "helper",
        "message": "Where do I live?",
        "history": (
            ContextMessage(id="3-0", role="user", text="Hi, I'm Ada."),
            ContextMessage(id="4-0", role="assistant", text="Hello Ada!"),
        ),
        "memories": (ContextMemory(memory_id="m1", text="Ada lives in Lyon.", scope="user", score=0.9),),
        "preferences": {"reply_style": "short"},
        "session_metadata": {"topic": "travel"},
    }
    return AgentContext(**{**fields, **changes})


async def reply_of(agent: OpenAIAgent, ctx: AgentContext | None = None) -> tuple[list[AgentChunk], Usage]:
    chunks = [chunk async for chunk in agent.respond(ctx or context())]
    assert chunks[-1].usage is not None and chunks[-1].text == ""
    assert all(c.usage is None for c in chunks[:-1])
    return chunks[:-1], chunks[-1].usage


async def failure(agent: OpenAIAgent) -> AgentError:
    with pytest.raises(AgentError) as caught:
        await reply_of(agent)
    assert caught.value.agent_id == agent.agent_id
    assert KEY not in str(caught.value) and KEY not in repr(caught.value.fields)
    return caught.value


# ------------------------------------------------------------------------------------------
# the agent


async def test_streamed_deltas_joined_are_the_servers_text(fake_openai_server: FakeOpenAIServer) -> None:
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY, agent_id="helper") as agent:
        assert isinstance(agent, Agent)
        chunks, _ = await reply_of(agent)
    assert [c.text for c in chunks] == PIECES
    assert "".join(c.text for c in chunks) == "Hello, Ada. You live in Lyon."


async def test_usage_is_the_one_the_final_chunk_reports(fake_openai_server: FakeOpenAIServer) -> None:
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        _, usage = await reply_of(agent)
    assert usage == Usage(prompt_tokens=57, completion_tokens=9, estimated=False)


async def test_a_server_reporting_no_usage_gives_an_estimate(fake_openai_server: FakeOpenAIServer) -> None:
    fake_openai_server.usage = None
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        _, usage = await reply_of(agent)
    assert usage.estimated
    assert usage.completion_tokens == (len("Hello, Ada. You live in Lyon.") + 3) // 4
    assert usage.prompt_tokens > 0


async def test_the_request_carries_model_limits_stream_options_memories_and_history(
    fake_openai_server: FakeOpenAIServer,
) -> None:
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY, max_tokens=100) as agent:
        await reply_of(agent)
        await reply_of(agent, context(max_reply_tokens=40))
    first, second = fake_openai_server.requests
    assert first["headers"]["authorization"] == f"Bearer {KEY}"
    body = first["body"]
    assert body["model"] == "fake-model"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 100  # the agent's limit, below the context's 512
    assert second["body"]["max_tokens"] == 40  # never more than the conversation reserved
    messages = body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    system = messages[0]["content"]
    assert "Ada lives in Lyon." in system and "reply_style: short" in system
    assert "'pro'" in system and '"topic":"travel"' in system
    assert [m["content"] for m in messages[1:]] == ["Hi, I'm Ada.", "Hello Ada!", "Where do I live?"]
    assert messages == chat_messages(context())


async def test_without_memories_or_preferences_the_system_message_leaves_them_out() -> None:
    system = chat_messages(context(memories=(), preferences={}))[0]["content"]
    assert "remember" not in system and "preferences" not in system


async def test_a_rejected_key_is_an_agent_error_with_status_401_that_does_not_repeat_the_key(
    fake_openai_server: FakeOpenAIServer,
) -> None:
    async def unauthorized(body: dict[str, Any]) -> Response:
        # as OpenAI does, the error text quotes the key it was given
        return JSONResponse({"error": {"message": f"Incorrect API key provided: {KEY}"}}, 401)

    fake_openai_server.reply = unauthorized
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        error = await failure(agent)
    assert error.status == 401
    assert "HTTP 401" in str(error) and "Incorrect API key provided: ***" in str(error)
    assert fake_openai_server.url in str(error)


async def test_a_server_error_is_an_agent_error_with_status_500(fake_openai_server: FakeOpenAIServer) -> None:
    async def broken(body: dict[str, Any]) -> Response:
        return Response("upstream exploded", 500)

    fake_openai_server.reply = broken
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        error = await failure(agent)
    assert error.status == 500 and "HTTP 500" in str(error) and "upstream exploded" in str(error)


async def test_a_server_that_does_not_answer_in_time_is_an_agent_error(fake_openai_server: FakeOpenAIServer) -> None:
    async def silent(body: dict[str, Any]) -> Response:
        await asyncio.sleep(3)
        return Response("late", 200)

    fake_openai_server.reply = silent
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY, timeout=0.3) as agent:
        error = await failure(agent)
    assert error.status is None and "within 0.3 s" in str(error)


async def test_a_stream_that_stalls_midway_is_an_agent_error(fake_openai_server: FakeOpenAIServer) -> None:
    async def stalling(body: dict[str, Any]) -> Response:
        async def events() -> AsyncIterator[bytes]:
            yield fake_openai_server.chunk(choices=[{"index": 0, "delta": {"content": "Hel"}}])
            await asyncio.sleep(3)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    fake_openai_server.reply = stalling
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY, timeout=0.3) as agent:
        seen: list[str] = []
        with pytest.raises(AgentError) as caught:
            async for chunk in agent.respond(context()):
                seen.append(chunk.text)
    assert seen == ["Hel"]
    assert caught.value.status is None and "nothing more within 0.3 s" in str(caught.value)


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"data: {this is not json\n\n", id="data-that-is-not-json"),
        pytest.param(b"<html>a proxy's error page</html>\n", id="no-events-at-all"),
        pytest.param(b'data: {"choices": "many"}\n\n', id="json-of-the-wrong-shape"),
        pytest.param(b'data: {"choices": [{"index": 0, "delta": {"content": "cut"}}]}\n\n', id="cut-before-done"),
        pytest.param(b'data: {"error": {"message": "model overloaded"}}\n\n', id="an-error-in-the-stream"),
    ],
)
async def test_a_garbage_stream_is_an_agent_error(fake_openai_server: FakeOpenAIServer, stream: bytes) -> None:
    async def garbage(body: dict[str, Any]) -> Response:
        return Response(stream, 200, media_type="text/event-stream")

    fake_openai_server.reply = garbage
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        error = await failure(agent)
    assert error.status is None


async def test_a_refused_connection_is_an_agent_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: nothing listens there
    async with OpenAIAgent(f"http://127.0.0.1:{port}/v1", "fake-model", KEY) as agent:
        error = await failure(agent)
    assert error.status is None and "no answer" in str(error)


async def test_a_server_ignoring_stream_answers_with_one_completion(fake_openai_server: FakeOpenAIServer) -> None:
    async def whole(body: dict[str, Any]) -> Response:
        return JSONResponse(fake_openai_server.completion("All at once."))

    fake_openai_server.reply = whole
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        chunks, usage = await reply_of(agent)
    assert [c.text for c in chunks] == ["All at once."] and usage.prompt_tokens == 57


async def test_a_reader_can_stop_the_reply_early(fake_openai_server: FakeOpenAIServer) -> None:
    async with OpenAIAgent(fake_openai_server.url, "fake-model", KEY) as agent:
        replies = agent.respond(context())
        first = await replies.__anext__()
        await replies.aclose()  # what a stop request does: the response is closed, nothing raised
        assert first.text == "Hello"
        chunks, _ = await reply_of(agent)  # and the agent goes on serving
    assert len(chunks) == len(PIECES)


async def test_agent_errors_survive_the_wire() -> None:
    from blackbird.errors import error_from_code

    sent = AgentError("agent 'x' failed", agent_id="x", status=429)
    received = error_from_code(sent.code, sent.message, sent.fields)
    assert isinstance(received, AgentError) and (received.agent_id, received.status) == ("x", 429)


def test_from_settings_builds_the_configured_agent_or_none(monkeypatch: pytest.MonkeyPatch) -> None:
    assert OpenAIAgent.from_settings(build_settings()) is None
    assert OpenAIExtractor.from_settings(build_settings()) is None
    monkeypatch.setenv("BLACKBIRD_AGENT_MODEL", "llama3")
    monkeypatch.setenv("BLACKBIRD_AGENT_TIMEOUT", "5")
    settings = build_settings(agent_base_url="http://127.0.0.1:9/v1/", agent_api_key=KEY, agent_max_tokens=64)
    agent = OpenAIAgent.from_settings(settings)
    assert agent is not None
    assert (agent.url, agent.model, agent.max_tokens) == ("http://127.0.0.1:9/v1/chat/completions", "llama3", 64)
    assert OpenAIExtractor.from_settings(settings) is not None
    assert KEY not in repr(settings) and "agent_api_key='***'" in repr(settings)
    assert KEY not in repr(agent)


# ------------------------------------------------------------------------------------------
# the extractor


STATED = json.dumps({"facts": [
    {"key": "lives_in", "text": "The user lives in Lyon", "kind": "fact"},
    {"key": "Favourite Language", "text": "The user's favourite language is Python", "kind": "preference"},
    {"key": "Likes:  Dark Chocolate ", "text": "The user likes dark chocolate", "kind": "preference"},
]})


async def test_the_extractor_asks_for_a_json_schema_and_parses_the_statements(
    fake_openai_server: FakeOpenAIServer,
) -> None:
    fake_openai_server.content = STATED
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        assert isinstance(extractor, Extractor)
        facts = await extractor.extract("I live in Lyon and I prefer Python.", user_id="ada")
    assert facts == [  # keys in the rule extractor's form
        ExtractedFact(key="lives_in", text="The user lives in Lyon", kind="fact"),
        ExtractedFact(key="favourite_language", text="The user's favourite language is Python", kind="preference"),
        ExtractedFact(key="likes:dark chocolate", text="The user likes dark chocolate", kind="preference"),
    ]
    body = fake_openai_server.requests[0]["body"]
    assert body["model"] == "fake-model" and "stream" not in body
    assert body["response_format"]["type"] == "json_schema"
    schema = body["response_format"]["json_schema"]["schema"]
    assert schema["properties"]["facts"]["items"]["properties"]["kind"]["enum"] == ["fact", "preference"]
    assert body["messages"][-1] == {"role": "user", "content": "I live in Lyon and I prefer Python."}
    assert "ada" not in json.dumps(body)  # the user id is not sent to the model


async def test_a_server_refusing_json_schema_is_asked_for_a_json_object_from_then_on(
    fake_openai_server: FakeOpenAIServer,
) -> None:
    fake_openai_server.content = STATED
    fake_openai_server.refuse_json_schema = True
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        first = await extractor.extract("I live in Lyon and I prefer Python.", user_id="ada")
        second = await extractor.extract("I live in Lyon and I prefer Python.", user_id="ada")
    assert first == second and len(first) == 3
    formats = [r["body"]["response_format"]["type"] for r in fake_openai_server.requests]
    assert formats == ["json_schema", "json_object", "json_object"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("I think you live in Lyon", id="prose"),
        pytest.param('{"facts": "Lyon"}', id="facts-not-a-list"),
        pytest.param('{"facts": [', id="truncated-json"),
        pytest.param("", id="empty"),
    ],
)
async def test_the_extractor_survives_garbage_with_no_facts_and_a_warning(
    fake_openai_server: FakeOpenAIServer, content: str
) -> None:
    fake_openai_server.content = content
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        with structlog.testing.capture_logs() as logs:
            facts = await extractor.extract("I live in Lyon.", user_id="ada")
    assert facts == []
    if content:
        assert any(entry["log_level"] == "warning" for entry in logs)


async def test_the_extractor_survives_an_answer_that_is_not_a_completion(fake_openai_server: FakeOpenAIServer) -> None:
    async def garbage(body: dict[str, Any]) -> Response:
        return Response(b"\x00\xffnot json", 200, media_type="application/json")

    fake_openai_server.reply = garbage
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        with structlog.testing.capture_logs() as logs:
            assert await extractor.extract("I live in Lyon.", user_id="ada") == []
    assert [entry["log_level"] for entry in logs] == ["warning"]


async def test_the_extractor_leaves_out_malformed_items_and_reads_a_fenced_answer(
    fake_openai_server: FakeOpenAIServer,
) -> None:
    fake_openai_server.content = "```json\n" + json.dumps({"facts": [
        {"key": "name", "text": "The user's name is Ada Byron", "kind": "fact"},
        {"key": "", "text": "nothing it is about", "kind": "fact"},
        {"key": "mood", "text": "The user is happy", "kind": "feeling"},
        "not an object",
        {"key": "name", "text": "The user's name is Ada", "kind": "fact"},  # the last word stands
    ]}) + "\n```"
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        facts = await extractor.extract("My name is Ada.", user_id="ada")
    assert facts == [ExtractedFact(key="name", text="The user's name is Ada", kind="fact")]


async def test_the_extractor_raises_an_agent_error_when_the_call_fails(fake_openai_server: FakeOpenAIServer) -> None:
    async def broken(body: dict[str, Any]) -> Response:
        return Response(f"bad key {KEY}", 500)

    fake_openai_server.reply = broken
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        with pytest.raises(AgentError) as caught:
            await extractor.extract("I live in Lyon.", user_id="ada")
    assert caught.value.status == 500 and KEY not in str(caught.value)
    assert len(fake_openai_server.requests) == 1  # a server error is not a refused format: no second try


async def test_the_extractor_sends_nothing_for_an_empty_message(fake_openai_server: FakeOpenAIServer) -> None:
    async with OpenAIExtractor(fake_openai_server.url, "fake-model", KEY) as extractor:
        assert await extractor.extract("   ", user_id="ada") == []
    assert fake_openai_server.requests == []
