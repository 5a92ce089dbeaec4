"""The JSON endpoints of the HTTP API, from sessions to the tenant's dashboard figures.

Sessions, usage and limits, memory and the cache, messages, audits, and the tenant's figures for
the console.

Every body, query and answer is a msgspec Struct below (the OpenAPI document is generated from
them), constrained with the limits of :mod:`actors.validation`, so a bad request is refused at
decode with a 400 naming the field; the SDK checks everything again.

Who may do what:

* Every endpoint under ``/v1/sessions/{session_id}`` loads the session in the caller's tenant
  first; a session the caller may not read (another tenant's, or for a ``user`` key one it takes
  no part in) is 404, exactly as an unknown one.
* A ``user`` key creates sessions only for its own user id, lists only the sessions it takes
  part in, and uses memory, the cache and the audit only of its own sessions (a participant of
  someone else's session would otherwise act as that session's user in their memory); tier
  changes and the tenant's figures are for ``admin`` and ``service`` keys.
* Writes accept an ``Idempotency-Key`` header, used as the command id: a retried request is
  applied once and gets its first answer again.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from actors.events import Duration, FiniteAmount, Fraction, Instant, Name, SessionStatus, Token
from actors.policy import QuotaType, RateLimitType
from actors.validation import MAX_MEMORY_TEXT, MAX_MESSAGE_LENGTH
from blackbird.agents.base import AgentReply
from blackbird.audit.report import AuditReport
from blackbird.errors import AccessDeniedError, SessionNotFoundError
from blackbird.http.auth import TENANT_WIDE, Caller
from blackbird.http.routes import Call, Endpoint, ErrorBody, ErrorDetail, HttpContext
from blackbird.types import Admission, Memory, Session

if TYPE_CHECKING:
    from blackbird.audit.replay import Auditor
    from blackbird.memory.service import AsyncMemory
    from blackbird.sessions.manager import AsyncSessionManager

Metadata = dict[str, Any]  # size and depth checked by the SDK (actors.validation.METADATA)
MemoryText = Annotated[str, msgspec.Meta(max_length=MAX_MEMORY_TEXT)]
MessageText = Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_LENGTH)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
StreamSequence = Annotated[int, msgspec.Meta(ge=1)]

#: how much the tenant dashboard shows at most (the newest first)
STATS_SESSIONS = 100
STATS_USERS = 100
STATS_MINUTES = 60


# --------------------------------------------------------------------------- bodies and queries


class CreateSessionBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    user_id: Token
    tier: Name = "free"
    metadata: Metadata = {}
    session_id: Token | None = None  # default: a new id
    agent_id: Token | None = None  # default: the client's default agent


class ListSessionsQuery(msgspec.Struct, frozen=True):
    user_id: Token | None = None
    status: SessionStatus | None = None  # the effective status (a lapsed session is "expired")
    limit: Limit = 100


class TouchBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name = "activity"


class TierBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    tier: Name


class TerminateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reason: Name = "terminated"


class UsageBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name
    resource_type: QuotaType
    amount: FiniteAmount
    metadata: Metadata = {}


class RateCheckBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name
    limit_type: RateLimitType | None = None  # None: every window


class SlotBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name
    lease_seconds: Duration | None = None  # default: the tier's lease


class SlotQuery(msgspec.Struct, frozen=True):
    operation: Name


class AdmitBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name
    costs: dict[QuotaType, FiniteAmount] = {}
    rate: bool = True
    slot: bool = True
    reserve: bool = False
    lease_seconds: Duration | None = None
    hold_seconds: Duration | None = None


class ReserveBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    operation: Name
    costs: dict[QuotaType, FiniteAmount]
    hold_seconds: Duration | None = None


class SettleBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reservation_id: Name
    actual: dict[QuotaType, FiniteAmount] = {}


class RememberBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: MemoryText
    scope: Name = "user"
    importance: Fraction = 0.5
    metadata: Metadata = {}
    key: Name | None = None  # a newer memory with the same key supersedes the older one
    kind: Name = "fact"


class RecallBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    query: MemoryText
    scopes: tuple[Name, ...] = ("session", "user")
    k: Limit = 5
    filters: dict[str, Any] | None = None  # kind, key, author or metadata.<field>
    as_of: Instant | None = None  # what was known at that instant
    weights: dict[str, float] | None = None  # similarity, keyword, recency, importance


class ScopeQuery(msgspec.Struct, frozen=True):
    scope: Name = "user"


class CacheScopeQuery(msgspec.Struct, frozen=True):
    scope: Name = "session"


class CacheSetBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    value: Any
    ttl: Duration | None = None  # seconds; None: until evicted or deleted
    scope: Name = "session"
    importance: Fraction = 0.5


class MessageBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: MessageText
    channel: Token = "chat"
    metadata: Metadata = {}


class AgentBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    agent_id: Token


class ReplyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    message: MessageText
    agent: Token | None = None  # default: the session's agent


class AuditQuery(msgspec.Struct, frozen=True):
    until_seq: StreamSequence | None = None
    until: str | None = None  # seconds since the epoch or an ISO-8601 instant (UTC without offset)


# --------------------------------------------------------------------------- answers


class SessionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A session as ``Session.to_dict()`` gives it (times in seconds since the epoch)."""

    session_id: str
    user_id: str
    tenant: str
    tier: str
    status: SessionStatus  # effective: an active session past its time limits is "expired"
    metadata: Metadata
    created_at: float
    last_activity: float
    idle_timeout: float
    max_age: float
    is_active: bool
    age_seconds: float
    idle_seconds: float
    concurrent_operations: int = 0
    version: int = 0
    sequence: int = 0
    usage: dict[str, tuple[float, float]] = {}  # quota -> (window start, used)
    leases: dict[str, tuple[str, float, int]] = {}  # lease id -> (operation, expires at, fencing token)
    reservations: dict[str, tuple[str, dict[str, float], float]] = {}  # id -> (operation, amounts, expires at)
    boosts: dict[str, tuple[float, float | None]] = {}  # quota -> (limit, until)
    participants: dict[str, str] = {}
    agent_id: str | None = None  # the agent that answers; null: the client's default agent


class SessionList(msgspec.Struct, frozen=True):
    sessions: list[SessionInfo]


class Ok(msgspec.Struct, frozen=True):
    ok: bool = True


class QuotaInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One quota now; an unlimited ``limit`` and ``remaining`` are null."""

    used: float
    limit: float | None
    remaining: float | None
    usage_percentage: float
    resets_at: float | None
    reserved: float


class RateWindow(msgspec.Struct, frozen=True, kw_only=True):
    limit: float
    remaining: float
    reset_at: float  # when one more request would be admitted


class RateAllowed(msgspec.Struct, frozen=True):
    allowed: bool = True


class Lease(msgspec.Struct, frozen=True, kw_only=True):
    """A concurrency slot: give it back with ``DELETE .../slots/{lease_id}?operation=...`` or let
    it expire at ``expires_at``."""

    session_id: str
    operation: str
    lease_id: str
    fencing_token: int | None
    expires_at: float | None


class SlotsInUse(msgspec.Struct, frozen=True):
    in_use: int


class Settled(msgspec.Struct, frozen=True):
    charged: dict[str, float]


class Recalled(msgspec.Struct, frozen=True):
    memories: list[Memory]


class Forgotten(msgspec.Struct, frozen=True):
    forgotten: bool  # False: no such memory (or entity) in the scope


class CacheEntry(msgspec.Struct, frozen=True):
    key: str
    value: Any


class Posted(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    tenant: str
    channel: str
    sequence: int  # the stream sequence; a resuming subscriber's token starts from it


class SessionQuotas(msgspec.Struct, frozen=True, kw_only=True):
    session_id: str
    user_id: str
    tier: str
    last_activity: float
    quotas: dict[str, QuotaInfo]


class UserTotals(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    sessions: int
    active_sessions: int
    operations: int
    resource_usage: dict[str, float]
    last_seen: float


class UsageBucket(msgspec.Struct, kw_only=True):
    minute: float  # the bucket's start, seconds since the epoch
    records: int
    amounts: dict[str, float]  # per resource type


class TenantStats(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's figures for the console. Lists hold the most recently active first, at most
    100 sessions and 100 users; ``usage_per_minute`` covers the last hour, oldest minute first."""

    tenant: str
    at: float
    active_sessions: int
    total_sessions: int
    total_users: int
    sessions_by_tier: dict[str, int]
    usage_by_resource: dict[str, float]
    refusals: dict[str, int]
    alerts: int
    recent_alerts: list[dict[str, Any]]
    sessions: list[SessionQuotas]
    users: list[UserTotals]
    usage_per_minute: list[UsageBucket]


# --------------------------------------------------------------------------- endpoints


async def caller_session(sm: AsyncSessionManager, call: Call, *, own: bool = False) -> Session:
    """The session of the path, or 404 when the caller may not read it. ``own``: a user key
    must be the session's own user (403 otherwise)."""
    caller = call.caller
    if caller.role == "stream":  # app.py lets stream tokens only into streams; kept so here
        raise AccessDeniedError("a stream token only reads its session's stream",
                                principal=caller.principal, action="api", tenant=caller.tenant)
    session_id = call.path["session_id"]
    session: Session | None = await sm.get_session(session_id, tenant=caller.tenant)
    if session is None or not caller.may_read(
        session.user_id, getattr(session, "participants", {}), session.session_id
    ):
        raise SessionNotFoundError(f"session {session_id!r} not found", session_id=session_id)
    if own and caller.role == "user" and caller.user_id != session.user_id:
        raise AccessDeniedError(
            f"session {session_id!r}: only the session's own user may do this with a user key",
            principal=caller.principal, action="own session", tenant=caller.tenant,
        )
    return session


def idempotency_key(call: Call) -> str | None:
    """The request's ``Idempotency-Key`` (a write's command id), if it sent one."""
    return call.headers.get("idempotency-key") or None


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """Every JSON endpoint, served with ``ctx``."""
    from starlette.responses import Response

    bb = ctx.bb
    sm: AsyncSessionManager = bb.session_manager

    def memory() -> AsyncMemory:
        found: AsyncMemory = bb.memory  # looked up per call: it needs the service identity
        return found
    # read once: whether messages can carry who wrote them (a user key's messages then do)
    sends_author = "author" in inspect.signature(sm.send_message).parameters

    async def session_of(call: Call, *, own: bool = False) -> Session:
        return await caller_session(sm, call, own=own)

    command_id = idempotency_key

    def info(session: Session) -> SessionInfo:
        return msgspec.convert(session.to_dict(), SessionInfo)

    # ------------------------------------------------------------------ sessions

    async def create(call: Call) -> SessionInfo:
        body: CreateSessionBody = call.body
        caller = call.caller
        if caller.role == "user" and caller.user_id != body.user_id:
            raise AccessDeniedError(
                f"user_id: a user key creates sessions for its own user ({caller.user_id!r}) only",
                principal=caller.principal, action="create session", tenant=caller.tenant,
            )
        session = await sm.create_session(
            body.user_id, body.tier, body.metadata, tenant=caller.tenant, session_id=body.session_id,
            command_id=command_id(call), agent_id=body.agent_id,
        )
        return info(session)

    async def list_sessions(call: Call) -> SessionList:
        query: ListSessionsQuery = call.query
        caller = call.caller
        if query.user_id is not None:
            found = await sm.get_user_sessions(query.user_id, tenant=caller.tenant)
        else:
            found = await sm.get_tenant_sessions(tenant=caller.tenant)
        chosen = [
            s for s in reversed(found)  # the newest first
            if caller.may_read(s.user_id, getattr(s, "participants", {}), s.session_id)
            and (query.status is None or s.effective_status is query.status)
        ]
        return SessionList([info(s) for s in chosen[: query.limit]])

    async def get(call: Call) -> SessionInfo:
        return info(await session_of(call))

    async def touch(call: Call) -> SessionInfo:
        session = await session_of(call)
        body: TouchBody = call.body
        return info(await sm.touch_session(
            session.session_id, body.operation, tenant=session.tenant, command_id=command_id(call)
        ))

    async def tier(call: Call) -> SessionInfo:
        session = await session_of(call)
        body: TierBody = call.body
        return info(await sm.change_tier(
            session.session_id, body.tier, tenant=session.tenant, command_id=command_id(call)
        ))

    async def terminate(call: Call) -> SessionInfo:
        session = await session_of(call)
        body: TerminateBody = call.body
        return info(await sm.terminate_session(
            session.session_id, body.reason, tenant=session.tenant, command_id=command_id(call)
        ))

    async def hand_over(call: Call) -> SessionInfo:
        session = await session_of(call)
        body: AgentBody = call.body
        return info(await sm.hand_over(
            session.session_id, body.agent_id, tenant=session.tenant, command_id=command_id(call)
        ))

    # ------------------------------------------------------------------ usage and limits

    async def usage(call: Call) -> Ok:
        session = await session_of(call)
        body: UsageBody = call.body
        await sm.track_usage(
            session.session_id, body.operation, body.resource_type, body.amount, body.metadata,
            tenant=session.tenant, command_id=command_id(call),
        )
        return Ok()

    async def quota(call: Call) -> dict[str, QuotaInfo]:
        session = await session_of(call)
        found = await sm.get_quota(session.session_id, tenant=session.tenant)
        return msgspec.convert(found, dict[str, QuotaInfo])

    async def rate_limits(call: Call) -> dict[str, dict[str, RateWindow]]:
        session = await session_of(call)
        found = await sm.get_rate_limits(session.session_id, tenant=session.tenant)
        return msgspec.convert(found, dict[str, dict[str, RateWindow]])

    async def rate_check(call: Call) -> RateAllowed:
        session = await session_of(call)
        body: RateCheckBody = call.body
        await sm.enforce_rate_limit(
            session.session_id, body.operation, body.limit_type, tenant=session.tenant,
            command_id=command_id(call),
        )
        return RateAllowed()

    async def take_slot(call: Call) -> Lease:
        session = await session_of(call)
        body: SlotBody = call.body
        # admit() with only a slot: the one call that answers with the lease's id
        granted: Admission = await sm.admit(
            session.session_id, body.operation, None, rate=False, slot=True,
            lease_seconds=body.lease_seconds, tenant=session.tenant, command_id=command_id(call),
        )
        return Lease(
            session_id=granted.session_id, operation=granted.operation, lease_id=granted.lease_id or "",
            fencing_token=granted.fencing_token, expires_at=granted.lease_expires_at,
        )

    async def release_slot(call: Call) -> SlotsInUse:
        session = await session_of(call)
        query: SlotQuery = call.query
        in_use = await sm.release_slot(
            session.session_id, query.operation, call.path["lease_id"], tenant=session.tenant,
            command_id=command_id(call),
        )
        return SlotsInUse(in_use)

    async def admit(call: Call) -> Admission:
        session = await session_of(call)
        body: AdmitBody = call.body
        return await sm.admit(
            session.session_id, body.operation, _costs(body.costs), rate=body.rate, slot=body.slot,
            reserve=body.reserve, lease_seconds=body.lease_seconds, hold_seconds=body.hold_seconds,
            tenant=session.tenant, command_id=command_id(call),
        )

    async def reserve(call: Call) -> Admission:
        session = await session_of(call)
        body: ReserveBody = call.body
        return await sm.reserve(
            session.session_id, body.operation, _costs(body.costs), hold_seconds=body.hold_seconds,
            tenant=session.tenant, command_id=command_id(call),
        )

    async def settle(call: Call) -> Settled:
        session = await session_of(call)
        body: SettleBody = call.body
        charged = await sm.settle(
            session.session_id, body.reservation_id, _costs(body.actual), tenant=session.tenant,
            command_id=command_id(call),
        )
        return Settled(charged)

    # ------------------------------------------------------------------ memory and cache

    async def remember(call: Call) -> Memory:
        session = await session_of(call, own=True)
        body: RememberBody = call.body
        return await memory().remember(
            body.text, session_id=session.session_id, scope=body.scope, importance=body.importance,
            metadata=body.metadata, key=body.key, kind=body.kind, tenant=session.tenant,
            command_id=command_id(call),
        )

    async def recall(call: Call) -> Recalled:
        session = await session_of(call, own=True)
        body: RecallBody = call.body
        found = await memory().recall(
            body.query, session_id=session.session_id, scopes=list(body.scopes), k=body.k,
            filters=body.filters, as_of=body.as_of, weights=body.weights, tenant=session.tenant,
        )
        return Recalled(list(found))

    async def forget(call: Call) -> Forgotten:
        session = await session_of(call, own=True)
        query: ScopeQuery = call.query
        done = await memory().forget(
            call.path["memory_id"], session_id=session.session_id, scope=query.scope, tenant=session.tenant
        )
        return Forgotten(bool(done))

    async def cache_set(call: Call) -> Ok:
        session = await session_of(call, own=True)
        body: CacheSetBody = call.body
        await memory().set(
            call.path["key"], body.value, body.scope, body.ttl, session_id=session.session_id,
            importance=body.importance, tenant=session.tenant,
        )
        return Ok()

    absent = object()

    async def cache_get(call: Call) -> Any:
        session = await session_of(call, own=True)
        query: CacheScopeQuery = call.query
        key = call.path["key"]
        value = await memory().get(
            key, query.scope, session_id=session.session_id, default=absent, tenant=session.tenant
        )
        if value is absent:  # no error class means "no such key": answer the 404 here
            body = ErrorBody(ErrorDetail("not_found", f"cache key {key!r} not found (absent, expired or evicted)"))
            return Response(msgspec.json.encode(body), status_code=404, media_type="application/json")
        return CacheEntry(key, value)

    # ------------------------------------------------------------------ messages and audits

    async def post_message(call: Call) -> Posted:
        session = await session_of(call)
        body: MessageBody = call.body
        extra: dict[str, Any] = {}
        if sends_author and call.caller.role == "user":
            extra["author"] = call.caller.user_id
        posted = await sm.send_message(
            body.text, session_id=session.session_id, channel=body.channel, metadata=body.metadata,
            tenant=session.tenant, command_id=command_id(call), **extra,
        )
        return msgspec.convert(posted, Posted)

    async def reply(call: Call) -> AgentReply:
        session = await session_of(call, own=True)  # a user key: its own session's agent only
        body: ReplyBody = call.body
        answer: AgentReply = await bb.send_message(
            body.message, session_id=session.session_id, agent=body.agent, tenant=session.tenant
        )
        return answer

    async def audit(call: Call) -> dict[str, Any]:
        session = await session_of(call, own=True)
        query: AuditQuery = call.query
        auditor: Auditor = bb.audit
        report = await auditor.replay(
            session_id=session.session_id, tenant=session.tenant, until_seq=query.until_seq, until=query.until
        )
        return report.to_dict()

    # ------------------------------------------------------------------ the tenant's figures

    async def tenant_stats(call: Call) -> TenantStats:
        return await _tenant_stats(sm, call.caller, time.time())

    session_path = "/v1/sessions/{session_id}"

    def at(suffix: str) -> str:
        return session_path + suffix

    handler = Callable[[Call], Awaitable[Any]]
    rows: list[tuple[str, str, handler, str, dict[str, Any]]] = [
        ("POST", "/v1/sessions", create, "create a session",
         {"body": CreateSessionBody, "response": SessionInfo, "status": 201}),
        ("GET", "/v1/sessions", list_sessions, "list the tenant's sessions (a user key: its own)",
         {"query": ListSessionsQuery, "response": SessionList}),
        ("GET", session_path, get, "read a session", {"response": SessionInfo}),
        ("POST", at("/touch"), touch, "record activity (resets the idle timer)",
         {"body": TouchBody, "response": SessionInfo}),
        ("POST", at("/tier"), tier, "move a session to another tier",
         {"body": TierBody, "response": SessionInfo, "roles": TENANT_WIDE}),
        ("POST", at("/terminate"), terminate, "terminate a session",
         {"body": TerminateBody, "response": SessionInfo}),
        ("POST", at("/agent"), hand_over, "hand a session over to another agent",
         {"body": AgentBody, "response": SessionInfo, "roles": TENANT_WIDE}),
        ("POST", at("/usage"), usage, "count usage against a quota",
         {"body": UsageBody, "response": Ok, "tag": "usage"}),
        ("GET", at("/quota"), quota, "quota usage now", {"response": dict[str, QuotaInfo], "tag": "usage"}),
        ("GET", at("/rate-limits"), rate_limits, "rate windows now, per operation",
         {"response": dict[str, dict[str, RateWindow]], "tag": "usage"}),
        ("POST", at("/rate-check"), rate_check, "admit one request if the rate limits allow (else 429)",
         {"body": RateCheckBody, "response": RateAllowed, "tag": "usage"}),
        ("POST", at("/slots"), take_slot, "take a concurrency slot (a lease)",
         {"body": SlotBody, "response": Lease, "status": 201, "tag": "usage"}),
        ("DELETE", at("/slots/{lease_id}"), release_slot, "give back a concurrency slot",
         {"query": SlotQuery, "response": SlotsInUse, "tag": "usage"}),
        ("POST", at("/admit"), admit, "admit work: quotas, rate windows and a slot in one decision",
         {"body": AdmitBody, "response": Admission, "tag": "usage"}),
        ("POST", at("/reserve"), reserve, "hold estimated costs against the quotas",
         {"body": ReserveBody, "response": Admission, "tag": "usage"}),
        ("POST", at("/settle"), settle, "charge what reserved work really used",
         {"body": SettleBody, "response": Settled, "tag": "usage"}),
        ("POST", at("/memories"), remember, "remember a text",
         {"body": RememberBody, "response": Memory, "status": 201, "tag": "memory"}),
        ("POST", at("/memories/recall"), recall, "recall the memories most relevant to a query",
         {"body": RecallBody, "response": Recalled, "tag": "memory"}),
        ("DELETE", at("/memories/{memory_id}"), forget, "forget a memory",
         {"query": ScopeQuery, "response": Forgotten, "tag": "memory"}),
        ("PUT", at("/cache/{key}"), cache_set, "store a cache value",
         {"body": CacheSetBody, "response": Ok, "tag": "memory"}),
        ("GET", at("/cache/{key}"), cache_get, "read a cache value (404 if absent)",
         {"query": CacheScopeQuery, "response": CacheEntry, "tag": "memory"}),
        ("POST", at("/messages"), post_message, "post a message on a session channel",
         {"body": MessageBody, "response": Posted, "status": 201, "tag": "streams"}),
        ("POST", at("/reply"), reply, "send a message to the session's agent and get its reply",
         {"body": ReplyBody, "response": AgentReply, "tag": "streams"}),
        ("GET", at("/audit"), audit, "replay a session's log: its timeline and state",
         {"query": AuditQuery, "response": AuditReport, "tag": "audit"}),
        ("GET", "/v1/tenant/stats", tenant_stats, "the tenant's figures for the console",
         {"response": TenantStats, "roles": TENANT_WIDE, "tag": "tenant"}),
    ]
    return [Endpoint(method, path, fn, summary, **options) for method, path, fn, summary, options in rows]


async def _tenant_stats(sm: AsyncSessionManager, caller: Caller, now: float) -> TenantStats:
    """The console's figures for ``caller``'s tenant, from the read models and the sessions'
    quotas (see :class:`TenantStats` for what is bounded)."""
    tenant = caller.tenant
    figures: dict[str, Any] = await sm.get_tenant_analytics(tenant=tenant)
    sessions: list[Session] = await sm.get_tenant_sessions(tenant=tenant)
    recent = sorted(sessions, key=lambda s: s.last_activity, reverse=True)
    active = [s for s in recent if s.is_active][:STATS_SESSIONS]
    quotas = []
    for s in active:
        found = await sm.get_quota(s.session_id, tenant=tenant)
        quotas.append(SessionQuotas(
            session_id=s.session_id, user_id=s.user_id, tier=s.tier, last_activity=s.last_activity,
            quotas=msgspec.convert(found, dict[str, QuotaInfo]),
        ))
    by_user: dict[str, list[Session]] = {}
    for s in recent:
        by_user.setdefault(s.user_id, []).append(s)
    users = []
    first_minute = (now // 60 - (STATS_MINUTES - 1)) * 60
    buckets = {first_minute + 60 * i: UsageBucket(minute=first_minute + 60 * i, records=0, amounts={})
               for i in range(STATS_MINUTES)}
    for user_id, own in list(by_user.items())[:STATS_USERS]:
        figures_of = await sm.get_user_analytics(user_id, tenant=tenant)
        users.append(UserTotals(
            user_id=user_id, sessions=len(own), active_sessions=sum(1 for s in own if s.is_active),
            operations=int(figures_of.get("total_operations", 0)),
            resource_usage=dict(figures_of.get("resource_usage", {})),
            last_seen=float(figures_of.get("last_seen", own[0].last_activity)),
        ))
        for row in await sm.get_usage_history(user_id, limit=10_000, since=first_minute, tenant=tenant):
            bucket = buckets.get(row["timestamp"] // 60 * 60)
            if bucket is None:
                continue
            bucket.records += 1
            bucket.amounts[row["resource_type"]] = bucket.amounts.get(row["resource_type"], 0.0) + row["amount"]
    return TenantStats(
        tenant=tenant, at=now, active_sessions=int(figures["active_sessions"]),
        total_sessions=int(figures["total_sessions"]), total_users=int(figures["total_users"]),
        sessions_by_tier=dict(figures["sessions_by_tier"]), usage_by_resource=dict(figures["usage_by_resource"]),
        refusals=dict(figures["refusals"]), alerts=int(figures["alerts"]),
        recent_alerts=list(figures["recent_alerts"]), sessions=quotas, users=users,
        usage_per_minute=list(buckets.values()),
    )


def _costs(amounts: dict[QuotaType, float]) -> dict[QuotaType | str, float]:
    return dict(amounts.items())
