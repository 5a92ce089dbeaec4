"""What the actor host needs from the outside world, as small protocols.

``blackbird.journal`` implements them over JetStream (stream + KV); tests use the same real
implementations against a real nats-server.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from actors.events import Commit


class AggregateKey(NamedTuple):
    """Identifies one aggregate (one actor): its tenant, kind ("session", "user") and id."""

    tenant: str
    kind: str
    id: str


class AppendResult(NamedTuple):
    seq: int  # stream sequence of the commit
    duplicate: bool  # the log already held a message with this id (a retried append)


class CommitTooLarge(Exception):
    """The encoded commit exceeds the log's message size (a batch may be split and retried)."""


class CommitUnencodable(Exception):
    """The log cannot encode the commit (a value its format cannot hold): a fault of the commands
    in it, not of the log. The host finds the command at fault and fails only that one."""


class AppendConflict(Exception):
    """Optimistic concurrency failed: the aggregate's last sequence was not the expected one."""


class Journal(Protocol):
    async def append(
        self, key: AggregateKey, commit: Commit, *, expected_seq: int, msg_id: str, deadline: float | None = None
    ) -> AppendResult:
        """Append one commit iff the aggregate's last sequence is ``expected_seq`` (0: none yet),
        answering by ``deadline`` (a ``time.monotonic()`` instant) at the latest."""
        ...

    async def last_seq(self, key: AggregateKey) -> int:
        """The stream sequence of the aggregate's last commit, 0 if it has none (read-your-writes)."""
        ...

    async def read(
        self, key: AggregateKey, after_seq: int, until_seq: int | None = None
    ) -> list[tuple[int, Commit]]:
        """The aggregate's commits with ``after_seq < seq <= until_seq`` in order."""
        ...


class SnapshotStore(Protocol):
    async def load(self, key: AggregateKey) -> bytes | None: ...

    async def save(self, key: AggregateKey, data: bytes) -> None: ...


class NoSnapshots:
    """A snapshot store that keeps nothing: for aggregates whose history stays short."""

    async def load(self, key: AggregateKey) -> bytes | None:
        return None

    async def save(self, key: AggregateKey, data: bytes) -> None:
        return None
