"""Mistakes the type checker must catch in code using the synchronous facade.

Each line below is wrong, and its ``# type: ignore[code]`` names the error mypy has to report.
``mypy --strict`` warns about an ignore that silences nothing, so this file type-checks only
while mypy sees every one of these mistakes (a facade whose methods it cannot see would turn the
``arg-type`` and ``call-arg`` errors into others). Nothing here runs.
"""

from __future__ import annotations

from blackbird import BlackbirdSDK, RateLimitError


def mistakes(sdk: BlackbirdSDK) -> None:
    sm = sdk.session_manager
    sm.create_session(123)  # type: ignore[arg-type]
    sm.create_sesion("user123")  # type: ignore[attr-defined]
    sm.track_usage("s1", "chat", "tokens", "150")  # type: ignore[arg-type]
    slots: str = sm.manage_concurrency("s1", "upload", True)  # type: ignore[assignment]
    sdk.memory.recall("Who is my boss?")  # type: ignore[call-arg]
    sdk.audit.replay("s1")  # type: ignore[call-arg]
    with sdk.streams.subscribe("s1", chanels=["chat"]):  # type: ignore[call-arg]
        pass
    sdk.close(now=True)  # type: ignore[call-arg]
    print(slots)


def misread_error(error: RateLimitError) -> float:
    return error.retry_after  # type: ignore[return-value]
