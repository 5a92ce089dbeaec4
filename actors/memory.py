"""The memory aggregate (pure): one per memory scope, ``<scope>:<owner>`` (``user:u1``,
``session:s1``, ``group:research``, ``agent:planner``, ``tenant:acme``).

It decides what a memory write means — a new memory, an update of a near-duplicate (the shell
found it by vector search and says so in the command), or a newer memory with the same ``key``
superseding the old one (``valid_to`` set, so ``as_of`` queries still see it) — and keeps the
key-value cache, evicting by a retention score rather than plain LRU. Expiry (retention periods,
cache TTLs) is decided here as events. Texts travel sealed (encrypted by the author's key).
"""

from __future__ import annotations

import math

import msgspec

from actors import aggregate
from actors.events import (
    CacheHit,
    CacheRemoved,
    CacheSet,
    ChangeMembers,
    Decision,
    DeleteCache,
    Event,
    ForgetAuthor,
    ForgetMemory,
    GetCache,
    GetSession,
    MembersChanged,
    MemoryCommand,
    MemoryForgotten,
    MemoryRemembered,
    MemorySuperseded,
    Rejection,
    Remember,
    SetCache,
)
from actors.ports import AggregateKey

SCOPES = ("session", "user", "agent", "group", "tenant")

#: Retention score weights: importance, access frequency (log of hits) and recency (halves every
#: RECENCY_HALF_LIFE seconds since the last access). The lowest score is evicted first.
RECENCY_HALF_LIFE = 3600.0


class MemoryInfo(msgspec.Struct, frozen=True, gc=False):
    author: str
    key: str | None
    size: int
    expires_at: float | None


class CacheEntry(msgspec.Struct, frozen=True, gc=False):
    author: str
    sealed: bytes
    size: int
    importance: float
    expires_at: float | None
    hits: int
    last_access: float


class MemoryState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    tenant: str
    scope_id: str  # "<scope>:<owner>"
    version: int = 0
    memories: dict[str, MemoryInfo] = {}  # live memory id -> info
    keys: dict[str, str] = {}  # key -> the current memory id with that key
    cache: dict[str, CacheEntry] = {}
    members: tuple[str, ...] = ()  # for group and agent scopes
    stored_bytes: int = 0
    recent_commands: bytes = b""
    recent_refusals: dict[str, Rejection] = {}


def retention_score(entry: CacheEntry, now: float) -> float:
    """Higher is kept longer: importance + frequency + recency (each about 0..1)."""
    recency = math.exp(-max(0.0, now - entry.last_access) * math.log(2) / RECENCY_HALF_LIFE)
    frequency = math.log1p(entry.hits) / math.log1p(100)
    return entry.importance + min(frequency, 1.0) + recency


def housekeeping(state: MemoryState, now: float) -> tuple[Event, ...]:
    """Expiry events for memories past their retention and cache entries past their TTL."""
    expired: list[Event] = [
        MemoryForgotten(at=now, memory_id=mid, reason="expired")
        for mid, info in state.memories.items()
        if info.expires_at is not None and info.expires_at <= now
    ]
    expired += [
        CacheRemoved(at=now, key=key, reason="expired")
        for key, entry in state.cache.items()
        if entry.expires_at is not None and entry.expires_at <= now
    ]
    return tuple(expired)


def decide(state: MemoryState, command: MemoryCommand, now: float) -> Decision:
    expired = housekeeping(state, now)
    for event in expired:
        state = evolve(state, event)
    decision = _decide(state, command, now)
    if expired:
        return Decision(events=expired + decision.events, rejection=decision.rejection)
    return decision


def _decide(state: MemoryState, command: MemoryCommand, now: float) -> Decision:
    if isinstance(command, GetSession):
        return Decision()
    if isinstance(command, Remember):
        target = command.memory_id
        events: list[Event] = []
        if command.duplicate_of is not None and command.duplicate_of in state.memories:
            target = command.duplicate_of  # a near-duplicate: update it in place
        elif command.key is not None and command.key in state.keys:
            old = state.keys[command.key]
            events.append(MemorySuperseded(at=now, memory_id=old, by=target, valid_to=now))
        events.append(
            MemoryRemembered(
                at=now, memory_id=target, scope=command.scope, owner=command.owner,
                author=command.author, key=command.key, kind=command.kind,
                importance=command.importance, model_id=command.model_id, size=command.size,
                sealed=command.sealed, valid_from=now, expires_at=command.expires_at,
                updated=target != command.memory_id,
            )
        )
        return Decision(events=tuple(events))
    if isinstance(command, ForgetMemory):
        if command.memory_id not in state.memories:
            return Decision()  # already gone: forgetting is idempotent
        return Decision(events=(MemoryForgotten(at=now, memory_id=command.memory_id, reason="deleted"),))
    if isinstance(command, ForgetAuthor):
        gone: list[Event] = [
            MemoryForgotten(at=now, memory_id=mid, reason="erased")
            for mid, info in state.memories.items() if info.author == command.author
        ]
        gone += [
            CacheRemoved(at=now, key=key, reason="erased")
            for key, entry in state.cache.items() if entry.author == command.author
        ]
        return Decision(events=tuple(gone))
    if isinstance(command, SetCache):
        events = []
        if command.key not in state.cache and len(state.cache) >= command.capacity:
            if command.capacity == 0:
                return Decision(rejection=Rejection(
                    "validation_error", "cache: this tier holds no cache entries",
                    {"field": "key", "expected": "a tier with a cache capacity"},
                ))
            victim, score = min(
                ((key, retention_score(entry, now)) for key, entry in state.cache.items()),
                key=lambda pair: (pair[1], pair[0]),
            )
            events.append(CacheRemoved(at=now, key=victim, reason="evicted", score=score))
        events.append(
            CacheSet(
                at=now, key=command.key, author=command.author, sealed=command.sealed,
                size=command.size, importance=command.importance, expires_at=command.expires_at,
            )
        )
        return Decision(events=tuple(events))
    if isinstance(command, GetCache):
        if command.key not in state.cache:
            return Decision()
        return Decision(events=(CacheHit(at=now, key=command.key),))
    if isinstance(command, DeleteCache):
        if command.key not in state.cache:
            return Decision()
        return Decision(events=(CacheRemoved(at=now, key=command.key, reason="deleted"),))
    if isinstance(command, ChangeMembers):
        return Decision(events=(MembersChanged(at=now, added=command.add, removed=command.remove),))
    raise TypeError(f"not a memory command: {command!r}")


def evolve(state: MemoryState, event: Event) -> MemoryState:
    replace = msgspec.structs.replace
    if isinstance(event, MemoryRemembered):
        memories = dict(state.memories)
        previous = memories.get(event.memory_id)
        memories[event.memory_id] = MemoryInfo(event.author, event.key, event.size, event.expires_at)
        keys = state.keys
        if event.key is not None:
            keys = {**keys, event.key: event.memory_id}
        stored = state.stored_bytes + event.size - (previous.size if previous else 0)
        return replace(state, memories=memories, keys=keys, stored_bytes=stored)
    if isinstance(event, MemorySuperseded):
        info = state.memories.get(event.memory_id)
        memories = {k: v for k, v in state.memories.items() if k != event.memory_id}
        keys = {k: v for k, v in state.keys.items() if v != event.memory_id}
        return replace(
            state, memories=memories, keys=keys,
            stored_bytes=state.stored_bytes - (info.size if info else 0),
        )
    if isinstance(event, MemoryForgotten):
        info = state.memories.get(event.memory_id)
        if info is None:
            return state
        memories = {k: v for k, v in state.memories.items() if k != event.memory_id}
        keys = {k: v for k, v in state.keys.items() if v != event.memory_id}
        return replace(state, memories=memories, keys=keys, stored_bytes=state.stored_bytes - info.size)
    if isinstance(event, CacheSet):
        old = state.cache.get(event.key)
        entry = CacheEntry(
            author=event.author, sealed=event.sealed, size=event.size, importance=event.importance,
            expires_at=event.expires_at, hits=old.hits if old else 0, last_access=event.at,
        )
        return replace(state, cache={**state.cache, event.key: entry})
    if isinstance(event, CacheHit):
        old = state.cache.get(event.key)
        if old is None:
            return state
        hit = msgspec.structs.replace(old, hits=old.hits + 1, last_access=event.at)
        return replace(state, cache={**state.cache, event.key: hit})
    if isinstance(event, CacheRemoved):
        return replace(state, cache={k: v for k, v in state.cache.items() if k != event.key})
    if isinstance(event, MembersChanged):
        members = [m for m in state.members if m not in event.removed]
        members += [m for m in event.added if m not in members]
        return replace(state, members=tuple(members))
    raise TypeError(f"not a memory event: {event!r}")


def scope_id(scope: str, owner: str) -> str:
    return f"{scope}:{owner}"


class MemoryBehaviour(aggregate.Behaviour):
    state_type = MemoryState
    evolve = staticmethod(evolve)

    def initial_state(self, key: AggregateKey) -> MemoryState:
        return MemoryState(tenant=key.tenant, scope_id=key.id)

    def decide(self, state: MemoryState, command: MemoryCommand, now: float) -> Decision:
        return decide(state, command, now)
