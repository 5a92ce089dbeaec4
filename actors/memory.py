"""The memory aggregate (pure): what a write, an expiry or an eviction means for one scope.

There is one per memory scope, ``<scope>:<owner>`` (``user:u1``, ``session:s1``,
``group:research``, ``agent:planner``, ``tenant:acme``). It decides what a memory write means —
a new memory, an update of a near-duplicate (the shell found it by vector search and says so in
the command), or a newer memory with the same ``key`` superseding the old one (``valid_to`` set,
so ``as_of`` queries still see it) — and keeps the key-value cache, evicting by a retention
score rather than plain LRU. Expiry (retention periods, cache TTLs) is decided here as events.
Texts travel sealed (encrypted by the author's key).
"""

from __future__ import annotations

import math

import msgspec

from actors import aggregate, graph
from actors.events import (
    AuthorErased,
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
    GraphCommand,
    GraphEvent,
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
    next_expiry: float | None = None  # the earliest expires_at of any memory or cache entry
    recent_commands: bytes = b""
    recent_digests: bytes = b""
    recent_refusals: dict[str, Rejection] = {}
    graph: graph.GraphState = graph.GraphState()  # the scope's knowledge graph (actors.graph)


def retention_score(entry: CacheEntry, now: float) -> float:
    """Higher is kept longer: importance + frequency + recency (each about 0..1)."""
    recency = math.exp(-max(0.0, now - entry.last_access) * math.log(2) / RECENCY_HALF_LIFE)
    frequency = math.log1p(entry.hits) / math.log1p(100)
    return entry.importance + min(frequency, 1.0) + recency


def earliest_expiry(state: MemoryState) -> float | None:
    times = [m.expires_at for m in state.memories.values() if m.expires_at is not None]
    times += [c.expires_at for c in state.cache.values() if c.expires_at is not None]
    return min(times, default=None)


def _with_expiry(state: MemoryState, removed: float | None, added: float | None) -> MemoryState:
    """``state`` with ``next_expiry`` kept right after an entry expiring at ``removed`` left
    and/or one expiring at ``added`` came (a full scan only when the earliest one left)."""
    current = state.next_expiry
    if removed is not None and removed == current:
        current = earliest_expiry(state)
    elif added is not None and (current is None or added < current):
        current = added
    return state if current == state.next_expiry else msgspec.structs.replace(state, next_expiry=current)


def housekeeping(state: MemoryState, now: float) -> tuple[Event, ...]:
    """Expiry events for memories past their retention and cache entries past their TTL."""
    if state.next_expiry is None or state.next_expiry > now:
        return ()  # nothing is due: no scan (a scope may hold many thousands of memories)
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
    if isinstance(command, GraphCommand):
        return graph.decide(state.graph, command, now)
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
        gone += graph.forget(state.graph, set(), (command.author,), "erased", now)
        # always, even with nothing of theirs current: their superseded memories are in the index
        gone.append(AuthorErased(at=now, author=command.author))
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
    state, removed, added = _evolve(state, event)
    if removed is None and added is None:
        return state
    return _with_expiry(state, removed, added)


def _evolve(state: MemoryState, event: Event) -> tuple[MemoryState, float | None, float | None]:
    """The new state, and the expiry of an entry that left and of one that came (if any)."""
    replace = msgspec.structs.replace
    if isinstance(event, GraphEvent):
        return replace(state, graph=graph.evolve(state.graph, event)), None, None
    if isinstance(event, AuthorErased):
        return state, None, None  # the memories and entries it covers left with their own events
    if isinstance(event, MemoryRemembered):
        memories = dict(state.memories)
        previous = memories.get(event.memory_id)
        memories[event.memory_id] = MemoryInfo(event.author, event.key, event.size, event.expires_at)
        keys = state.keys
        if event.key is not None:
            keys = {**keys, event.key: event.memory_id}
        stored = state.stored_bytes + event.size - (previous.size if previous else 0)
        new = replace(state, memories=memories, keys=keys, stored_bytes=stored)
        return new, previous.expires_at if previous else None, event.expires_at
    if isinstance(event, (MemorySuperseded, MemoryForgotten)):
        info = state.memories.get(event.memory_id)
        if info is None:
            return state, None, None
        memories = dict(state.memories)  # a C-speed copy: a scope may hold 100,000 memories
        del memories[event.memory_id]
        keys = {k: v for k, v in state.keys.items() if v != event.memory_id}
        new = replace(state, memories=memories, keys=keys, stored_bytes=state.stored_bytes - info.size)
        return new, info.expires_at, None
    if isinstance(event, CacheSet):
        old = state.cache.get(event.key)
        entry = CacheEntry(
            author=event.author, sealed=event.sealed, size=event.size, importance=event.importance,
            expires_at=event.expires_at, hits=old.hits if old else 0, last_access=event.at,
        )
        new = replace(state, cache={**state.cache, event.key: entry})
        return new, old.expires_at if old else None, event.expires_at
    if isinstance(event, CacheHit):
        old = state.cache.get(event.key)
        if old is None:
            return state, None, None
        hit = msgspec.structs.replace(old, hits=old.hits + 1, last_access=event.at)
        return replace(state, cache={**state.cache, event.key: hit}), None, None
    if isinstance(event, CacheRemoved):
        old = state.cache.get(event.key)
        new = replace(state, cache={k: v for k, v in state.cache.items() if k != event.key})
        return new, old.expires_at if old else None, None
    if isinstance(event, MembersChanged):
        members = [m for m in state.members if m not in event.removed]
        members += [m for m in event.added if m not in members]
        return replace(state, members=tuple(members)), None, None
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
