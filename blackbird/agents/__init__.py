"""Agents in sessions: the Agent protocol, the agents that ship, conversations under quotas, learning."""

from blackbird.agents.base import (
    Agent,
    AgentChunk,
    AgentContext,
    AgentReply,
    ContextMemory,
    ContextMessage,
    Usage,
    estimate_tokens,
)

__all__ = [
    "Agent",
    "AgentChunk",
    "AgentContext",
    "AgentReply",
    "ContextMemory",
    "ContextMessage",
    "Usage",
    "estimate_tokens",
]
