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
from typing import Annotated, Any

import msgspec

SCHEMA_VERSION = 1

Metadata = dict[str, Any]  # user-supplied, JSON-serialisable; validated at the edge


class SessionStatus(str, enum.Enum):
    """Lifecycle status of a session. ``str(status.value)`` is what the API reports."""

    ACTIVE = "active"
    EXPIRED = "expired"
    TERMINATED = "terminated"

    def __str__(self) -> str:
        return self.value


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


SessionEvent = SessionCreated | SessionTouched | TierChanged | SessionExpired | SessionTerminated
Event = SessionEvent


class Applied(msgspec.Struct, frozen=True, gc=False):
    """One command's effect inside a commit: who asked, under which id, and what it caused."""

    command_id: str
    principal: str
    events: tuple[Event, ...]


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

Token = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[^.*>\s]+$")]


class CreateSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    user_id: Token
    tier: str = "free"
    metadata: Metadata = {}


class TouchSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    operation: str = "activity"


class ChangeTier(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    tier: str


class TerminateSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    reason: str = "terminated"


class GetSession(msgspec.Struct, frozen=True, tag=True, forbid_unknown_fields=True):
    """A query: answered from the actor's state after catching up with the log; appends nothing."""


SessionCommand = CreateSession | TouchSession | ChangeTier | TerminateSession | GetSession


class Rejection(msgspec.Struct, frozen=True, gc=False):
    """Why a command was refused; the API layer turns it into a typed error by ``code``."""

    code: str
    message: str
    fields: dict[str, str | int | float | bool | None] = {}


# --------------------------------------------------------------------------- wire (request/reply)


class CommandRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of a request on ``bbcmd.<tenant>.<session_id>``; tenant and session come from the subject."""

    command: SessionCommand
    command_id: Annotated[str, msgspec.Meta(min_length=1, max_length=128)] | None = None
    principal: str = "anonymous"


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


class CommandReply(msgspec.Struct, frozen=True, gc=False):
    session: SessionView | None = None
    rejection: Rejection | None = None
    sequence: int = 0
    duplicate: bool = False
