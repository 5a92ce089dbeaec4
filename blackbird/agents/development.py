"""The development agent: answers from the recalled memories, with no model (offline, deterministic).

It is not an AI: it calls no model and understands nothing. It exists so that conversations,
quotas around them, streaming, stop and learning can be used and tested anywhere, with no model
API and no key: the default agent of a client whose settings name no other (``agent_base_url``).
Given the same context it gives the same reply, in a few chunks, with an estimated usage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio.lowlevel

from blackbird.agents.base import AgentChunk, AgentContext, Usage, estimate_prompt_tokens, estimate_tokens

__all__ = ["DevelopmentAgent"]

NOTHING_RECALLED = "I don't remember anything about that yet. Tell me, and I will remember it."


class DevelopmentAgent:
    """An offline agent for development and tests: replies with what it recalls, no model.

    The reply is ``"From what I remember: <memory>; <memory>."`` made of the (at most
    ``max_memories``) most relevant recalled memories, or :data:`NOTHING_RECALLED` when nothing
    was recalled. It is yielded in pieces of about ``words_per_chunk`` words, giving the event
    loop a turn between pieces (so the reply streams as a model's would); the last chunk carries
    the usage, estimated from the context and the reply (``Usage.estimated`` is True).
    """

    def __init__(self, agent_id: str = "development", *, max_memories: int = 3, words_per_chunk: int = 4) -> None:
        self.agent_id = agent_id
        self.max_memories = max_memories
        self.words_per_chunk = max(1, words_per_chunk)

    def answer(self, context: AgentContext) -> str:
        """The whole reply to ``context`` (what :meth:`respond` yields in pieces)."""
        recalled = [m.text.strip().rstrip(".") for m in context.memories[: self.max_memories] if m.text.strip()]
        if not recalled:
            return NOTHING_RECALLED
        return "From what I remember: " + "; ".join(recalled) + "."

    async def respond(self, context: AgentContext) -> AsyncIterator[AgentChunk]:
        """The reply in pieces of a few words, then the estimated usage."""
        text = self.answer(context)
        words = text.split(" ")
        for start in range(0, len(words), self.words_per_chunk):
            piece = " ".join(words[start : start + self.words_per_chunk])
            yield AgentChunk(text=piece if start == 0 else " " + piece)
            await anyio.lowlevel.checkpoint()  # a turn for the others, as a model's network wait would
        yield AgentChunk(usage=Usage(
            prompt_tokens=estimate_prompt_tokens(context), completion_tokens=estimate_tokens(text), estimated=True,
        ))

    def __repr__(self) -> str:
        return f"<DevelopmentAgent {self.agent_id!r}>"
