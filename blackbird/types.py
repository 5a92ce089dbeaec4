"""Public value types: Session and SessionStatus."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from actors.events import SessionStatus, SessionView
from actors.policy import QuotaType

__all__ = ["Admission", "Entity", "Memory", "Neighbor", "Relation", "Session", "SessionStatus", "UsageRecord"]


class UsageRecord(msgspec.Struct, frozen=True):
    """One tracked usage, as given to usage callbacks."""

    session_id: str
    user_id: str
    tenant: str
    operation: str
    resource_type: QuotaType
    amount: float
    metadata: dict[str, Any]
    timestamp: float


class Admission(msgspec.Struct, frozen=True, kw_only=True):
    """What :meth:`admit` granted, all together: charged or reserved quota, a rate admission
    in every window, a concurrency slot (a lease with a fencing token).

    Give the slot back with ``release_slot(session_id, operation, lease_id=...)`` and settle a
    reservation with ``settle(session_id, reservation_id, actual)``; both also expire by
    themselves (``lease_expires_at``, ``reservation_expires_at``).
    """

    session_id: str
    operation: str
    charged: dict[str, float] = {}
    reserved: dict[str, float] = {}
    reservation_id: str | None = None
    reservation_expires_at: float | None = None
    rate_windows: tuple[str, ...] = ()
    lease_id: str | None = None
    fencing_token: int | None = None
    lease_expires_at: float | None = None
    sequence: int = 0
    duplicate: bool = False  # a retried command id: granted before, ids not repeated here


class Memory(msgspec.Struct, frozen=True, kw_only=True):
    """A memory as written or recalled. From :meth:`recall`, ``score`` is the final rank and
    ``scores`` its parts (similarity, keyword, recency, importance, each 0..1 before weighting);
    ``sequence`` is where the log holds it (provenance)."""

    memory_id: str
    text: str
    scope: str
    owner: str
    author: str
    key: str | None = None
    kind: str = "fact"
    importance: float = 0.5
    metadata: dict[str, Any] = {}
    valid_from: float = 0.0
    valid_to: float | None = None  # set once a newer memory with the same key superseded it
    sequence: int = 0
    score: float | None = None
    scores: dict[str, float] = {}
    updated: bool = False  # remember(): a near-duplicate was updated instead of a new memory
    superseded: str | None = None  # remember(): the memory with the same key it replaced
    # recall(expand=1): the facts one hop from the entities this memory is linked to
    facts: tuple[Relation, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class Entity(msgspec.Struct, frozen=True, kw_only=True):
    """A node of the knowledge graph: one person, place, organisation or thing, whatever it was
    called (``aliases``). ``recorded_at``/``sequence``: when the log first recorded it."""

    entity_id: str
    name: str
    entity_type: str = "thing"
    aliases: tuple[str, ...] = ()
    scope: str = "user"
    owner: str = ""
    author: str = ""
    recorded_at: float = 0.0
    sequence: int = 0

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class Relation(msgspec.Struct, frozen=True, kw_only=True):
    """A fact of the knowledge graph, ``subject predicate object``, bi-temporal.

    Valid time: it holds from ``valid_from`` until ``valid_to`` (None: still holds, as far as is
    known). Recorded time: the log recorded it at ``recorded_at`` (``sequence``) and, if it has
    ended, recorded its end at ``ended_at`` (``ended_by``: the fact that contradicted it)."""

    relation_id: str
    subject: str
    predicate: str
    object: str
    subject_id: str = ""
    object_id: str = ""
    valid_from: float = 0.0
    valid_to: float | None = None
    recorded_at: float = 0.0
    sequence: int = 0
    ended_at: float | None = None
    ended_by: str | None = None
    scope: str = "user"
    owner: str = ""
    author: str = ""
    evidence: str | None = None
    source: str | None = None  # the memory (or message) it was extracted from
    metadata: dict[str, Any] = {}

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class Neighbor(msgspec.Struct, frozen=True, kw_only=True):
    """An entity reached from another by ``neighbors``: how many hops away, and the fact that
    reached it (from the entity one hop nearer)."""

    entity: Entity
    depth: int
    via: Relation

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]


class Session(SessionView, frozen=True):
    """A session as of the moment it was read (fields from :class:`SessionView`, times in seconds
    since the epoch). Time-derived properties use the current clock."""

    @classmethod
    def from_view(cls, view: SessionView) -> Session:
        session = cls(*msgspec.structs.astuple(view))  # every reply makes one: the C-speed copy
        if not view.leases:
            return session
        # A lease past its expiry no longer holds a slot, even before the actor records it.
        now = time.time()
        live = sum(1 for _, expires_at, _ in view.leases.values() if expires_at > now)
        return msgspec.structs.replace(session, concurrent_operations=live)

    @property
    def age_seconds(self) -> float:
        return max(0.0, time.time() - self.created_at)

    @property
    def idle_seconds(self) -> float:
        return max(0.0, time.time() - self.last_activity)

    @property
    def is_active(self) -> bool:
        """Active, not terminated, within its idle timeout and maximum age."""
        return self.active_at(time.time())

    def active_at(self, now: float) -> bool:
        """Whether the session is active at instant ``now`` (seconds since the epoch)."""
        return (
            self.status is SessionStatus.ACTIVE
            and now - self.last_activity < self.idle_timeout
            and now - self.created_at < self.max_age
        )

    @property
    def effective_status(self) -> SessionStatus:
        """``status`` with lapsed time limits applied (an active session past them is expired)."""
        if self.status is SessionStatus.ACTIVE and not self.is_active:
            return SessionStatus.EXPIRED
        return self.status

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of the session, including the derived fields."""
        data: dict[str, Any] = msgspec.to_builtins(self)
        del data["rate_logs"]  # internal packed timestamps; see get_rate_limits()
        data["status"] = self.effective_status.value
        data["is_active"] = self.is_active
        data["age_seconds"] = self.age_seconds
        data["idle_seconds"] = self.idle_seconds
        return data
