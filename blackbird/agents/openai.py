"""The OpenAI-compatible chat-completions agent and fact extractor, over httpx.

Both speak OpenAI's ``POST {base_url}/chat/completions``, so they work with any server that does
(OpenAI, vLLM, Ollama's ``/v1``, llama.cpp's server, LM Studio, proxies). :class:`OpenAIAgent`
streams a reply (Server-Sent Events) and takes its usage from the model's own figures;
:class:`OpenAIExtractor` asks for structured JSON listing what a user stated about themself and
the relations the message states, for the knowledge graph.
Every failure of the model API is an :class:`~blackbird.errors.AgentError`; the API key is
never part of a message.
"""

from __future__ import annotations

import collections
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Annotated, Any, Literal, Self

import httpx
import msgspec
import structlog

from blackbird.agents.base import AgentChunk, AgentContext, Usage, estimate_tokens
from blackbird.agents.learning import NAMED, USER, ExtractedFact, ExtractedRelation, normal_predicate
from blackbird.config import Settings, redact_url
from blackbird.errors import AgentError

__all__ = ["OpenAIAgent", "OpenAIExtractor", "chat_messages"]

log = structlog.get_logger("blackbird.agents")

#: Tokens a chat message costs beyond its text (OpenAI's format counts about four).
_MESSAGE_OVERHEAD_TOKENS = 4


# --------------------------------------------------------------------------------------------
# the endpoint both use


class _ChatCompletions:
    """One OpenAI-compatible ``/chat/completions`` endpoint: the request, its headers, and how
    its failures read (one home for what the agent and the extractor share)."""

    def __init__(
        self, base_url: str, api_key: str | None, *, timeout: float, agent_id: str, client: httpx.AsyncClient | None
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.agent_id = agent_id
        self.timeout = timeout
        self._shown_url = redact_url(self.url)
        self._api_key = api_key
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._client = client
        self._owned: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is not None:
            return self._client
        if self._owned is None:
            # created on first use, inside the event loop that uses it
            self._owned = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout))
        return self._owned

    async def aclose(self) -> None:
        if self._owned is not None:
            await self._owned.aclose()
            self._owned = None

    def error(self, reason: str, status: int | None = None) -> AgentError:
        """An AgentError naming the URL and ``reason``, with the API key blanked out (a server
        may echo it back in its error text)."""
        message = f"agent {self.agent_id!r}: chat completion at {self._shown_url} failed: {reason}"
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return AgentError(message, agent_id=self.agent_id, status=status)

    @contextlib.asynccontextmanager
    async def post(self, body: Mapping[str, Any]) -> AsyncIterator[httpx.Response]:
        """The open response to ``body`` (status 2xx), its content not read yet; closed on exit.

        Raises AgentError for a refused connection, no answer within ``timeout`` seconds (per
        wait: connecting, and each read of the answer), and an HTTP error status.
        """
        client = self._http()
        request = client.build_request(
            "POST", self.url, content=msgspec.json.encode(body), headers=self._headers,
            timeout=httpx.Timeout(self.timeout),
        )
        try:
            response = await client.send(request, stream=True)
        except httpx.TimeoutException:
            raise self.error(f"no answer within {self.timeout} s") from None
        except httpx.HTTPError as exc:
            raise self.error(f"no answer ({type(exc).__name__}: {exc})") from None
        try:
            if not response.is_success:
                try:
                    detail = (await response.aread())[:300].decode("utf-8", "replace").strip()
                except httpx.HTTPError:
                    detail = ""
                raise self.error(
                    f"HTTP {response.status_code} {response.reason_phrase}: {detail or '(no details)'}",
                    response.status_code,
                )
            yield response
        except httpx.TimeoutException:
            raise self.error(f"the answer stopped: nothing more within {self.timeout} s") from None
        except httpx.HTTPError as exc:
            raise self.error(f"the answer broke off ({type(exc).__name__}: {exc})") from None
        finally:
            await response.aclose()


# The parts of OpenAI's answers read here; other fields are ignored, so extensions of
# compatible servers do no harm.


class _ApiUsage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ApiError(msgspec.Struct):
    message: str = ""


class _Delta(msgspec.Struct):
    content: str | None = None


class _StreamChoice(msgspec.Struct):
    delta: _Delta = msgspec.field(default_factory=_Delta)
    finish_reason: str | None = None
    index: int = 0


class _StreamChunk(msgspec.Struct):
    choices: list[_StreamChoice] = []
    usage: _ApiUsage | None = None
    error: _ApiError | str | None = None


class _Message(msgspec.Struct):
    content: str | None = None
    refusal: str | None = None


class _Choice(msgspec.Struct):
    message: _Message = msgspec.field(default_factory=_Message)
    index: int = 0


class _Completion(msgspec.Struct):
    choices: list[_Choice]
    usage: _ApiUsage | None = None


# --------------------------------------------------------------------------------------------
# the agent


def chat_messages(context: AgentContext) -> list[dict[str, str]]:
    """The chat-completions ``messages`` for ``context``: a system message (the session's tier
    and metadata, the recalled memories, the user's preferences), the history as user and
    assistant messages, oldest first, and the user's message last."""
    lines = [
        f"You are {context.agent_id}, an assistant in a conversation with a user.",
        f"Session: tier {context.tier!r}; metadata: {_json(context.session_metadata)}.",
    ]
    if context.memories:
        lines.append("What you remember (most relevant first; use it where it helps, do not recite it):")
        lines.extend(f"- ({memory.scope}) {memory.text}" for memory in context.memories)
    if context.preferences:
        lines.append("The user's preferences:")
        lines.extend(
            f"- {key}: {value if isinstance(value, str) else _json(value)}"
            for key, value in context.preferences.items()
        )
    messages = [{"role": "system", "content": "\n".join(lines)}]
    messages.extend(
        {"role": "assistant" if message.role == "assistant" else "user", "content": message.text}
        for message in context.history
    )
    messages.append({"role": "user", "content": context.message})
    return messages


def _json(value: Any) -> str:
    # metadata and preferences come from JSON; anything else is shown as its str
    return msgspec.json.encode(value, enc_hook=str).decode()


def _estimated_prompt_tokens(messages: list[dict[str, str]]) -> int:
    return sum(estimate_tokens(m["content"]) + _MESSAGE_OVERHEAD_TOKENS for m in messages)


class _OnTheApi:
    """What an agent and an extractor on an OpenAI-compatible API share: the API client they
    close (an ``async with`` closes it too)."""

    _api: _ChatCompletions

    async def aclose(self) -> None:
        """Close the HTTP client this opened (not one it was given); it reopens if used again."""
        await self._api.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class OpenAIAgent(_OnTheApi):
    """An agent answering through an OpenAI-compatible ``POST {base_url}/chat/completions``.

    The reply is streamed (``stream: true``) and yielded piece by piece as the model writes it;
    the last chunk carries the usage the model reported (``stream_options.include_usage``), or,
    from a server that reports none, an estimate (``Usage.estimated``). Each call asks for at
    most ``min(max_tokens, context.max_reply_tokens)`` tokens, so a reply stays within what the
    conversation reserved for it.

    ``timeout`` is in seconds and bounds each wait for the server (connecting, and the next
    piece of the stream), not the whole reply. ``client``: an ``httpx.AsyncClient`` to send
    through (the caller closes it); without one the agent opens its own on first use, which
    :meth:`aclose` closes. Raises :class:`~blackbird.errors.AgentError` (with the HTTP
    ``status`` where there was one) for an HTTP error, a timeout, a refused connection or a
    malformed stream; its message never holds ``api_key``. Calls may run concurrently.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_tokens: int = 512,
        timeout: float = 60.0,
        agent_id: str = "openai",
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.agent_id = agent_id
        self.model = model
        self.max_tokens = max_tokens
        self._api = _ChatCompletions(base_url, api_key, timeout=timeout, agent_id=agent_id, client=client)

    @property
    def url(self) -> str:
        """The chat-completions URL this agent posts to."""
        return self._api.url

    @classmethod
    def from_settings(cls, settings: Settings, *, agent_id: str = "openai") -> OpenAIAgent | None:
        """The agent the ``agent_*`` settings configure, or None when ``agent_base_url`` is unset."""
        if settings.agent_base_url is None:
            return None
        return cls(
            settings.agent_base_url, settings.agent_model, settings.agent_api_key,
            max_tokens=settings.agent_max_tokens, timeout=settings.agent_timeout, agent_id=agent_id,
        )

    def __repr__(self) -> str:
        return f"OpenAIAgent(url={self._api.url!r}, model={self.model!r}, agent_id={self.agent_id!r})"


    async def respond(self, context: AgentContext) -> AsyncGenerator[AgentChunk, None]:
        """The reply to ``context.message``, streamed; the last chunk carries the usage.

        Closing the generator early (``aclose()``, or leaving an ``aclosing`` block) closes the
        HTTP response, which stops the model's generation on servers that notice."""
        messages = chat_messages(context)
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max(1, min(self.max_tokens, context.max_reply_tokens)),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        written: list[str] = []
        reported: _ApiUsage | None = None
        async with self._api.post(body) as response:
            if response.headers.get("content-type", "").startswith("application/json"):
                # a server that ignores ``stream`` answers with one JSON completion
                completion = self._whole(await response.aread())
                text = (completion.choices[0].message.content or "") if completion.choices else ""
                if text:
                    written.append(text)
                    yield AgentChunk(text=text)
                reported = completion.usage
            else:
                async for chunk in self._stream(response):
                    reported = chunk.usage or reported
                    for choice in chunk.choices:
                        if choice.index == 0 and choice.delta.content:
                            written.append(choice.delta.content)
                            yield AgentChunk(text=choice.delta.content)
        if reported is not None:
            usage = Usage(prompt_tokens=reported.prompt_tokens, completion_tokens=reported.completion_tokens)
        else:
            usage = Usage(
                prompt_tokens=_estimated_prompt_tokens(messages),
                completion_tokens=estimate_tokens("".join(written)),
                estimated=True,
            )
        yield AgentChunk(usage=usage)

    async def _stream(self, response: httpx.Response) -> AsyncIterator[_StreamChunk]:
        """The chunks of an SSE stream of chat-completion chunks, up to ``data: [DONE]``."""
        finished = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank lines between events, ``: comments``, ``event:`` and ``id:`` fields
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = msgspec.json.decode(data, type=_StreamChunk)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise self._api.error(f"malformed stream ({exc}): {data[:200]!r}") from None
            if chunk.error is not None:
                said = chunk.error if isinstance(chunk.error, str) else chunk.error.message
                raise self._api.error(f"the model API reported an error in the stream: {said[:300]}")
            finished = finished or any(choice.finish_reason for choice in chunk.choices)
            yield chunk
        if not finished:
            # neither [DONE] nor a finish reason: the connection ended in the middle of the reply
            raise self._api.error("the stream ended before the reply finished (no data: [DONE])")

    def _whole(self, raw: bytes) -> _Completion:
        try:
            return msgspec.json.decode(raw, type=_Completion)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise self._api.error(f"malformed answer ({exc}): {raw[:200]!r}") from None


# --------------------------------------------------------------------------------------------
# the extractor


_ENTITY_TYPES = ("person", "place", "organization", "role", "thing")


class _Statement(msgspec.Struct):
    key: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    text: Annotated[str, msgspec.Meta(min_length=1, max_length=2_000)]
    kind: Literal["fact", "preference"] = "fact"


class _Related(msgspec.Struct):
    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    predicate: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    object: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    subject_type: str = "thing"
    object_type: str = "thing"


_EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "facts": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key": {"type": "string"},
                    "text": {"type": "string"},
                    "kind": {"type": "string", "enum": ["fact", "preference"]},
                },
                "required": ["key", "text", "kind"],
                "additionalProperties": False,
            },
        },
        "relations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "subject": {"type": "string"},
                    "predicate": {"type": "string"},
                    "object": {"type": "string"},
                    "subject_type": {"type": "string", "enum": list(_ENTITY_TYPES)},
                    "object_type": {"type": "string", "enum": list(_ENTITY_TYPES)},
                },
                "required": ["subject", "predicate", "object", "subject_type", "object_type"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["facts", "relations"],
    "additionalProperties": False,
}

_JSON_SCHEMA_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "user_statements", "strict": True, "schema": _EXTRACTION_SCHEMA},
}
_JSON_OBJECT_FORMAT = {"type": "json_object"}

_EXTRACTION_PROMPT = """\
You read one chat message a user wrote and list what the user states about themself, to be \
remembered in later conversations.

Answer with a JSON object: {"facts": [{"key": "...", "text": "...", "kind": "fact" or "preference"}], \
"relations": [{"subject": "...", "predicate": "...", "object": "...", "subject_type": "...", "object_type": "..."}]}.
- Only what the user says about themself: their name, work, home, family, plans, what they have \
or do, what they like or dislike, how they want to be answered. Not questions, requests, guesses, \
or statements about other people or the world.
- key: what the statement is about, the same key whenever the same thing is stated again: \
"name", "lives_in", "from", "works_at", "role", "likes:<thing>" (for liking and disliking it), \
"favourite:<what>", "prefers:<a> vs <b>", or another short snake_case name ("reply_style").
- text: the statement on its own, about "the user", as it should read when recalled in another \
conversation ("The user's name is Ada", "The user does not like coffee").
- kind: "preference" for likes, dislikes and wishes about answers; "fact" for everything else.
- relations: the same statements, and what the message states about the people, places and \
organisations around the user, as subject-predicate-object triples for a knowledge graph. The \
user is the subject "@user". Predicates in snake_case: "named" (object: a name the user goes by), \
"lives_in", "comes_from", "works_at", "works_as", "likes", "dislikes", "prefers", \
"favourite_<what>", "married_to", "reports_to", "sibling_of", "friend_of", or another short one. \
Other people by their name: "my sister Eve lives in Rome" is (@user, sibling_of, Eve) and \
(Eve, lives_in, Rome). Types: person, place, organization, role or thing.
- Nothing stated: {"facts": [], "relations": []}."""

_KEY_CHARACTERS = re.compile(r"[^a-z0-9]+")


def _normal_key(key: str) -> str:
    """``"Favourite Language"`` -> ``favourite_language``; ``"Likes: Dark  Chocolate"`` ->
    ``likes:dark chocolate`` (the kind in snake_case, the thing in single-spaced lower case)."""
    kind, colon, thing = key.lower().partition(":")
    kind = _KEY_CHARACTERS.sub("_", kind).strip("_")
    thing = " ".join(thing.split())
    return f"{kind}:{thing}" if colon and kind and thing else kind


_CODE_FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


class OpenAIExtractor(_OnTheApi):
    """Finds the facts and preferences a user stated about themself, asking an OpenAI-compatible
    chat-completions model for structured JSON.

    It asks for ``response_format`` ``json_schema`` (the answer's shape enforced by the server);
    a server that refuses that (HTTP 400 or 422) is asked again, and from then on, for a
    ``json_object``. Whatever the model answers is validated: an answer that is not the expected
    JSON gives no facts and a warning in the log, and a malformed item is left out, never an
    exception. Keys are normalised to the :class:`~blackbird.agents.learning.RuleExtractor`'s
    form (``name``, ``likes:coffee``): lower case, the part before a colon in snake_case.

    The HTTP call itself can fail: an HTTP error, a timeout or a refused connection raise
    :class:`~blackbird.errors.AgentError` (retrying is the caller's choice; the
    :class:`~blackbird.agents.learning.Learner` logs it and moves on). ``timeout``, ``client``
    and ``api_key`` are as for :class:`OpenAIAgent`.

    It is a :class:`~blackbird.agents.learning.GraphExtractor`: the same answer lists the
    message's relations (:meth:`extract_relations`), so :meth:`extract` and
    :meth:`extract_relations` of one message (one ``user_id`` and ``text``) cost one model call:
    the answer waits in a small cache (the last ``cached`` messages) until both have taken their
    part; asking for a part already taken asks the model again. Relations are validated like
    facts: predicates made snake_case (dropped when nothing is left), "the user"/"I" as subject
    made ``@user``, unknown entity types made ``thing``, malformed items left out.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        max_tokens: int = 512,
        timeout: float = 60.0,
        agent_id: str = "openai-extractor",
        client: httpx.AsyncClient | None = None,
        cached: int = 256,
    ) -> None:
        self.model = model
        self.max_tokens = max_tokens
        self._api = _ChatCompletions(base_url, api_key, timeout=timeout, agent_id=agent_id, client=client)
        self._format: Mapping[str, Any] = _JSON_SCHEMA_FORMAT
        self._cached = cached
        # answers one part of which is still to be taken, by (user id, text)
        self._answers: collections.OrderedDict[tuple[str, str], _Answer] = collections.OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings) -> OpenAIExtractor | None:
        """The extractor on the model the ``agent_*`` settings configure, or None when
        ``agent_base_url`` is unset."""
        if settings.agent_base_url is None:
            return None
        return cls(
            settings.agent_base_url, settings.agent_model, settings.agent_api_key,
            max_tokens=settings.agent_max_tokens, timeout=settings.agent_timeout,
        )

    def __repr__(self) -> str:
        return f"OpenAIExtractor(url={self._api.url!r}, model={self.model!r})"


    async def extract(self, text: str, *, user_id: str) -> list[ExtractedFact]:
        """The facts and preferences ``user_id`` stated about themself in ``text`` (the user id
        is for the log only: it is not sent to the model)."""
        return (await self._answer(text, user_id, "facts")).facts

    async def extract_relations(self, text: str, *, user_id: str) -> list[ExtractedRelation]:
        """The relations ``text`` states, for the knowledge graph (from the same model call as
        :meth:`extract` of the same message)."""
        return (await self._answer(text, user_id, "relations")).relations

    async def _answer(self, text: str, user_id: str, part: Literal["facts", "relations"]) -> _Answer:
        """The model's answer for ``text``: the cached one when ``part`` of it was not taken yet."""
        if not text.strip():
            return _Answer()
        key = (user_id, text)
        answer = self._answers.pop(key, None)
        if answer is None or part in answer.taken:
            answer = await self._ask(text, user_id)
        answer.taken.add(part)
        if len(answer.taken) < 2 and self._cached > 0:
            self._answers[key] = answer  # the other part is yet to be taken
            while len(self._answers) > self._cached:
                self._answers.popitem(last=False)
        return answer

    async def _ask(self, text: str, user_id: str) -> _Answer:
        messages = [{"role": "system", "content": _EXTRACTION_PROMPT}, {"role": "user", "content": text}]
        body: dict[str, Any] = {
            "model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0,
        }
        try:
            content = await self._complete({**body, "response_format": self._format})
        except AgentError as exc:
            if self._format is _JSON_OBJECT_FORMAT or exc.status not in (400, 422):
                raise
            content = await self._complete({**body, "response_format": _JSON_OBJECT_FORMAT})
            # that worked where json_schema did not: the server does not take json_schema
            log.info("extractor_json_schema_refused", url=self._api.url, now="json_object")
            self._format = _JSON_OBJECT_FORMAT
        return _parse(content, user_id=user_id, url=self._api.url)

    async def _complete(self, body: Mapping[str, Any]) -> str | None:
        """The model's answer to ``body`` (None when it gave no usable one, logged)."""
        async with self._api.post(body) as response:
            raw = await response.aread()
        try:
            completion = msgspec.json.decode(raw, type=_Completion)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("extractor_malformed_answer", url=self._api.url, error=str(exc), answer=raw[:200])
            return None
        if not completion.choices:
            log.warning("extractor_answer_without_choices", url=self._api.url)
            return None
        message = completion.choices[0].message
        if message.refusal:
            log.info("extractor_model_refused", url=self._api.url, refusal=message.refusal[:200])
        return message.content


class _Answer(msgspec.Struct):
    """What the model answered for one message, and which parts of it were taken."""

    facts: list[ExtractedFact] = []
    relations: list[ExtractedRelation] = []
    taken: set[str] = set()


def _parse(content: str | None, *, user_id: str, url: str) -> _Answer:
    """The valid facts and relations of the model's JSON ``content`` (empty when it is not the
    JSON asked for: logged)."""
    if not content:
        return _Answer()
    # models asked for a json_object sometimes wrap it in a Markdown code fence anyway
    stripped = _CODE_FENCE.sub("", content.strip())
    try:
        decoded = msgspec.json.decode(stripped)
    except msgspec.DecodeError as exc:
        log.warning("extractor_answer_not_json", url=url, user_id=user_id, error=str(exc),
                    answer=content[:200])
        return _Answer()
    items = decoded.get("facts") if isinstance(decoded, dict) else decoded
    related = decoded.get("relations") if isinstance(decoded, dict) else None
    if not isinstance(items, list) and not isinstance(related, list):
        log.warning("extractor_answer_without_facts", url=url, user_id=user_id,
                    answer=content[:200])
        return _Answer()
    facts = _statements(items if isinstance(items, list) else [], user_id=user_id, url=url)
    relations = _relations(related if isinstance(related, list) else [], user_id=user_id, url=url)
    return _Answer(facts=facts, relations=relations)


def _statements(items: list[Any], *, user_id: str, url: str) -> list[ExtractedFact]:
    """The valid statements of ``items``, keys normalised, the last one of each key."""
    found: dict[str, ExtractedFact] = {}
    for i, item in enumerate(items):
        try:
            statement = msgspec.convert(item, _Statement)
        except msgspec.ValidationError as exc:
            log.warning("extractor_statement_malformed", url=url, user_id=user_id, item=i, error=str(exc))
            continue
        key = _normal_key(statement.key)
        text = statement.text.strip()
        if key and text:
            found.pop(key, None)  # as the rule extractor does: within one message the last word stands
            found[key] = ExtractedFact(key=key, text=text, kind=statement.kind)
    return list(found.values())


#: How models name the user, and the name predicate, besides the forms asked for.
_THE_USER = frozenset({"@user", "user", "the user", "i", "me", "myself", "the author"})
_NAME_PREDICATES = frozenset({"named", "name", "is_named", "called", "is_called", "has_name", "goes_by"})


def _relations(items: list[Any], *, user_id: str, url: str) -> list[ExtractedRelation]:
    """The valid relations of ``items``, normalised (see :class:`OpenAIExtractor`), each once."""
    found: dict[tuple[str, str, str], ExtractedRelation] = {}
    for i, item in enumerate(items):
        try:
            related = msgspec.convert(item, _Related)
        except msgspec.ValidationError as exc:
            log.warning("extractor_relation_malformed", url=url, user_id=user_id, item=i, error=str(exc))
            continue
        predicate = normal_predicate(related.predicate)
        subject, obj = (" ".join(related.subject.split()), " ".join(related.object.split()))
        if predicate is None or not subject or not obj:
            log.info("extractor_relation_dropped", url=url, user_id=user_id, item=i, predicate=related.predicate)
            continue
        predicate = NAMED if predicate in _NAME_PREDICATES else predicate
        subject = USER if subject.lower() in _THE_USER else subject
        obj = USER if obj.lower() in _THE_USER and predicate != NAMED else obj
        relation = ExtractedRelation(
            subject, predicate, obj, _entity_type(related.subject_type), _entity_type(related.object_type)
        )
        found[(subject, predicate, obj.lower())] = relation
    return list(found.values())


def _entity_type(value: str) -> str:
    token = _KEY_CHARACTERS.sub("_", value.strip().lower()).strip("_")
    return token if token in _ENTITY_TYPES else "thing"
