"""The HTTP API's endpoints as data, from which both the routes and ``/openapi.json`` are made.

Each endpoint names its method, path, who may call it and its body, query and response types, so
one table drives both the Starlette routes and ``/openapi.json`` (generated from the same msgspec
types the handlers decode and encode, never written by hand).

A handler gets a :class:`Call` (the caller, the path parameters, the decoded body and query) and
returns a msgspec-encodable value. Errors are JSON ``{"error": {"code", "message", ...fields}}``:
400 (ValidationError, naming the field), 401 (no or bad credentials), 403 (the caller's role or
identity may not), 404 (unknown, or another tenant's: the same answer), 409 (exists, inactive,
conflict), 429 (quota or rate limit, with ``Retry-After``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from blackbird.errors import (
    AccessDeniedError,
    ApiKeyNotFoundError,
    BlackbirdError,
    CommandIdReusedError,
    ConcurrencyConflictError,
    EntityNotFoundError,
    QuotaExceededError,
    RateLimitError,
    ReservationNotFoundError,
    ScopeAccessError,
    SessionExistsError,
    SessionInactiveError,
    SessionNotFoundError,
    ValidationError,
    field_of,
)
from blackbird.http.auth import ALL_ROLES, Caller, KeyVerifier, Unauthorized

log = structlog.get_logger("blackbird.http")

__all__ = ["Call", "Endpoint", "ErrorBody", "HttpContext", "error_status", "openapi"]


HEARTBEAT = 15.0  # seconds between keep-alive comments on an idle stream


@dataclass
class HttpContext:
    """What the endpoints share: the client they serve and how callers are recognised."""

    bb: Any  # AsyncBlackbird
    bootstrap: Mapping[str, str]
    keys: KeyVerifier | None
    stream_tokens: Any  # blackbird.http.tokens.StreamTokens (issue and verify)
    heartbeat: float = HEARTBEAT


@dataclass
class Call:
    """One request as a handler sees it."""

    caller: Caller
    path: dict[str, str]
    body: Any = None
    query: Any = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Call], Awaitable[Any]]


@dataclass(frozen=True)
class Endpoint:
    method: str
    path: str  # Starlette style: /v1/sessions/{session_id}
    handler: Handler
    summary: str
    body: Any = None  # a msgspec-decodable type, or None
    query: Any = None  # a Struct whose fields are the query parameters, or None
    response: Any = None  # what the handler returns (for the schema)
    roles: frozenset[str] = ALL_ROLES
    status: int = 200
    tag: str = "sessions"
    stream: bool = False  # text/event-stream (the handler returns a Starlette response)


class ErrorDetail(msgspec.Struct, frozen=True):
    code: str
    message: str


class ErrorBody(msgspec.Struct, frozen=True):
    """Every error's body; ``error`` also holds the error's typed fields (``field``, ``expected``,
    ``retry_after``, ...)."""

    error: ErrorDetail


_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (ValidationError, 400),
    (AccessDeniedError, 403),
    (ScopeAccessError, 403),
    (SessionNotFoundError, 404),
    (ReservationNotFoundError, 404),
    (EntityNotFoundError, 404),
    (ApiKeyNotFoundError, 404),
    (SessionExistsError, 409),
    (SessionInactiveError, 409),
    (ConcurrencyConflictError, 409),
    (CommandIdReusedError, 409),
    (RateLimitError, 429),
    (QuotaExceededError, 429),
)


def error_status(exc: BaseException) -> int:
    """The HTTP status an error answers with (500 for what no rule names)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def error_payload(exc: BlackbirdError) -> dict[str, Any]:
    fields = {k: v for k, v in exc.fields.items() if _jsonable(v)}
    return {"error": {"code": exc.code, "message": str(exc), **fields}}


def _jsonable(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int | bool | type(None) | list | dict)


def retry_after(exc: BaseException) -> str | None:
    """The ``Retry-After`` header (whole seconds, at least 1) of a 429, if the error knows when."""
    seconds = getattr(exc, "retry_after", None)
    if isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0:
        return str(max(1, math.ceil(seconds)))
    return None


def decode_body(raw: bytes, kind: Any) -> Any:
    """The request body as ``kind``; ValidationError naming the field for anything else."""
    if not raw:
        raw = b"{}"
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        name = field_of(exc, "body")
        raise ValidationError(f"{name}: {exc}", field=name, expected=_expected(exc)) from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise ValidationError(
            f"body: expected a JSON document ({str(exc)[:200]})", field="body", expected="JSON"
        ) from None


def decode_query(params: dict[str, str], kind: Any) -> Any:
    """Query parameters as the Struct ``kind`` (strings converted to the fields' types)."""
    try:
        return msgspec.convert(params, kind, strict=False)
    except msgspec.ValidationError as exc:
        name = field_of(exc, "query")
        raise ValidationError(f"{name}: {exc}", field=name, expected=_expected(exc)) from None


def _expected(exc: msgspec.ValidationError) -> str:
    text = str(exc)
    return text.split(" - at ", 1)[0] if " - at " in text else text


# --------------------------------------------------------------------------- OpenAPI


_PARAM = re.compile(r"{([a-z_]+)}")


def openapi(endpoints: Sequence[Endpoint], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``endpoints``, its schemas generated by msgspec from the very
    types the handlers decode and return."""
    kinds: list[Any] = [ErrorBody]
    for e in endpoints:
        kinds += [k for k in (e.body, e.query, e.response) if k is not None]
    unique = list(dict.fromkeys(kinds))
    schemas, components = msgspec.json.schema_components(unique, ref_template="#/components/schemas/{name}")
    by_kind = dict(zip(unique, schemas, strict=True))
    error = {"content": {"application/json": {"schema": by_kind[ErrorBody]}}}
    paths: dict[str, dict[str, Any]] = {}
    for e in endpoints:
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _PARAM.findall(e.path)
        ]
        if e.query is not None:
            query_schema = components.get(getattr(e.query, "__name__", ""), {})
            required = set(query_schema.get("required", ()))
            for name, prop in query_schema.get("properties", {}).items():
                parameters.append({"name": name, "in": "query", "required": name in required, "schema": prop})
        operation: dict[str, Any] = {
            "summary": e.summary,
            "operationId": e.method.lower() + "_" + re.sub(r"[^a-z0-9]+", "_", e.path.lower()).strip("_"),
            "tags": [e.tag],
            "parameters": parameters,
            "security": [{"apiKey": []}, {"bearer": []}] + ([{"streamToken": []}] if e.stream else []),
            "x-roles": sorted(e.roles),
            "responses": {
                "400": {"description": "invalid input (the field is named)", **error},
                "401": {"description": "no or bad credentials", **error},
                "403": {"description": "the caller may not", **error},
                "404": {"description": "not found (or another tenant's)", **error},
            },
        }
        if e.body is not None:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": by_kind[e.body]}}}
        if e.stream:
            operation["responses"][str(e.status)] = {
                "description": "Server-Sent Events: id = resume token, event = channel, data = JSON",
                "content": {"text/event-stream": {"schema": by_kind[e.response] if e.response else {}}},
            }
        else:
            content = {"application/json": {"schema": by_kind[e.response]}} if e.response is not None else {}
            operation["responses"][str(e.status)] = {"description": "OK", **({"content": content} if content else {})}
        if e.tag in ("sessions", "usage", "memory", "participants"):
            operation["responses"]["409"] = {"description": "exists, inactive or conflicting", **error}
            operation["responses"]["429"] = {
                "description": "quota or rate limit reached (Retry-After says when to retry)", **error
            }
        paths.setdefault(e.path, {})[e.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "an API key (bbk_...)"},
                "bearer": {"type": "http", "scheme": "bearer", "description": "a bootstrap token (--http-tokens)"},
                "streamToken": {"type": "apiKey", "in": "query", "name": "token"},
            },
        },
    }
