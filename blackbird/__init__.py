"""Blackbird: durable, event-sourced sessions for AI agents on NATS JetStream.

>>> from blackbird import BlackbirdSDK
>>> sdk = BlackbirdSDK(development_mode=True)
>>> session = sdk.session_manager.create_session(user_id="user123", tier="pro")
"""

from importlib.metadata import PackageNotFoundError, version

from actors.policy import QuotaType, RateLimitType
from blackbird.audit.replay import Auditor, AuditReport
from blackbird._client import AsyncBlackbird
from blackbird.memory.service import AsyncMemory
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.streams.subscription import AsyncStreams, StreamEvent, Subscription
from blackbird._sync import BlackbirdSDK, SessionManager
from blackbird.config import Settings
from blackbird.errors import (
    BlackbirdError,
    ClosedError,
    CommandTimeoutError,
    ConcurrencyConflictError,
    DecryptionError,
    EmbeddedServerError,
    EmbedderError,
    EmbedderUnavailableError,
    EmbeddingModelMismatchError,
    LogError,
    MemoryIndexBusyError,
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
from blackbird.types import Admission, Memory, Session, SessionStatus, UsageRecord

__all__ = [
    "Admission",
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
    "ConcurrencyConflictError",
    "DecryptionError",
    "EmbeddedServerError",
    "EmbedderError",
    "EmbedderUnavailableError",
    "EmbeddingModelMismatchError",
    "LogError",
    "Memory",
    "MemoryIndexBusyError",
    "PayloadTooLargeError",
    "ProjectionTimeoutError",
    "QuotaExceededError",
    "QuotaType",
    "RateLimitError",
    "RateLimitType",
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

try:
    __version__ = version("blackbird-sdk")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"
