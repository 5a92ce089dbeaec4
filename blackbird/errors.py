"""Every error Blackbird raises, under one base class.

Each error carries structured fields (``field``, ``used``, ``limit``, ...) as well as a message
that says what happened, which input, and what was expected.  Errors that cross the wire (an
actor host answering over NATS) are rebuilt from their ``code`` by :func:`error_from_rejection`.
"""

from __future__ import annotations

from typing import Any

from actors.ports import CommitTooLarge


class BlackbirdError(Exception):
    """Base class of every error raised by Blackbird."""

    code = "blackbird_error"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        for name, value in fields.items():
            setattr(self, name, value)
        self.fields = fields


class ValidationError(BlackbirdError, ValueError):
    """An argument was malformed. ``field`` names it, ``expected`` says what was expected."""

    code = "validation_error"

    def __init__(self, message: str, *, field: str, expected: str, got: Any = None) -> None:
        super().__init__(message, field=field, expected=expected, got=got)


class PayloadTooLargeError(ValidationError, CommitTooLarge):
    """An encoded command or event exceeds the configured maximum payload size."""

    code = "payload_too_large"


class SessionNotFoundError(BlackbirdError, LookupError):
    """The session id is unknown in this tenant."""

    code = "session_not_found"


class SessionExistsError(BlackbirdError):
    """A session with this id already exists."""

    code = "session_exists"


class SessionInactiveError(BlackbirdError):
    """The session was terminated or has expired (idle timeout or maximum age); ``reason`` says which."""

    code = "session_inactive"


class ConcurrencyConflictError(BlackbirdError):
    """Another writer kept winning the race for an aggregate; the command was not applied."""

    code = "concurrency_conflict"


class QuotaExceededError(BlackbirdError):
    """A quota would be exceeded; nothing was counted."""

    code = "quota_exceeded"


class SessionLimitError(QuotaExceededError):
    """The user already holds the most open sessions their tier allows (``used``, ``limit``)."""

    code = "session_limit"


class RateLimitError(BlackbirdError):
    """A rate or concurrency limit was hit; ``retry_after`` is in seconds."""

    code = "rate_limited"


class ReservationNotFoundError(BlackbirdError, LookupError):
    """The reservation is not held: it expired, was already settled, or never existed."""

    code = "reservation_not_found"


class CommandTimeoutError(BlackbirdError, TimeoutError):
    """No actor host answered in time. The command may or may not have been applied; retry it
    with the same command id to find out without applying it twice."""

    code = "command_timeout"


class ProjectionTimeoutError(BlackbirdError, TimeoutError):
    """A read model did not reach the caller's last write in time (``wanted``, ``applied``)."""

    code = "projection_timeout"


class EmbeddedServerError(BlackbirdError):
    """The embedded nats-server could not be found, started or reached."""

    code = "embedded_server_error"


class LogError(BlackbirdError):
    """The JetStream log refused or failed an operation."""

    code = "log_error"


class ClosedError(BlackbirdError):
    """The client was used after ``close()``."""

    code = "closed"


class DecryptionError(BlackbirdError, ValueError):
    """A sealed blob could not be opened with the user's key although the key still exists: it
    was altered or truncated, sealed for another ``aad``, or is not a sealed blob at all.
    ``tenant`` and ``user_id`` name the key, ``reason`` says what failed."""

    code = "decryption_failed"
    tenant: str
    user_id: str
    reason: str  # "malformed" or "authentication_failed"

    def __init__(self, message: str, *, tenant: str, user_id: str, reason: str) -> None:
        super().__init__(message, tenant=tenant, user_id=user_id, reason=reason)


class EmbedderUnavailableError(BlackbirdError):
    """The embedding model cannot be loaded (weights or a library missing); the message says how
    to install it."""

    code = "embedder_unavailable"


class EmbedderError(BlackbirdError):
    """An embedding request failed or its answer was unusable: ``url``, ``reason``, the HTTP
    ``status`` when there was one, ``expected`` and ``got`` when the answer had the wrong shape."""

    code = "embedder_error"
    url: str
    reason: str
    status: int | None
    expected: Any
    got: Any

    def __init__(
        self,
        message: str,
        *,
        url: str,
        reason: str,
        status: int | None = None,
        expected: Any = None,
        got: Any = None,
    ) -> None:
        super().__init__(message, url=url, reason=reason, status=status, expected=expected, got=got)


class ScopeAccessError(BlackbirdError, PermissionError):
    """The acting session's user does not belong to the scope."""

    code = "scope_access"


class EmbeddingModelMismatchError(BlackbirdError):
    """The tenant's memories were embedded with another model than this client's embedder."""

    code = "embedding_model_mismatch"


class MemoryIndexBusyError(BlackbirdError):
    """Another client (``path``) already maintains the memory index folder given as
    ``memory_dir``: one writer per folder."""

    code = "memory_index_busy"


_BY_CODE: dict[str, type[BlackbirdError]] = {
    cls.code: cls
    for cls in (
        BlackbirdError,
        ValidationError,
        PayloadTooLargeError,
        SessionNotFoundError,
        SessionExistsError,
        SessionInactiveError,
        ConcurrencyConflictError,
        QuotaExceededError,
        SessionLimitError,
        RateLimitError,
        ReservationNotFoundError,
        CommandTimeoutError,
        ProjectionTimeoutError,
        EmbeddedServerError,
        LogError,
        ClosedError,
        DecryptionError,
        EmbedderUnavailableError,
        EmbedderError,
        ScopeAccessError,
        EmbeddingModelMismatchError,
        MemoryIndexBusyError,
    )
}


def error_from_code(code: str, message: str, fields: dict[str, Any]) -> BlackbirdError:
    """Rebuild a typed error from its wire form (code, message, structured fields)."""
    cls = _BY_CODE.get(code, BlackbirdError)
    err = cls.__new__(cls)
    BlackbirdError.__init__(err, message, **fields)
    return err


def field_of(exc: Exception, default: str) -> str:
    """The field path msgspec names in a validation error (``$.a.b`` -> ``a.b``), else ``default``."""
    text = str(exc)
    if "`$." not in text:
        return default
    return text.rsplit("`$.", 1)[-1].split("`", 1)[0] or default
