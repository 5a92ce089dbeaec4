"""What every aggregate shares: folding commits with its ``evolve`` and remembering command ids.

An aggregate's state is a frozen Struct with ``version`` (commits applied),
``recent_commands`` (the idempotency window), ``recent_digests`` (the digests of the commands
those ids came with) and ``recent_refusals`` (the answers of recent refused commands); its kind
supplies ``evolve(state, event)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from actors import idempotency
from actors.events import Applied, Commit, Event, Rejection

S = TypeVar("S", bound=msgspec.Struct)


def apply_commands(evolve: Callable[[S, Event], S], state: S, applied: tuple[Applied, ...]) -> S:
    """Fold commands' events, and their ids into the idempotency window (version unchanged)."""
    for command in applied:
        for event in command.events:
            state = evolve(state, event)
    # Every state has these fields (see above), but a type variable cannot be bound to "a Struct
    # with these fields" (mypy has no intersection of Struct and a protocol), hence the ignores.
    recent, digests = idempotency.remember_applied(
        state.recent_commands, state.recent_digests, applied  # type: ignore[attr-defined]
    )
    refusals = idempotency.remember_refusals(
        state.recent_refusals,  # type: ignore[attr-defined]
        ((c.command_id, c.rejection) for c in applied if c.rejection is not None),
    )
    return msgspec.structs.replace(
        state, recent_commands=recent, recent_digests=digests, recent_refusals=refusals
    )


def apply_commit(evolve: Callable[[S, Event], S], state: S, commit: Commit) -> S:
    """Fold one commit: its commands' events and ids, then the aggregate version."""
    return msgspec.structs.replace(apply_commands(evolve, state, commit.commands), version=commit.version)


class Behaviour:
    """The host-facing half of an aggregate kind: subclasses set ``state_type`` and implement
    ``evolve``, ``initial_state`` and ``decide``."""

    state_type: type[Any]

    @staticmethod
    def evolve(state: Any, event: Event) -> Any:
        raise NotImplementedError

    def apply_commit(self, state: Any, commit: Commit) -> Any:
        return apply_commit(self.evolve, state, commit)

    def apply_commands(self, state: Any, applied: tuple[Applied, ...]) -> Any:
        return apply_commands(self.evolve, state, applied)

    def has_seen(self, state: Any, command_id: str, digest: str) -> idempotency.Seen:
        """Whether ``command_id`` is remembered and, if so, whether it came with the command
        whose :func:`~actors.idempotency.digest` is ``digest`` (a retry) or another (reused)."""
        return idempotency.recall(state.recent_commands, state.recent_digests, command_id, digest)

    def refusal(self, state: Any, command_id: str) -> Rejection | None:
        """Why a command already in the log was refused (None if it was not). Refused commands
        that were recorded are in the id window too, so :meth:`has_seen` checks their digest."""
        return idempotency.refusal(state.recent_refusals, command_id)

    def version(self, state: Any) -> int:
        return state.version  # type: ignore[no-any-return]  # every state's version is an int
