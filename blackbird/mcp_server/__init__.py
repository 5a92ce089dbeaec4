"""Blackbird as an MCP server (Model Context Protocol), built on the official ``mcp`` SDK.

* :func:`mcp_server` — the tools (memory: remember, recall, relate, neighbors, facts_about,
  forget; session: session_info, quota_status) of one session, each call admitted under that
  session's quotas and rate limits and recorded in the log before it runs.
* :class:`JetStreamEventStore` — the SDK's ``EventStore`` kept in a JetStream stream, so a
  streamable-HTTP client can resume (``Last-Event-ID``) across a restart of ``serve``.

``blackbird mcp --session-id S`` serves it on stdio; ``blackbird serve --http`` at
``/v1/sessions/{session_id}/mcp`` (:mod:`blackbird.http.mcp_api`).
"""

from __future__ import annotations

from blackbird.mcp_server.event_store import Connection, JetStreamEventStore, bound_connection
from blackbird.mcp_server.tools import TOOLS, Target, bound_target, mcp_server

__all__ = ["TOOLS", "Connection", "JetStreamEventStore", "Target", "bound_connection", "bound_target", "mcp_server"]
