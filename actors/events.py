"""Every event, command, reply and the commit envelope: the one source of truth for their shapes.

Hot, acyclic shapes are declared ``gc=False``: a busy host creates thousands per second and
the garbage collector need not scan them (they can never be part of a reference cycle).

Events are facts named in the past tense, frozen, tagged with their class name. A shipped
event's meaning never changes: a new version is a new class plus an upcaster in
:func:`upcast`. Commands are imperative. All of them are msgspec Structs, encoded as JSON
on the wire and in the log so an operator can read them with the ``nats`` CLI.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, ClassVar

import msgspec

from actors.policy import Policy, QuotaType, RateLimitType
from actors.validation import (
    API_KEY_ID_PATTERN,
    MAX_AMOUNT,
    MAX_DURATION,
    MAX_ID_LENGTH,
    MAX_INSTANT,
    MAX_MESSAGE_LENGTH,
    MAX_NAME_LENGTH,
    MAX_SAFE_INT,
    PREDICATE_PATTERN,
    SECRET_HASH_PATTERN,
    TOKEN_PATTERN,
)

SCHEMA_VERSION = 1

Metadata = dict[str, Any]  # user-supplied JSON data; its size and depth: actors.validation


class ApiKeyRole(enum.StrEnum):
    """Who an API key speaks for: the tenant's ``admin`` (every session, keys, monitoring), a
    ``service`` (every session of the tenant) or one ``user`` (the sessions they take part in)."""

    ADMIN = "admin"
    SERVICE = "service"
    USER = "user"


class SessionStatus(enum.StrEnum):
    """Lifecycle status of a session. ``str(status.value)`` is what the API reports."""

    ACTIVE = "active"
    EXPIRED = "expired"
    TERMINATED = "terminated"


class ParticipantRole(enum.StrEnum):
    """What a participant who joined a session may do: ``participant`` posts and reads,
    ``observer`` only reads. (The session's own user is its ``owner``, see :data:`OWNER`.)"""

    PARTICIPANT = "participant"
    OBSERVER = "observer"


#: The role of a session's own user (its ``user_id``) among its participants: implicit from the
#: creation, never joined, never left.
OWNER = "owner"


# --------------------------------------------------------------------------- events


class _Event(msgspec.Struct, frozen=True, tag=True, kw_only=True, gc=False):
    at: float  # host clock, seconds since the epoch


class SessionCreated(_Event, frozen=True):
    session_id: str
    user_id: str
    tier: str
    metadata: Metadata
    idle_timeout: float
    max_age: float
    policy_version: int
    agent_id: str | None = None  # the agent it starts with; None: the client's default agent


class SessionTouched(_Event, frozen=True):
    operation: str


class TierChanged(_Event, frozen=True):
    old_tier: str
    new_tier: str
    idle_timeout: float
    max_age: float
    policy_version: int


class SessionExpired(_Event, frozen=True):
    reason: str  # "idle_timeout" | "max_age"


class SessionTerminated(_Event, frozen=True):
    reason: str


class UsageTracked(_Event, frozen=True):
    operation: str
    resource_type: str  # a QuotaType value
    amount: float
    metadata: Metadata
    window_start: float  # the quota window this usage counts in
    policy_version: int


class QuotaDenied(_Event, frozen=True):
    operation: str
    resource_type: str
    amount: float
    used: float
    limit: float
    resets_at: float
    policy_version: int


class RateAllowed(_Event, frozen=True):
    operation: str
    windows: tuple[str, ...]  # the RateLimitType values that were checked and recorded
    policy_version: int


class RateDenied(_Event, frozen=True):
    operation: str
    limit_type: str
    limit: int
    retry_after: float
    policy_version: int


class SlotAcquired(_Event, frozen=True):
    operation: str
    lease_id: str
    expires_at: float
    fencing_token: int  # grows with every grant: a stale holder's token is always lower
    policy_version: int


class SlotReleased(_Event, frozen=True):
    operation: str
    lease_id: str


class SlotExpired(_Event, frozen=True):
    operation: str
    lease_id: str


class SlotDenied(_Event, frozen=True):
    operation: str
    scope: str  # "operation" or "total"
    active: int
    limit: int
    policy_version: int


class Reserved(_Event, frozen=True):
    """Quota held for work whose cost is known only afterwards (settle it, or it expires)."""

    operation: str
    reservation_id: str
    amounts: dict[str, float]  # QuotaType value -> amount held
    expires_at: float
    token: int  # from the same counter as fencing tokens
    policy_version: int


class ReservationSettled(_Event, frozen=True):
    """The hold is released; the actual amounts are UsageTracked events in the same command."""

    operation: str
    reservation_id: str
    amounts: dict[str, float]  # what was actually used (charged)


class ReservationReleased(_Event, frozen=True):
    reservation_id: str
    reason: str  # "expired" | "cancelled"


class QuotaAdjusted(_Event, frozen=True):
    """A session's quota limit set (temporarily, until ``until``) or, with ``limit`` None, reset."""

    resource_type: str
    limit: float | None
    until: float | None
    policy_version: int


class MessagePosted(_Event, frozen=True):
    """A message on one of the session's channels ("chat", "progress", "notification", ...);
    subscribers resume a channel from its stream sequence."""

    channel: str
    text: str
    metadata: Metadata
    author: str | None = None  # the posting user (the owner or a participant); None: a service


class ParticipantJoined(_Event, frozen=True):
    """A user takes part in the session with ``role`` ("participant" or "observer"); joining
    again changes the role."""

    user_id: str
    role: str


class ParticipantLeft(_Event, frozen=True):
    user_id: str


class AgentAssigned(_Event, frozen=True):
    """The session is handed over to agent ``agent_id``: its replies come from that agent from
    here on. ``previous`` is the agent it had (None: the client's default agent)."""

    agent_id: str
    previous: str | None


SessionEvent = (
    SessionCreated
    | SessionTouched
    | TierChanged
    | SessionExpired
    | SessionTerminated
    | UsageTracked
    | QuotaDenied
    | RateAllowed
    | RateDenied
    | SlotAcquired
    | SlotReleased
    | SlotExpired
    | SlotDenied
    | Reserved
    | ReservationSettled
    | ReservationReleased
    | QuotaAdjusted
    | MessagePosted
    | ParticipantJoined
    | ParticipantLeft
    | AgentAssigned
)


class TenantPolicyChanged(_Event, frozen=True):
    """A tenant's effective tier policy (the packaged one with the tenant's overrides merged in).
    ``policy.version`` grows with every change, and every decision records the version it used."""

    policy: Policy
    overrides: Metadata  # what the tenant changed, as given (for the audit)


class UserQuotaAdjusted(_Event, frozen=True):
    """A quota limit for every session of one user (until ``until``); ``limit`` None resets it."""

    user_id: str
    resource_type: str
    limit: float | None
    until: float | None


class ApiKeyIssued(_Event, frozen=True):
    """An API key of the tenant's HTTP API: who it speaks for (``role``; a ``user`` key: one
    ``user_id``'s sessions) and until when. Only the SHA-256 of its secret is ever stored."""

    key_id: str
    secret_hash: str  # sha256(secret) as hex; never shown (not in audits, lists or errors)
    role: str  # an ApiKeyRole value
    user_id: str | None
    label: str | None
    expires_at: float | None


class ApiKeyRevoked(_Event, frozen=True):
    key_id: str


class ApiKeyUsed(_Event, frozen=True):
    """The key was used at ``used_at`` (recorded at most every few minutes per key)."""

    key_id: str
    used_at: float


TenantEvent = TenantPolicyChanged | UserQuotaAdjusted | ApiKeyIssued | ApiKeyRevoked | ApiKeyUsed


class UserSessionOpened(_Event, frozen=True):
    """A session counts against its user's ``max_sessions_per_user`` from here on."""

    session_id: str
    tier: str
    policy_version: int


class UserSessionClosed(_Event, frozen=True):
    session_id: str
    reason: str  # "terminated" | "expired" | "not_created" | ...


class UserSessionDenied(_Event, frozen=True):
    session_id: str
    tier: str
    active: int
    limit: int
    policy_version: int


class AlertRaised(_Event, frozen=True):
    """Abuse or anomaly detection flagged a user or session (appended on the user's aggregate;
    the session also gets a message on its "notification" channel)."""

    kind: str  # "usage_spike" | "denial_burst" | "session_burst"
    user_id: str
    session_id: str | None  # None: about the user as a whole
    detail: str  # what was seen, for people
    value: float  # the observed figure (rate, count, ...)
    threshold: float  # what it was compared with
    trigger_seq: int  # stream sequence of the commit that tripped it


class UserErased(_Event, frozen=True):
    """``forget_user``: the user's memories are removed from every index and their data key is
    destroyed, so what they wrote is unrecoverable from the log as well (crypto-shredding)."""

    user_id: str


UserEvent = UserSessionOpened | UserSessionClosed | UserSessionDenied | AlertRaised | UserErased


# ---- memory: one aggregate per memory scope (``<scope>:<owner>``, e.g. ``user:u1``) ----------
#
# Texts, vectors and metadata travel encrypted with the author's data key (``sealed``): the log
# never holds them in the clear, and erasing the key makes them unrecoverable.


class MemoryRemembered(_Event, frozen=True):
    memory_id: str
    scope: str  # "session" | "user" | "agent" | "group" | "tenant"
    owner: str
    author: str  # the user whose key seals it
    key: str | None
    kind: str
    importance: float
    model_id: str
    size: int  # bytes of text, counted against storage
    sealed: bytes  # encrypted msgpack of {text, vector, metadata}
    valid_from: float
    expires_at: float | None
    updated: bool  # a near-duplicate write updated an existing memory


class MemorySuperseded(_Event, frozen=True):
    memory_id: str
    by: str  # the newer memory with the same key
    valid_to: float


class MemoryForgotten(_Event, frozen=True):
    memory_id: str
    reason: str  # "deleted" | "expired" | "erased"


class AuthorErased(_Event, frozen=True):
    """ForgetAuthor in one scope: everything ``author`` wrote there is gone, superseded memories
    included (the scope's state no longer lists those; the index removes every row of theirs)."""

    author: str


class CacheSet(_Event, frozen=True):
    key: str
    author: str
    sealed: bytes
    size: int
    importance: float
    expires_at: float | None


class CacheHit(_Event, frozen=True):
    key: str


class CacheRemoved(_Event, frozen=True):
    key: str
    reason: str  # "deleted" | "expired" | "evicted" | "erased"
    score: float | None = None  # the retention score that lost, for an eviction


class MembersChanged(_Event, frozen=True):
    """Who may read and write a group (or agent) scope."""

    added: tuple[str, ...]
    removed: tuple[str, ...]


# ---- the knowledge graph, on the same memory aggregates -----------------------------------
#
# Entity and relation ids, predicates and entity types travel in the clear (the aggregate
# decides with them); names, aliases, their vectors and a fact's evidence are sealed with the
# author's key like memories, so erasing the key leaves ids and predicates that say nothing.


class EntityNoted(_Event, frozen=True):
    """A new node: one person, place, organisation or thing."""

    entity_id: str
    author: str
    entity_type: str
    name_mac: str  # keyed fingerprint of the normalised name (the author's key): exact dedupe
    model_id: str
    sealed: bytes  # encrypted msgpack of SealedName {name, aliases, vector}


class EntityAliased(_Event, frozen=True):
    """Another name for a node (a mention resolved to it, or an alias given)."""

    entity_id: str
    author: str
    name_mac: str
    model_id: str
    sealed: bytes  # SealedName {name: the alias, aliases: [], vector}


class RelationStated(_Event, frozen=True):
    """A fact ``subject predicate object`` holding from ``valid_from`` (until ``valid_to`` if
    stated, else until it is ended); its recorded time is its commit's."""

    relation_id: str
    author: str
    subject: str  # entity ids
    predicate: str
    object: str
    valid_from: float
    valid_to: float | None
    source: str | None  # the memory (or message) it was extracted from
    sealed: bytes  # SealedFact {evidence, metadata}


class RelationEnded(_Event, frozen=True):
    """A fact stopped holding at ``valid_to`` (it is kept: ``as_of`` and ``valid_at`` see it)."""

    relation_id: str
    subject: str
    valid_to: float
    reason: str  # "contradicted" (by ``by``, of a functional predicate) | "ended"
    by: str | None = None


class EntityForgotten(_Event, frozen=True):
    entity_id: str
    reason: str  # "deleted" | "erased"


class RelationForgotten(_Event, frozen=True):
    relation_id: str
    subject: str
    reason: str  # "deleted" (its entity was forgotten) | "erased"


GraphEvent = EntityNoted | EntityAliased | RelationStated | RelationEnded | EntityForgotten | RelationForgotten

MemoryEvent = (
    MemoryRemembered | MemorySuperseded | MemoryForgotten | AuthorErased | CacheSet | CacheHit | CacheRemoved
    | MembersChanged | GraphEvent
)
Event = SessionEvent | TenantEvent | UserEvent | MemoryEvent


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why a command was refused; the API layer turns it into a typed error by ``code``."""

    code: str
    message: str
    fields: dict[str, str | int | float | bool | None] = {}


class Applied(msgspec.Struct, frozen=True, gc=False):
    """One command's effect inside a commit: who asked, under which id, what it caused and,
    if it was refused (a refusal is recorded too: ``RateDenied``, ...), why. A retry of the
    command id gets the same answer."""

    command_id: str
    principal: str
    events: tuple[Event, ...]
    rejection: Rejection | None = None
    # a digest of the command itself, so a different command sent under a used id is told
    # apart from a retry ("" in commits written before digests were recorded)
    digest: str = ""


class Commit(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One JetStream message, appended atomically: the effects of 1..n commands to one aggregate
    (an actor batches the commands that queued up while its previous append was in flight)."""

    schema: int = SCHEMA_VERSION
    at: float  # host clock when the commands were decided
    version: int  # the aggregate's own version after this commit (1, 2, ...)
    commands: tuple[Applied, ...]

    @property
    def events(self) -> tuple[Event, ...]:
        return tuple(e for c in self.commands for e in c.events)

    @property
    def command_ids(self) -> tuple[str, ...]:
        return tuple(c.command_id for c in self.commands)


def upcast(commit: Commit) -> Commit:
    """Bring a commit written by an older schema up to the current one (none exist yet)."""
    return commit


# --------------------------------------------------------------------------- commands
#
# Commands carry their limits as msgspec constraints, built from the one table in
# actors.validation; actors.validation.validate() holds a command built in process to them too,
# and adds what a constraint cannot say (valid Unicode, finite floats, JSON-safe integers, the
# size and depth of metadata). Events carry none: a shipped event must always decode.

Token = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=TOKEN_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_NAME_LENGTH)]
FiniteAmount = Annotated[float, msgspec.Meta(ge=0, le=MAX_AMOUNT)]
Duration = Annotated[float, msgspec.Meta(gt=0, le=MAX_DURATION)]
Instant = Annotated[float, msgspec.Meta(ge=0, le=MAX_INSTANT)]  # seconds since the epoch
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_SAFE_INT)]


class CreateSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    user_id: Token
    tier: Name = "free"
    metadata: Metadata = {}
    agent_id: Token | None = None  # None: the client's default agent


class TouchSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    operation: Name = "activity"


class ChangeTier(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    tier: Name


class TerminateSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    reason: Name = "terminated"


class GetSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """A query: answered from the actor's state after catching up with the log; appends nothing."""


class TrackUsage(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    operation: Name
    resource_type: QuotaType
    amount: FiniteAmount
    metadata: Metadata = {}


class CheckRate(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Admit one request of ``operation`` if every checked window has room (all or nothing)."""

    operation: Name
    limit_type: RateLimitType | None = None  # None: every window


class AcquireSlot(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    operation: Name
    lease_seconds: Duration | None = None


class ReleaseSlot(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    operation: Name
    lease_id: Name | None = None  # None: the oldest lease of this operation


Costs = dict[QuotaType, FiniteAmount]


class Admit(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Quotas for ``costs``, every rate window and a concurrency slot in one decision: all
    admitted together or nothing. ``reserve`` holds the costs (settle them later) instead of
    charging them now."""

    operation: Name
    costs: Costs = {}
    rate: bool = True
    slot: bool = True
    reserve: bool = False
    lease_seconds: Duration | None = None
    hold_seconds: Duration | None = None


class Settle(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Charge what a reserved piece of work actually used (None: nothing) and release the hold."""

    reservation_id: Name
    actual: Costs | None = None


class AdjustQuota(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Set a session's limit for one quota (a boost or a cut) until ``until``; None resets it."""

    resource_type: QuotaType
    limit: FiniteAmount | None
    until: Instant | None = None


class PostMessage(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Post on a channel; with ``author`` (the posting user) only the owner or a participant
    may (an observer or a stranger is refused: ``access_denied``); without, a service posts."""

    channel: Token = "chat"
    text: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_LENGTH)] = ""
    metadata: Metadata = {}
    author: Token | None = None


class JoinSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Let ``user_id`` take part in the session with ``role``; again: change the role. The
    owner (the session's user) cannot be re-roled."""

    user_id: Token
    role: ParticipantRole = ParticipantRole.PARTICIPANT


class LeaveSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """``user_id`` no longer takes part (refused for the owner and for a non-participant)."""

    user_id: Token


class AssignAgent(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Hand the session over to agent ``agent_id`` (assigning the agent it has: no change)."""

    agent_id: Token


SessionCommand = (
    CreateSession
    | TouchSession
    | ChangeTier
    | TerminateSession
    | GetSession
    | TrackUsage
    | CheckRate
    | AcquireSlot
    | ReleaseSlot
    | Admit
    | Settle
    | AdjustQuota
    | PostMessage
    | JoinSession
    | LeaveSession
    | AssignAgent
)


class SetTenantPolicy(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Merge ``overrides`` (any part of the tier policy document) into the tenant's policy."""

    overrides: Metadata


class AdjustUserQuota(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    user_id: Token
    resource_type: QuotaType
    limit: FiniteAmount | None
    until: Instant | None = None


ApiKeyId = Annotated[str, msgspec.Meta(pattern=API_KEY_ID_PATTERN)]


class IssueApiKey(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Issue an API key; the shell makes ``key_id`` and the secret, and sends only the secret's
    SHA-256 (``secret_hash``, hex). ``user_id`` is required for role ``user``, refused otherwise."""

    key_id: ApiKeyId
    secret_hash: Annotated[str, msgspec.Meta(pattern=SECRET_HASH_PATTERN)]
    role: ApiKeyRole
    user_id: Token | None = None
    label: Name | None = None
    expires_at: Instant | None = None


class RevokeApiKey(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    key_id: ApiKeyId


class RecordKeyUse(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Record that the key was used at ``at`` (seconds since the epoch)."""

    key_id: ApiKeyId
    at: Instant


TenantCommand = SetTenantPolicy | AdjustUserQuota | IssueApiKey | RevokeApiKey | RecordKeyUse | GetSession


class OpenUserSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    session_id: Token
    tier: Name


class CloseUserSessions(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    session_ids: tuple[Token, ...]
    reason: Name = "terminated"


class RaiseAlert(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    kind: Name
    session_id: Token | None
    detail: Annotated[str, msgspec.Meta(max_length=MAX_MESSAGE_LENGTH)]
    value: float
    threshold: float
    trigger_seq: Count


class EraseUser(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    pass


UserCommand = OpenUserSession | CloseUserSessions | RaiseAlert | EraseUser | GetSession


class Remember(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    memory_id: Name
    scope: Name
    owner: Token
    author: Token
    key: Name | None
    kind: Name
    importance: Fraction
    model_id: Name
    size: Count
    sealed: bytes
    expires_at: Instant | None
    duplicate_of: Name | None  # an existing memory this one is a near-duplicate of (shell's search)
    text_mac: Name | None = None  # a keyed fingerprint of what is sealed: equal on a retry

    # drawn anew on every try (a fresh nonce, the clock, the index's search): left out of the
    # command's idempotency digest, which ``text_mac`` stands in for (see actors.idempotency)
    volatile: ClassVar[tuple[str, ...]] = ("memory_id", "sealed", "expires_at", "duplicate_of")


class ForgetMemory(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    memory_id: Name


class ForgetAuthor(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Remove everything ``author`` wrote in this scope (erasure)."""

    author: Token


class SetCache(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    key: Name
    author: Token
    sealed: bytes
    size: Count
    importance: Fraction
    expires_at: Instant | None
    capacity: Count  # entries the scope may hold (the tier's); beyond it the lowest score goes


class GetCache(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    key: Name


class DeleteCache(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    key: Name


class ChangeMembers(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    add: tuple[Token, ...] = ()
    remove: tuple[Token, ...] = ()


Predicate = Annotated[str, msgspec.Meta(pattern=PREDICATE_PATTERN)]


class EntitySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A mention of an entity in a command: the node the shell resolved it to (``resolved``,
    by name, alias, string and embedding similarity over the graph projection), or a new one
    (``entity_id``). The aggregate also merges by ``name_mac`` (exact name, same author), which
    holds under concurrency. ``alias``: the mention is a name the resolved node lacks."""

    entity_id: Name
    entity_type: Predicate
    name_mac: Name
    sealed: bytes  # SealedName of this mention
    resolved: Name | None = None
    alias: bool = False


class NoteEntity(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    author: Token
    model_id: Name
    entity: EntitySpec
    aliases: tuple[EntitySpec, ...] = ()  # more names of it, each sealed on its own

    volatile: ClassVar[tuple[str, ...]] = ("entity", "aliases")


class Relate(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    relation_id: Name
    author: Token
    model_id: Name
    subject: EntitySpec
    predicate: Predicate
    object: EntitySpec
    valid_from: Instant
    valid_to: Instant | None
    functional: bool  # a predicate with one value at a time (configuration): a new object ends the old
    sealed: bytes  # SealedFact
    source: Name | None = None
    content_mac: Name | None = None  # keyed fingerprint of names and evidence: equal on a retry

    volatile: ClassVar[tuple[str, ...]] = ("relation_id", "subject", "object", "sealed", "valid_from")


class EndRelation(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    relation_id: Name
    subject: Name  # its subject's entity id (from the projection): the aggregate files facts by subject
    valid_to: Instant


class ForgetEntity(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """Remove a node and every fact about it."""

    entity_id: Name


GraphCommand = NoteEntity | Relate | EndRelation | ForgetEntity

MemoryCommand = (
    Remember | ForgetMemory | ForgetAuthor | SetCache | GetCache | DeleteCache | ChangeMembers | GetSession
    | GraphCommand
)


class Decision(msgspec.Struct, frozen=True, gc=False):
    """What a command decided: events to append (possibly none) and, if refused, why.

    A refusal may still carry events (``SessionExpired``, ``RateDenied``, ...) so the log
    records the decision either way.
    """

    events: tuple[Event, ...] = ()
    rejection: Rejection | None = None


# --------------------------------------------------------------------------- wire (request/reply)


class CommandRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of a request on ``bbcmd.<tenant>.<session_id>``; tenant and session come from the subject."""

    command: SessionCommand
    command_id: Token | None = None
    principal: Name = "anonymous"


class SessionView(msgspec.Struct, frozen=True, gc=False):
    """A session as the API reports it (times in seconds since the epoch)."""

    session_id: str
    user_id: str
    tenant: str
    tier: str
    status: SessionStatus
    metadata: Metadata
    created_at: float
    last_activity: float
    idle_timeout: float
    max_age: float
    concurrent_operations: int = 0
    version: int = 0
    sequence: int = 0
    usage: dict[str, tuple[float, float]] = {}  # quota -> (window_start, used)
    rate_logs: dict[str, bytes] = {}
    leases: dict[str, tuple[str, float, int]] = {}
    reservations: dict[str, tuple[str, dict[str, float], float]] = {}
    boosts: dict[str, tuple[float, float | None]] = {}
    participants: dict[str, str] = {}  # user_id -> role ("owner", "participant", "observer")
    agent_id: str | None = None  # the agent that answers; None: the client's default agent


class CommandReply(msgspec.Struct, frozen=True, gc=False):
    session: SessionView | None = None
    rejection: Rejection | None = None
    sequence: int = 0
    duplicate: bool = False
    events: tuple[Event, ...] = ()  # what the command caused (empty for a duplicate)
