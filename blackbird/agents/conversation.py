"""A conversation turn: the user's message, the agent's reply, and the quotas around the model call.

``send_message`` on the client runs one :meth:`Conversation.reply`:

1. the user's message is posted on the session's ``chat`` channel (role "user");
2. the context is built: the session (tier, metadata), the chat's last messages (read from the
   log), memories recalled for the message from the user, tenant and ``agent:<id>`` scopes (a
   scope the user may not read is skipped), and the user's preferences (user-scope memories of
   kind ``"preference"`` recalled for the message), packed into a token budget (the oldest
   history goes first, then the least relevant memories);
3. one atomic admission: the ``send_message`` rate limit, a concurrency slot and a token
   reservation of the prompt's estimate plus the reply's maximum; a refusal raises its typed
   error and no model is called;
4. the agent generates; its text so far is posted live on the ``draft`` channel (a coalescing
   channel: a slow subscriber gets the latest), at most one post in flight, so a fast model's
   tokens are batched; a ``stop`` on the session's ``control`` channel (:meth:`Conversation.stop`,
   from any process) ends generation;
5. the reply is persisted as one ``chat`` message (role "assistant", with the agent, usage, the
   message and memory ids it was given, whether it was stopped, the reservation) and the
   reservation is settled with the real usage (the model's figures, else an estimate); on a
   failure or cancellation the reservation is released uncharged and the error re-raised; the
   slot is given back either way.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import anyio
import anyio.abc
import structlog

from actors.events import MessagePosted
from actors.ports import AggregateKey
from actors.validation import MAX_MEMORY_TEXT, MAX_MESSAGE_LENGTH
from blackbird._errors_group import single_error
from blackbird.agents.base import (
    Agent,
    AgentChunk,
    AgentContext,
    AgentReply,
    ContextMemory,
    ContextMessage,
    Usage,
    estimate_prompt_tokens,
    estimate_tokens,
)
from blackbird.errors import (
    ClosedError,
    EmbedderUnavailableError,
    ReservationNotFoundError,
    ScopeAccessError,
    SessionNotFoundError,
    ValidationError,
)
from blackbird.journal import Journal
from blackbird.memory.service import AsyncMemory
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.streams.subscription import AsyncStreams
from blackbird.types import Memory, Session

__all__ = ["Agents", "Conversation", "ReplyStream"]

log = structlog.get_logger("blackbird.agents")

OPERATION = "send_message"  # the operation admitted (rate limit, slot, reservation)
CHAT = "chat"
DRAFT = "draft"
CONTROL = "control"
STOP = "stop"
_HISTORY_CACHE = 1024  # sessions whose last chat messages this client keeps between turns


class Agents:
    """The agents a client can reply with, by id: ``bb.agents``.

    ``register(agent)`` adds (or replaces) one, ``get(agent_id)`` finds one, ``default`` is the id
    of the agent used when neither the call nor the session names one.
    """

    def __init__(self, default: Agent) -> None:
        self._agents: dict[str, Agent] = {}
        self.register(default)
        self._default = default.agent_id

    def register(self, agent: Agent, *, default: bool = False) -> Agent:
        """Add ``agent`` under its ``agent_id`` (replacing one of the same id); with ``default``
        it becomes the default. Raises ValidationError for an object that is not an Agent."""
        if not isinstance(agent, Agent) or not isinstance(agent.agent_id, str) or not agent.agent_id:
            raise ValidationError(
                f"agent: expected an Agent (an agent_id and respond(context)), got {type(agent).__name__}",
                field="agent", expected="an Agent", got=type(agent).__name__,
            )
        self._agents[agent.agent_id] = agent
        if default:
            self._default = agent.agent_id
        return agent

    def get(self, agent_id: str) -> Agent:
        """The agent registered as ``agent_id``; ValidationError naming ``agent`` if none is."""
        agent = self._agents.get(agent_id) if isinstance(agent_id, str) else None
        if agent is None:
            raise ValidationError(
                f"agent: no agent {agent_id!r} is registered (registered: {', '.join(sorted(self._agents))})",
                field="agent", expected="the id of a registered agent", got=repr(agent_id),
            )
        return agent

    @property
    def default(self) -> str:
        """The id of the default agent."""
        return self._default

    @default.setter
    def default(self, agent_id: str) -> None:
        self._default = self.get(agent_id).agent_id

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._agents))

    def __len__(self) -> int:
        return len(self._agents)

    def __repr__(self) -> str:
        return f"<Agents {sorted(self._agents)} default={self._default!r}>"


class _Drafts:
    """Posts the reply's text so far on ``draft``, one post at a time: text that arrives while a
    post is in flight waits, and only the latest is posted next (a log entry per batch, not per
    token). A failed post is logged and ends drafting; the reply goes on."""

    def __init__(self, post: Callable[[str], Any]) -> None:
        self._post = post
        self._text = ""
        self._posted = ""
        self._wake = anyio.Event()
        self._closing = False
        self._in_flight: anyio.Event | None = None
        self.posts = 0

    def update(self, text: str) -> None:
        self._text = text
        self._wake.set()

    async def run(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake = anyio.Event()
            text = self._text
            if self._closing or text == self._posted or len(text) > MAX_MESSAGE_LENGTH:
                continue
            self._in_flight = anyio.Event()
            try:
                await self._post(text)
                self._posted = text
                self.posts += 1
            except Exception as exc:
                log.warning("draft_post_failed", error=repr(exc))
                self._closing = True
            finally:
                self._in_flight.set()
                self._in_flight = None

    async def finish(self) -> None:
        """No more posts; returns once the one in flight (if any) is durable, so the drafts
        come before the reply in the log."""
        self._closing = True
        self._wake.set()
        if self._in_flight is not None:
            await self._in_flight.wait()


class Conversation:
    """Replies to users' messages in sessions under their quotas (see the module's docs).

    Made by the client (``bb.send_message``, ``bb.stream_message``, ``bb.stop_reply``).
    ``history`` messages of the chat and ``memories`` recalled memories (plus ``preferences``
    preference memories) at most are given to the agent, packed into ``budget_tokens``;
    ``max_reply_tokens`` is what the admission reserves for the reply.
    """

    def __init__(
        self,
        sessions: AsyncSessionManager,
        streams: AsyncStreams,
        memory: Callable[[], AsyncMemory | None],
        agents: Agents,
        *,
        history: int = 20,
        memories: int = 8,
        preferences: int = 5,
        budget_tokens: int = 4096,
        max_reply_tokens: int = 512,
        timeout: float = 10.0,
        journal: Journal | None = None,
    ) -> None:
        """``journal``: history is read from it directly (a few direct gets per turn); without one
        (a client on tenant credentials) through a stream subscription."""
        self._sessions = sessions
        self._streams = streams
        self._journal = journal
        self._memory = memory
        self.agents = agents
        self.history = history
        self.memories = memories
        self.preferences = preferences
        self.budget_tokens = budget_tokens
        self.max_reply_tokens = max_reply_tokens
        self._timeout = timeout
        # per session: the last chat sequence read and its last ``history`` messages, so a turn
        # reads only what was posted since the previous one
        self._histories: collections.OrderedDict[tuple[str, str], tuple[int, collections.deque[ContextMessage]]] = (
            collections.OrderedDict()
        )

    # ------------------------------------------------------------------ the turn

    async def reply(
        self,
        message: str,
        session_id: str | None = None,
        *,
        agent: str | Agent | None = None,
        tenant: str | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> AgentReply:
        """Post ``message``, have the agent answer it under the session's quotas, persist and
        return the reply. ``on_text`` is called with each piece of text as it is generated."""
        session = await self._session(session_id, tenant)
        chosen = self._agent(agent, session)

        async def post() -> int:
            posted = await self._sessions.send_message(
                message, session_id=session.session_id, tenant=session.tenant, author=session.user_id,
                metadata={"role": "user"},
            )
            return int(posted["sequence"])

        # the recalls need not wait for the user's message to be in the log: they run meanwhile
        context, memory_ids, user_seq = await self._context(message, session, chosen.agent_id, post)
        prompt = estimate_prompt_tokens(context)
        admission = await self._sessions.admit(
            session.session_id, OPERATION, costs={"tokens": prompt + context.max_reply_tokens},
            rate=True, slot=True, reserve=True, tenant=session.tenant,
        )
        bound = log.bind(tenant=session.tenant, session_id=session.session_id, agent_id=chosen.agent_id)
        usage: Usage | None = None
        try:
            text, reported, stopped = await self._generate(chosen, context, user_seq, on_text)
            usage = reported or Usage(prompt_tokens=prompt, completion_tokens=estimate_tokens(text), estimated=True)
            metadata = {
                "role": "assistant", "agent_id": chosen.agent_id,
                "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                          "estimated": usage.estimated},
                "message_ids": [m.id for m in context.history],
                "memory_ids": memory_ids,
                "stopped": stopped, "reservation_id": admission.reservation_id, "reply_to": f"{user_seq}-0",
            }
            if len(text) > MAX_MESSAGE_LENGTH:
                text, metadata["truncated"] = text[:MAX_MESSAGE_LENGTH], True
            persisted = await self._sessions.send_message(
                text, session_id=session.session_id, tenant=session.tenant, metadata=metadata,
            )
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self._timeout):
                await self._release(session, admission.reservation_id, admission.lease_id, usage, bound)
        bound.debug("agent_replied", sequence=persisted["sequence"], tokens=usage.total_tokens, stopped=stopped)
        return AgentReply(
            text=text, session_id=session.session_id, agent_id=chosen.agent_id, usage=usage,
            message_ids=tuple(m.id for m in context.history), memory_ids=tuple(memory_ids),
            sequence=persisted["sequence"], stopped=stopped,
        )

    def stream(
        self,
        tasks: anyio.abc.TaskGroup,
        message: str,
        session_id: str | None = None,
        *,
        agent: str | Agent | None = None,
        tenant: str | None = None,
    ) -> ReplyStream:
        """The reply's text as generated (``async for piece in ...``); the reply then in ``.reply``."""
        return ReplyStream(self, tasks, message, session_id, agent=agent, tenant=tenant)

    async def stop(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Ask the session's ongoing generation to stop: ``stop`` on its ``control`` channel (in
        the log, so a generation in any process sees it). Returns where the request landed."""
        return await self._sessions.send_message(
            STOP, session_id=session_id, tenant=tenant, channel=CONTROL, metadata={"action": STOP},
        )

    # ------------------------------------------------------------------ steps

    async def _session(self, session_id: str | None, tenant: str | None) -> Session:
        if session_id is None:
            current = self._sessions.current_session
            if current is None:
                raise ValidationError(
                    "session_id: expected a session id (this client has created no session yet)",
                    field="session_id", expected="a session id", got=None,
                )
            current_tenant, session_id = current
            tenant = current_tenant if tenant is None else tenant
        session = await self._sessions.get_session(session_id, tenant=tenant)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id, tenant=tenant)
        return session

    def _agent(self, agent: str | Agent | None, session: Session) -> Agent:
        if agent is None:
            assigned = getattr(session, "agent_id", None)  # a hand-over assigns the session an agent
            return self.agents.get(assigned if assigned else self.agents.default)
        if isinstance(agent, str):
            return self.agents.get(agent)
        if not isinstance(agent, Agent):
            raise ValidationError(
                f"agent: expected an agent id or an Agent, got {type(agent).__name__}",
                field="agent", expected="an agent id or an Agent", got=type(agent).__name__,
            )
        return agent

    async def _context(
        self, message: str, session: Session, agent_id: str, post: Callable[[], Awaitable[int]]
    ) -> tuple[AgentContext, list[str], int]:
        """The agent's context, the ids of the memories in it (the recalled, then the preferences)
        and the sequence of the user's message, which ``post`` appends while memories are recalled."""
        history: list[ContextMessage] = []
        recalled: list[Memory] = []
        preferences: list[Memory] = []
        user_seq = 0

        async def read_history() -> None:
            nonlocal user_seq
            user_seq = await post()
            history.extend(await self._history(session, user_seq))

        async def recall() -> None:
            scopes = ["user", "tenant", f"agent:{agent_id}"]
            recalled.extend(await self._recall(message, session, scopes, self.memories))

        async def recall_preferences() -> None:
            preferences.extend(await self._recall(message, session, ["user"], self.preferences, kind="preference"))

        with single_error():
            async with anyio.create_task_group() as tg:
                tg.start_soon(read_history)
                if self._memory() is not None and message.strip():
                    tg.start_soon(recall)
                    if self.preferences:
                        tg.start_soon(recall_preferences)
        preferred = {m.memory_id for m in preferences}
        memories = [
            ContextMemory(memory_id=m.memory_id, text=m.text, scope=m.scope, score=m.score or 0.0)
            for m in recalled if m.memory_id not in preferred
        ]
        prefs = {m.key or m.memory_id: m.text for m in preferences}
        history, memories = _pack(message, prefs, history, memories, self.budget_tokens)
        context = AgentContext(
            tenant=session.tenant, session_id=session.session_id, user_id=session.user_id, tier=session.tier,
            agent_id=agent_id, message=message, history=tuple(history), memories=tuple(memories),
            preferences=prefs, session_metadata=dict(session.metadata), max_reply_tokens=self.max_reply_tokens,
            budget_tokens=self.budget_tokens,
        )
        return context, [m.memory_id for m in memories] + [m.memory_id for m in preferences], user_seq

    async def _history(self, session: Session, user_seq: int) -> list[ContextMessage]:
        """The chat's last ``history`` messages before the user's (sequence ``user_seq``), read
        from the log: since the previous turn's read when this client made one, else from the start."""
        if self.history <= 0:
            return []
        key = (session.tenant, session.session_id)
        after, kept = self._histories.pop(key, (0, collections.deque(maxlen=self.history)))
        if after >= user_seq - 1:  # another turn of this session read as far or further already
            after, kept = 0, collections.deque(maxlen=self.history)
        with anyio.fail_after(self._timeout):
            if self._journal is not None and user_seq > after + 1:
                key_ = AggregateKey(session.tenant, "session", session.session_id)
                for seq, commit in await self._journal.read(key_, after, until_seq=user_seq - 1):
                    index = 0
                    for posted in commit.events:
                        if not isinstance(posted, MessagePosted):
                            continue
                        if posted.channel == CHAT:
                            kept.append(ContextMessage(
                                id=f"{seq}-{index}", role=str(posted.metadata.get("role", "user")), text=posted.text,
                                author=posted.author, at=posted.at,
                            ))
                        index += 1
            elif self._journal is None:
                async with self._streams.subscribe(
                    session.session_id, channels=[CHAT], after=after or None, tenant=session.tenant,
                    critical=(), coalesce=(),
                ) as messages:
                    async for event in messages:
                        if event.sequence >= user_seq:
                            break
                        kept.append(ContextMessage(
                            id=event.id, role=str(event.metadata.get("role", "user")), text=event.text, at=event.at,
                        ))
        self._histories[key] = (user_seq - 1, kept)  # the user's message is read next turn
        while len(self._histories) > _HISTORY_CACHE:
            self._histories.popitem(last=False)
        return list(kept)

    async def _recall(
        self, message: str, session: Session, scopes: list[str], k: int, *, kind: str | None = None
    ) -> list[Memory]:
        """Memories recalled for ``message`` from ``scopes``: a scope the user may not read is
        skipped; no memory at all if the embedder cannot be loaded (logged)."""
        memory = self._memory()
        if memory is None or k <= 0:
            return []
        query = message[:MAX_MEMORY_TEXT]
        wanted = list(scopes)
        while wanted:
            try:
                return await memory.recall(
                    query, session_id=session.session_id, scopes=wanted, k=k, tenant=session.tenant,
                    filters=None if kind is None else {"kind": kind},
                )
            except ScopeAccessError as exc:
                if exc.scope not in wanted:
                    raise
                wanted.remove(exc.scope)
            except EmbedderUnavailableError as exc:
                log.warning("agent_context_without_memories", error=str(exc))
                return []
        return []

    async def _generate(
        self, agent: Agent, context: AgentContext, user_seq: int, on_text: Callable[[str], None] | None,
    ) -> tuple[str, Usage | None, bool]:
        """Run the agent, drafting its text live and watching for a stop; (text, usage, stopped)."""
        pieces: list[str] = []
        usage: Usage | None = None
        stopped = False
        generating = anyio.CancelScope()
        draft_meta = {"role": "assistant", "agent_id": agent.agent_id, "reply_to": f"{user_seq}-0"}

        async def post_draft(text: str) -> None:
            await self._sessions.send_message(
                text, session_id=context.session_id, tenant=context.tenant, channel=DRAFT, metadata=draft_meta,
            )

        def stop_now() -> None:
            nonlocal stopped
            stopped = True
            generating.cancel()

        async def watch_stop() -> None:
            # from the user's message on: a stop posted before this watch is ready counts too
            try:
                if self._journal is None:
                    async with self._streams.subscribe(
                        context.session_id, channels=[CONTROL], after=user_seq, tenant=context.tenant,
                    ) as requests:
                        async for request in requests:
                            if request.text == STOP:
                                return stop_now()
                    return
                # no consumer per turn: the session's publishes, after a read of what is logged already
                journal = self._journal
                async with journal.published(journal.subjects.session(context.tenant, context.session_id)) as live:
                    key = AggregateKey(context.tenant, "session", context.session_id)
                    if any(_asks_stop(commit) for _, commit in await journal.read(key, user_seq)):
                        return stop_now()
                    async for commit in live:
                        if _asks_stop(commit):
                            return stop_now()
            except Exception as exc:  # the reply goes on; only a stop from elsewhere is missed
                log.warning("stop_watch_failed", session_id=context.session_id, error=repr(exc))

        drafts = _Drafts(post_draft)
        with single_error():  # the agent's own error leaves as itself
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch_stop)
                tg.start_soon(drafts.run)
                with generating:
                    async with contextlib.aclosing(_chunks(agent, context)) as chunks:
                        async for chunk in chunks:
                            if chunk.usage is not None:
                                usage = chunk.usage
                            if chunk.text:
                                pieces.append(chunk.text)
                                drafts.update("".join(pieces))
                                if on_text is not None:
                                    on_text(chunk.text)
                await drafts.finish()
                tg.cancel_scope.cancel()
        return "".join(pieces), usage, stopped

    async def _release(
        self, session: Session, reservation_id: str | None, lease_id: str | None, usage: Usage | None, bound: Any,
    ) -> None:
        """Settle the reservation (``usage``; None: released uncharged) and give the slot back."""

        async def settle() -> None:
            if reservation_id is None:
                return
            actual = None if usage is None else {"tokens": float(usage.total_tokens)}
            try:
                await self._sessions.settle(session.session_id, reservation_id, actual, tenant=session.tenant)
            except ReservationNotFoundError:  # the hold expired during a long generation: charge it anyway
                if actual:
                    await self._sessions.track_usage(
                        session.session_id, OPERATION, "tokens", actual["tokens"], tenant=session.tenant,
                    )

        async def release() -> None:
            if lease_id is not None:
                await self._sessions.release_slot(session.session_id, OPERATION, lease_id, tenant=session.tenant)

        async def guarded(step: Callable[[], Awaitable[None]]) -> None:
            try:
                await step()
            except Exception as exc:  # the reply (or the error being raised) matters more
                bound.warning("agent_release_failed", step=step.__name__, error=repr(exc))

        # together: the session's actor takes both in one commit
        async with anyio.create_task_group() as tg:
            tg.start_soon(guarded, settle)
            tg.start_soon(guarded, release)


def _asks_stop(commit: Any) -> bool:
    """Whether a commit holds a stop request (``stop`` on the ``control`` channel)."""
    return any(isinstance(e, MessagePosted) and e.channel == CONTROL and e.text == STOP for e in commit.events)


async def _chunks(agent: Agent, context: AgentContext) -> AsyncGenerator[AgentChunk, None]:
    """The agent's chunks (a generator of our own, so closing it closes the agent's)."""
    chunks = agent.respond(context)
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        close = getattr(chunks, "aclose", None)  # an async generator's; a plain iterator has none
        if close is not None:
            await close()


def _pack(
    message: str, preferences: dict[str, str], history: list[ContextMessage], memories: list[ContextMemory],
    budget: int,
) -> tuple[list[ContextMessage], list[ContextMemory]]:
    """History and memories within ``budget`` tokens with the message and preferences: the
    oldest messages go first, then the least relevant memories (``memories`` is best first)."""
    fixed = estimate_tokens(message) + sum(estimate_tokens(f"{k}: {v}") for k, v in preferences.items())
    history, memories = list(history), list(memories)
    total = fixed + sum(estimate_tokens(m.text) for m in history) + sum(estimate_tokens(m.text) for m in memories)
    while total > budget and history:
        total -= estimate_tokens(history.pop(0).text)
    while total > budget and memories:
        total -= estimate_tokens(memories.pop().text)
    return history, memories


class ReplyStream:
    """The reply's text as it is generated: ``async for piece in bb.stream_message(...)``; once
    iterated to the end, ``reply`` is the persisted :class:`AgentReply`. The turn runs in the
    client's task group; leaving the loop early (or being cancelled) cancels it, which releases
    its reservation and slot."""

    def __init__(
        self, conversation: Conversation, tasks: anyio.abc.TaskGroup, message: str, session_id: str | None,
        *, agent: str | Agent | None, tenant: str | None,
    ) -> None:
        self._conversation = conversation
        self._tasks = tasks
        self._call = (message, session_id, agent, tenant)
        self._reply: AgentReply | None = None
        self._started = False

    @property
    def reply(self) -> AgentReply:
        """The persisted reply; ClosedError before the stream was iterated to its end."""
        if self._reply is None:
            raise ClosedError("the reply is not complete: iterate the stream to its end first")
        return self._reply

    async def __aiter__(self) -> AsyncGenerator[str, None]:
        if self._started:
            raise ClosedError("a reply stream can be iterated once")
        self._started = True
        message, session_id, agent, tenant = self._call
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        scope = anyio.CancelScope()
        done = anyio.Event()
        failure: list[BaseException] = []

        def on_text(piece: str) -> None:
            with contextlib.suppress(anyio.BrokenResourceError):  # the reader left: the turn is being cancelled
                send.send_nowait(piece)

        async def produce() -> None:
            try:
                with scope, send:
                    self._reply = await self._conversation.reply(
                        message, session_id, agent=agent, tenant=tenant, on_text=on_text,
                    )
            except Exception as exc:
                failure.append(exc)
            finally:
                done.set()

        self._tasks.start_soon(produce)
        try:
            async with receive:
                async for piece in receive:
                    yield piece
            with anyio.CancelScope(shield=True):
                await done.wait()
            if failure:
                raise failure[0]
        finally:
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await done.wait()

