"""Every error Blackbird raises, under one base class.

The tree (a second base, in brackets, lets ``except ValueError`` and the like catch it too)::

    BlackbirdError
    ├── ValidationError [ValueError]
    │   └── PayloadTooLargeError
    ├── SessionNotFoundError [LookupError]
    ├── SessionExistsError
    ├── SessionInactiveError
    ├── ConcurrencyConflictError
    ├── QuotaExceededError
    │   └── SessionLimitError
    ├── RateLimitError
    ├── ReservationNotFoundError [LookupError]
    ├── ApiKeyNotFoundError [LookupError]
    ├── CommandTimeoutError [TimeoutError]
    ├── ProjectionTimeoutError [TimeoutError]
    ├── EmbeddedServerError
    │   └── NatsAuthError
    ├── LogError
    ├── ClosedError
    ├── DecryptionError [ValueError]
    ├── EmbedderUnavailableError
    ├── EmbedderError
    ├── ScopeAccessError [PermissionError]
    ├── AccessDeniedError [PermissionError]
    ├── EmbeddingModelMismatchError
    ├── MemoryIndexBusyError
    ├── CommandIdReusedError
    ├── AggregateFaultError
    ├── AgentError
    └── EntityNotFoundError [LookupError]

Each error declares its structured fields as attributes (``e.field``, ``e.used``,
``e.retry_after``, ...) and keeps a message that says what happened, which input, and what was
expected; ``str(e)`` is that message. ``e.fields`` holds the same fields as a dict, which is how
an error crosses the wire: an actor host answering over NATS sends ``code``, message and fields,
and :func:`error_from_code` rebuilds the typed error from them. Errors pickle the same way.
"""

from __future__ import annotations

import inspect
import re
from typing import Any, ClassVar

from actors.ports import CommitTooLarge


class BlackbirdError(Exception):
    """Base class of every error raised by Blackbird.

    Raised as itself only for what no subclass describes (e.g. an audit asked to verify
    projections when none run). ``message`` is ``str(error)``; ``code`` names the class on the
    wire; ``fields`` maps each structured field to its value.
    """

    code: ClassVar[str] = "blackbird_error"
    message: str
    # the names of the fields this class declares (annotated attributes, its bases' first)
    _field_names: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names: dict[str, None] = {}
        for klass in reversed(cls.__mro__):
            if issubclass(klass, BlackbirdError):
                names.update(dict.fromkeys(vars(klass).get("__annotations__", {})))
        cls._field_names = tuple(n for n in names if n not in ("code", "message", "_field_names"))

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        # fields the sender of a wire error knew and this version does not declare
        self._extra: dict[str, Any] = {}

    @property
    def fields(self) -> dict[str, Any]:
        """The structured fields by name: the declared ones, plus any other the remote sender
        of this error added (JSON-ready as sent)."""
        declared = {name: getattr(self, name) for name in self._field_names if hasattr(self, name)}
        return {**self._extra, **declared}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), self.message, self.fields))


class ValidationError(BlackbirdError, ValueError):
    """An argument, setting or request was malformed; nothing was sent or appended.

    Raised before any command leaves the client (bad ids, tiers, amounts, metadata, settings,
    a policy file, an HTTP ``Last-Event-ID``) and when an actor refuses a command's content.
    ``field`` names the input (a dotted path inside documents, e.g.
    ``tiers.pro.quotas.tokens.limit``), ``expected`` says what was expected and ``got`` what
    came (None when it is not worth repeating).
    """

    code = "validation_error"
    field: str
    expected: str
    got: Any

    def __init__(self, message: str, *, field: str, expected: str, got: Any = None) -> None:
        super().__init__(message)
        self.field = field
        self.expected = expected
        self.got = got


class PayloadTooLargeError(ValidationError, CommitTooLarge):
    """An encoded command, event, memory or cache value exceeds the maximum size.

    The fields are those of :class:`ValidationError`: ``field`` names what was too large,
    ``expected`` the limit and ``got`` the size (bytes or characters, as ``expected`` says).
    """

    code = "payload_too_large"


class SessionNotFoundError(BlackbirdError, LookupError):
    """The session id is unknown in this tenant.

    Raised by every call that names a session never created in the tenant (a session of another
    tenant is unknown too). Fields: ``session_id``; ``tenant`` when the session's actor answered.
    """

    code = "session_not_found"
    session_id: str
    tenant: str | None

    def __init__(self, message: str, *, session_id: str, tenant: str | None = None) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.tenant = tenant


class SessionExistsError(BlackbirdError):
    """``create_session`` was given a ``session_id`` that is taken. Field: ``session_id``."""

    code = "session_exists"
    session_id: str

    def __init__(self, message: str, *, session_id: str) -> None:
        super().__init__(message)
        self.session_id = session_id


class SessionInactiveError(BlackbirdError):
    """A command or a memory call named a session that was terminated or has expired.

    Fields: ``session_id``, and ``reason``: ``"terminated"``, ``"idle_timeout"``,
    ``"max_age"``, or ``"expired"`` for a session that lapsed earlier. Start a new session.
    """

    code = "session_inactive"
    session_id: str
    reason: str

    def __init__(self, message: str, *, session_id: str, reason: str) -> None:
        super().__init__(message)
        self.session_id = session_id
        self.reason = reason


class ConcurrencyConflictError(BlackbirdError):
    """Another writer kept winning the race for an aggregate; the command was not applied.

    Raised after the bounded retries of an append race are used up; retry with the same command
    id. Fields: ``id`` (the aggregate's id) for user, tenant and memory aggregates, or
    ``session_id`` and ``attempts`` for a session; the others are None.
    """

    code = "concurrency_conflict"
    id: str | None
    session_id: str | None
    attempts: int | None

    def __init__(
        self,
        message: str,
        *,
        id: str | None = None,  # named as on the wire, though it shadows the builtin
        session_id: str | None = None,
        attempts: int | None = None,
    ) -> None:
        super().__init__(message)
        self.id = id
        self.session_id = session_id
        self.attempts = attempts


class QuotaExceededError(BlackbirdError):
    """A charge would exceed a quota; nothing was counted (the refusal is an event).

    Raised by ``track_usage``, ``admit``, ``reserve`` and memory writes (``storage``). Fields:
    ``quota_type`` (a :class:`~actors.policy.QuotaType` value, ``"sessions"`` for
    :class:`SessionLimitError`), ``used`` (including reserved amounts) and ``limit`` in that
    quota's unit, ``resets_at`` (seconds since the epoch; None: never), and ``requested`` and
    ``operation`` when a charge was refused.
    """

    code = "quota_exceeded"
    quota_type: str
    used: float
    limit: float
    resets_at: float | None
    requested: float | None
    operation: str | None

    def __init__(
        self,
        message: str,
        *,
        quota_type: str,
        used: float,
        limit: float,
        resets_at: float | None = None,
        requested: float | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(message)
        self.quota_type = quota_type
        self.used = used
        self.limit = limit
        self.resets_at = resets_at
        self.requested = requested
        self.operation = operation


class SessionLimitError(QuotaExceededError):
    """``create_session``: the user already holds the most open sessions their tier allows.

    Terminated and lapsed sessions do not count; terminate one first. Fields: ``user_id``,
    ``tier``, ``used`` (open sessions) and ``limit`` (the tier's ``max_sessions_per_user``);
    ``quota_type`` is ``"sessions"`` and ``resets_at`` None.
    """

    code = "session_limit"
    user_id: str
    tier: str

    def __init__(
        self,
        message: str,
        *,
        user_id: str,
        tier: str,
        used: float,
        limit: float,
        quota_type: str = "sessions",
        resets_at: float | None = None,
        requested: float | None = None,
        operation: str | None = None,
    ) -> None:
        super().__init__(
            message, quota_type=quota_type, used=used, limit=limit, resets_at=resets_at,
            requested=requested, operation=operation,
        )
        self.user_id = user_id
        self.tier = tier


class RateLimitError(BlackbirdError):
    """A rate window or a concurrency limit is full; the request was refused (an event).

    Raised by ``enforce_rate_limit``, ``admit`` and ``manage_concurrency``. Fields:
    ``limit_type`` (a :class:`~actors.policy.RateLimitType` value, or ``"concurrency"``),
    ``limit`` (requests per window, or slots), ``retry_after`` (seconds until one more request
    fits the window; None for concurrency: it depends on a slot being given back),
    ``operation``, and for concurrency ``scope`` (``"operation"`` or ``"total"``).
    """

    code = "rate_limited"
    limit_type: str
    limit: int
    retry_after: float | None
    operation: str | None
    scope: str | None

    def __init__(
        self,
        message: str,
        *,
        limit_type: str,
        limit: int,
        retry_after: float | None = None,
        operation: str | None = None,
        scope: str | None = None,
    ) -> None:
        super().__init__(message)
        self.limit_type = limit_type
        self.limit = limit
        self.retry_after = retry_after
        self.operation = operation
        self.scope = scope


class ReservationNotFoundError(BlackbirdError, LookupError):
    """``settle`` named a reservation that is not held: it expired, was already settled, or
    never existed (record the usage with ``track_usage`` instead). Fields: ``reservation_id``,
    ``session_id``."""

    code = "reservation_not_found"
    reservation_id: str
    session_id: str

    def __init__(self, message: str, *, reservation_id: str, session_id: str) -> None:
        super().__init__(message)
        self.reservation_id = reservation_id
        self.session_id = session_id


class ApiKeyNotFoundError(BlackbirdError, LookupError):
    """No API key of that id in the tenant (``blackbird keys list`` shows them). Fields:
    ``key_id``, ``tenant``."""

    code = "api_key_not_found"
    key_id: str
    tenant: str

    def __init__(self, message: str, *, key_id: str, tenant: str) -> None:
        super().__init__(message)
        self.key_id = key_id
        self.tenant = tenant


class CommandTimeoutError(BlackbirdError, TimeoutError):
    """A command's outcome is unknown after ``command_timeout``: no actor host answered a remote
    client's command (``remote=True``), or JetStream never acknowledged an append through a
    failover (a try may have been stored; when every try was refused, LogError is raised).

    The command may or may not have been applied; retry it with the same ``command_id`` to find
    out without applying it twice. Fields: ``subject`` (where it was sent), ``command_id`` (for
    an append of several queued commands in one commit, the commit's deduplication id).
    """

    code = "command_timeout"
    subject: str
    command_id: str

    def __init__(self, message: str, *, subject: str, command_id: str) -> None:
        super().__init__(message)
        self.subject = subject
        self.command_id = command_id


class ProjectionTimeoutError(BlackbirdError, TimeoutError):
    """A read model (analytics, the memory index) did not reach the caller's last write
    within ``command_timeout``; try again. Fields: ``projection`` (its name), ``wanted`` (the
    stream sequence waited for) and ``applied`` (the one it had reached)."""

    code = "projection_timeout"
    projection: str
    wanted: int
    applied: int

    def __init__(self, message: str, *, projection: str, wanted: int, applied: int) -> None:
        super().__init__(message)
        self.projection = projection
        self.wanted = wanted
        self.applied = applied


class EmbeddedServerError(BlackbirdError):
    """NATS could not be reached, or the embedded nats-server found, started or stopped.

    Raised when a client opens. The fields that apply are set, the others are None:
    ``nats_url`` (the server that did not answer), ``searched`` (where the binary was looked
    for), ``binary`` (the one that could not run), ``data_dir``, ``port``, ``log_file`` and
    ``log_tail`` (the server's last log lines), ``pid`` (a server that would not stop).
    """

    code = "embedded_server_error"
    nats_url: str | None
    searched: list[str] | None
    binary: str | None
    data_dir: str | None
    port: int | None
    log_file: str | None
    log_tail: str | None
    pid: int | None

    def __init__(
        self,
        message: str,
        *,
        nats_url: str | None = None,
        searched: list[str] | None = None,
        binary: str | None = None,
        data_dir: str | None = None,
        port: int | None = None,
        log_file: str | None = None,
        log_tail: str | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(message)
        self.nats_url = nats_url
        self.searched = searched
        self.binary = binary
        self.data_dir = data_dir
        self.port = port
        self.log_file = log_file
        self.log_tail = log_tail
        self.pid = pid


class NatsAuthError(EmbeddedServerError):
    """The NATS server refused this client's credentials or TLS handshake (or its certificate was
    not trusted); nothing was sent.

    Raised when a client opens, at the first refusal (it is not retried until the connect
    timeout). Fields: ``nats_url`` (the servers tried, credentials in URLs shown as ``***``) and
    ``auth``, the kind of credential presented (``"creds"``, ``"nkey"``, ``"token"``,
    ``"user/password"`` or ``"none"``, followed by ``" + TLS client certificate"`` when one was
    presented); never the secret itself. Also raised when the server's TLS certificate is not
    trusted. The other fields of :class:`EmbeddedServerError` are None.
    """

    code = "nats_auth_error"
    auth: str

    def __init__(
        self,
        message: str,
        *,
        auth: str,
        nats_url: str | None = None,
        searched: list[str] | None = None,
        binary: str | None = None,
        data_dir: str | None = None,
        port: int | None = None,
        log_file: str | None = None,
        log_tail: str | None = None,
        pid: int | None = None,
    ) -> None:
        super().__init__(
            message, nats_url=nats_url, searched=searched, binary=binary, data_dir=data_dir,
            port=port, log_file=log_file, log_tail=log_tail, pid=pid,
        )
        self.auth = auth


class LogError(BlackbirdError):
    """The JetStream log or a key-value bucket refused or failed an operation (a stream or
    bucket that cannot be created, an append the server rejected, a lost race that kept being
    lost). No fields: the message names the subject or bucket and the server's answer."""

    code = "log_error"


class ClosedError(BlackbirdError):
    """A client (or one of its attributes) was used before ``async with``/after ``close()``.
    No fields."""

    code = "closed"


class DecryptionError(BlackbirdError, ValueError):
    """A sealed blob could not be opened with the user's key although the key still exists: it
    was altered or truncated, sealed for another ``aad``, or is not a sealed blob at all.

    Fields: ``tenant`` and ``user_id`` name the key, ``reason`` says what failed:
    ``"malformed"`` or ``"authentication_failed"``.
    """

    code = "decryption_failed"
    tenant: str
    user_id: str
    reason: str

    def __init__(self, message: str, *, tenant: str, user_id: str, reason: str) -> None:
        super().__init__(message)
        self.tenant = tenant
        self.user_id = user_id
        self.reason = reason


class EmbedderUnavailableError(BlackbirdError):
    """The embedding model cannot be loaded: its weights or a library are missing, or a
    ``model_dir`` holds no model it can run. Fields: ``install`` (the command that installs
    what is missing) and ``model_dir`` (the folder tried), each None when it does not apply."""

    code = "embedder_unavailable"
    install: str | None
    model_dir: str | None

    def __init__(self, message: str, *, install: str | None = None, model_dir: str | None = None) -> None:
        super().__init__(message)
        self.install = install
        self.model_dir = model_dir


class EmbedderError(BlackbirdError):
    """A request to an embedding API failed or its answer was unusable.

    Fields: ``url``, ``reason``, the HTTP ``status`` when there was one, and ``expected`` and
    ``got`` when the answer had the wrong shape (counts or dimensions); None otherwise.
    """

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
        super().__init__(message)
        self.url = url
        self.reason = reason
        self.status = status
        self.expected = expected
        self.got = got


class ScopeAccessError(BlackbirdError, PermissionError):
    """A memory call named a scope the acting session's user may not use (another user's or
    session's scope, or a group or agent scope they are not a member of). Fields: ``scope``
    (as given), ``user_id`` (the acting session's user)."""

    code = "scope_access"
    scope: str
    user_id: str

    def __init__(self, message: str, *, scope: str, user_id: str) -> None:
        super().__init__(message)
        self.scope = scope
        self.user_id = user_id


class AccessDeniedError(BlackbirdError, PermissionError):
    """The authenticated identity may not do this: a tenant's credentials naming another tenant,
    a user's credentials naming another user's session, a tenant asking for an operator's
    action (quota adjustments, tier changes, tenant policy), or a client on tenant credentials
    asking for what only the service identity reaches (memory, analytics). Fields:
    ``principal`` (who asked, as authenticated), ``action`` (what was refused) and ``tenant``."""

    code = "access_denied"
    principal: str
    action: str
    tenant: str | None

    def __init__(self, message: str, *, principal: str, action: str, tenant: str | None = None) -> None:
        super().__init__(message)
        self.principal = principal
        self.action = action
        self.tenant = tenant


class EmbeddingModelMismatchError(BlackbirdError):
    """``recall`` found the tenant's memories embedded with another model than this client's
    embedder; rebuild the index with ``rebuild_index(reembed=True)`` or use that model.
    Field: ``model_id`` (this client's model)."""

    code = "embedding_model_mismatch"
    model_id: str

    def __init__(self, message: str, *, model_id: str) -> None:
        super().__init__(message)
        self.model_id = model_id


class MemoryIndexBusyError(BlackbirdError):
    """Another client already maintains the memory index folder given as ``memory_dir``: one
    writer per folder; give this client its own. Field: ``path`` (the folder)."""

    code = "memory_index_busy"
    path: str

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class CommandIdReusedError(BlackbirdError):
    """A command id this aggregate already used was sent with a different command.

    A true retry (the same command under the same id) gets its first answer again; a different
    command under a used id is refused, not silently answered "duplicate". Use a new id. Fields:
    ``command_id``, ``aggregate`` (``<tenant>/<kind>/<id>``).
    """

    code = "command_id_reused"
    command_id: str
    aggregate: str

    def __init__(self, message: str, *, command_id: str, aggregate: str) -> None:
        super().__init__(message)
        self.command_id = command_id
        self.aggregate = aggregate


class AggregateFaultError(BlackbirdError):
    """An unexpected fault while handling one aggregate's command (deciding, applying, encoding).

    Only this command failed, and nothing of it was appended; the host and every other aggregate
    go on, and this aggregate keeps serving commands that do not hit the fault. The fault is
    logged with the aggregate's name. Fields: ``aggregate`` (``<tenant>/<kind>/<id>``), ``stage``
    (decide, apply, encode, replay), ``error`` (the fault's type and message).
    """

    code = "aggregate_fault"
    aggregate: str
    stage: str
    error: str

    def __init__(self, message: str, *, aggregate: str, stage: str, error: str) -> None:
        super().__init__(message)
        self.aggregate = aggregate
        self.stage = stage
        self.error = error


class AgentError(BlackbirdError):
    """A call to an agent's model failed or its answer was unusable: the model API answered
    with an HTTP error, did not answer within the agent's timeout, or sent a malformed stream.

    Fields: ``agent_id`` (the agent whose call failed) and ``status`` (the HTTP status the
    model API answered with; None for a timeout, a refused connection or a malformed answer).
    The message names the URL and what went wrong, never the API key.
    """

    code = "agent_error"
    agent_id: str
    status: int | None

    def __init__(self, message: str, *, agent_id: str, status: int | None = None) -> None:
        super().__init__(message)
        self.agent_id = agent_id
        self.status = status


class EntityNotFoundError(BlackbirdError, LookupError):
    """No entity of the knowledge graph by that id, name or alias in the scopes asked (the HTTP
    API's 404; the SDK's ``memory.entity`` returns None instead). Fields: ``entity``."""

    code = "entity_not_found"
    entity: str

    def __init__(self, message: str, *, entity: str) -> None:
        super().__init__(message)
        self.entity = entity


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
        CommandIdReusedError,
        AggregateFaultError,
        QuotaExceededError,
        SessionLimitError,
        RateLimitError,
        ReservationNotFoundError,
        ApiKeyNotFoundError,
        CommandTimeoutError,
        ProjectionTimeoutError,
        EmbeddedServerError,
        NatsAuthError,
        LogError,
        ClosedError,
        DecryptionError,
        EmbedderUnavailableError,
        EmbedderError,
        ScopeAccessError,
        AccessDeniedError,
        EmbeddingModelMismatchError,
        MemoryIndexBusyError,
        AgentError,
        EntityNotFoundError,
    )
}


def error_from_code(code: str, message: str, fields: dict[str, Any]) -> BlackbirdError:
    """Rebuild a typed error from its wire form (code, message, structured fields).

    An unknown code gives a plain :class:`BlackbirdError`. Fields the class does not declare
    stay in ``fields``; a declared field the sender did not send (a host of another version)
    is None.
    """
    return _restore(_BY_CODE.get(code, BlackbirdError), message, fields)


def field_of(exc: Exception, default: str) -> str:
    """The field path msgspec names in a validation error (``$.a.b`` -> ``a.b``; a missing or
    unknown field ``x`` of ``$.a`` -> ``a.x``), else ``default``."""
    text = str(exc)
    path = text.rsplit("`$.", 1)[-1].split("`", 1)[0] if "`$." in text else ""
    named = _NAMED_FIELD.search(text)
    return ".".join(part for part in (path, named.group(1) if named else "") if part) or default


_NAMED_FIELD = re.compile(r"(?:missing required|contains unknown) field `([^`]+)`")


_REQUIRED: dict[type[BlackbirdError], tuple[str, ...]] = {}


def _required_keywords(cls: type[BlackbirdError]) -> tuple[str, ...]:
    """The keyword-only constructor arguments of ``cls`` without a default (read once: a denied
    command rebuilds its error on every call)."""
    required = _REQUIRED.get(cls)
    if required is None:
        required = _REQUIRED[cls] = tuple(
            name for name, p in inspect.signature(cls).parameters.items()
            if p.kind is p.KEYWORD_ONLY and p.default is p.empty
        )
    return required


def _restore(cls: type[BlackbirdError], message: str, fields: dict[str, Any]) -> BlackbirdError:
    """``cls`` built from a message and fields (from the wire, or unpickled)."""
    given = {name: fields[name] for name in cls._field_names if name in fields}
    missing = {name: None for name in _required_keywords(cls) if name not in given}
    error = cls(message, **given, **missing)
    error._extra = {k: v for k, v in fields.items() if k not in given}
    return error
