"""What an agent is to Blackbird: given a context, it yields text (the one protocol every agent implements).

An :class:`Agent` is handed an :class:`AgentContext` (the session, the last messages of its chat,
recalled memories and the user's preferences, packed into a token budget) and yields
:class:`AgentChunk` s: pieces of the reply's text as they are generated, and, last, the usage the
model reported (when it reports any). Blackbird does everything around the call: admission under
the session's quotas, recording what the agent was given, streaming the chunks to subscribers,
persisting the reply, settling the reservation (:mod:`blackbird.agents.conversation`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import msgspec

__all__ = [
    "Agent",
    "AgentChunk",
    "AgentContext",
    "AgentReply",
    "ContextMemory",
    "ContextMessage",
    "Usage",
    "estimate_prompt_tokens",
    "estimate_tokens",
]


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Tokens a model call used (as the model API reported them, else estimated)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False  # True: counted by Blackbird's estimate, not reported by the model

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ContextMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One message of the session's chat the agent is given."""

    id: str  # the stream event id, "<sequence>-<index>"
    role: str  # "user" (a person's message) or "assistant" (an agent's reply)
    text: str
    author: str | None = None
    at: float = 0.0


class ContextMemory(msgspec.Struct, frozen=True, kw_only=True):
    """One recalled memory the agent is given."""

    memory_id: str
    text: str
    scope: str  # "user", "tenant", "agent", ...
    score: float = 0.0


class AgentContext(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the agent is given for one reply; what was used is recorded with the reply."""

    tenant: str
    session_id: str
    user_id: str
    tier: str
    agent_id: str
    message: str  # the user's message being answered
    history: tuple[ContextMessage, ...] = ()  # the chat's last messages, oldest first (not ``message``)
    memories: tuple[ContextMemory, ...] = ()  # most relevant first
    preferences: dict[str, Any] = {}
    session_metadata: dict[str, Any] = {}
    max_reply_tokens: int = 512
    budget_tokens: int = 4096  # what the prompt was packed into


class AgentChunk(msgspec.Struct, frozen=True, kw_only=True):
    """A piece of a reply: ``text`` as generated; the last chunk may carry the model's ``usage``."""

    text: str = ""
    usage: Usage | None = None


class AgentReply(msgspec.Struct, frozen=True, kw_only=True):
    """An agent's reply, as persisted in the session's log."""

    text: str
    session_id: str
    agent_id: str
    usage: Usage
    message_ids: tuple[str, ...]  # the chat messages the agent was given
    memory_ids: tuple[str, ...]  # the memories the agent was given
    sequence: int  # stream sequence of the commit holding the reply
    stopped: bool = False  # generation was stopped before the agent finished


@runtime_checkable
class Agent(Protocol):
    """An agent: ``respond(context)`` yields the reply's text in chunks (an async generator)."""

    agent_id: str

    def respond(self, context: AgentContext) -> AsyncIterator[AgentChunk]:
        """The reply to ``context.message``, piece by piece; may end with a chunk carrying usage."""
        ...


def estimate_tokens(text: str) -> int:
    """A conservative token estimate (about four characters a token, at least one for any text)."""
    return 0 if not text else max(1, (len(text) + 3) // 4)


def estimate_prompt_tokens(context: AgentContext) -> int:
    """The estimated tokens of everything ``context`` gives the agent: the message, the history,
    the memories and the preferences (what a reply's admission reserves besides the reply)."""
    return (
        estimate_tokens(context.message)
        + sum(estimate_tokens(m.text) for m in context.history)
        + sum(estimate_tokens(m.text) for m in context.memories)
        + sum(estimate_tokens(f"{k}: {v}") for k, v in context.preferences.items())
    )
