"""Blackbird: durable, event-sourced sessions for AI agents on NATS JetStream.

>>> from blackbird import BlackbirdSDK
>>> sdk = BlackbirdSDK(development_mode=True)
>>> session = sdk.session_manager.create_session(user_id="user123", tier="pro")
"""

import typing
from importlib.metadata import PackageNotFoundError, version

from actors.events import ApiKeyRole
from actors.policy import QuotaType, RateLimitType
from blackbird._client import AsyncBlackbird
from blackbird._sync import BlackbirdSDK, SessionManager
from blackbird.audit.replay import Auditor, AuditReport
from blackbird.config import Settings
from blackbird.errors import (
    AccessDeniedError,
    AgentError,
    AggregateFaultError,
    ApiKeyNotFoundError,
    BlackbirdError,
    ClosedError,
    CommandIdReusedError,
    CommandTimeoutError,
    ConcurrencyConflictError,
    DecryptionError,
    EmbeddedServerError,
    EmbedderError,
    EmbedderUnavailableError,
    EmbeddingModelMismatchError,
    EntityNotFoundError,
    LogError,
    MemoryIndexBusyError,
    NatsAuthError,
    PayloadTooLargeError,
    ProjectionTimeoutError,
    QuotaExceededError,
    RateLimitError,
    ReservationNotFoundError,
    ScopeAccessError,
    SessionExistsError,
    SessionInactiveError,
    SessionLimitError,
    SessionNotFoundError,
    ValidationError,
)
from blackbird.memory.service import AsyncMemory
from blackbird.sessions.api_keys import ApiKey, ApiKeys, IssuedApiKey
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.streams.subscription import AsyncStreams, StreamEvent, Subscription
from blackbird.types import Admission, Entity, Memory, Neighbor, Relation, Session, SessionStatus, UsageRecord

__all__ = [
    "AccessDeniedError",
    "Admission",
    "AgentError",
    "AggregateFaultError",
    "ApiKey",
    "ApiKeyNotFoundError",
    "ApiKeyRole",
    "ApiKeys",
    "AsyncBlackbird",
    "AsyncMemory",
    "AsyncSessionManager",
    "AsyncStreams",
    "AuditReport",
    "Auditor",
    "BlackbirdError",
    "BlackbirdSDK",
    "ClosedError",
    "CommandTimeoutError",
    "CommandIdReusedError",
    "ConcurrencyConflictError",
    "DecryptionError",
    "EmbeddedServerError",
    "EmbedderError",
    "EmbedderUnavailableError",
    "EmbeddingModelMismatchError",
    "IssuedApiKey",
    "LogError",
    "Entity",
    "Memory",
    "Neighbor",
    "Relation",
    "MemoryIndexBusyError",
    "NatsAuthError",
    "PayloadTooLargeError",
    "ProjectionTimeoutError",
    "QuotaExceededError",
    "QuotaType",
    "RateLimitError",
    "RateLimitType",
    "EntityNotFoundError",
    "ReservationNotFoundError",
    "ScopeAccessError",
    "Session",
    "SessionExistsError",
    "SessionInactiveError",
    "SessionLimitError",
    "SessionManager",
    "SessionNotFoundError",
    "SessionStatus",
    "Settings",
    "StreamEvent",
    "Subscription",
    "UsageRecord",
    "ValidationError",
]



def _publish(names: list[str], namespace: dict[str, object]) -> None:
    """Make each public name report this package as its module, as httpx does: reprs, pickles,
    tracebacks and docs then say ``blackbird.Session``, not the private module that defines it.

    A class's annotations are resolved first, in the module that wrote them: typing.get_type_hints
    and msgspec look names in annotations up in ``__module__``, where the names that module
    imported (``Any``, ``Path``, ...) are not.
    """
    for name in names:
        obj = namespace[name]
        if isinstance(obj, type) and "__annotations__" in vars(obj):
            try:
                hints = typing.get_type_hints(obj, include_extras=True)
            except NameError:  # a name imported only for type checkers: left as written
                pass
            else:
                obj.__annotations__ = {key: hints[key] for key in vars(obj)["__annotations__"]}
        obj.__module__ = __name__


_publish(__all__, globals())
del _publish

try:
    __version__ = version("blackbird-sdk")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
