"""A stream reader's backlog (pure): what waits, in which order it goes, how to resume.

The resume token makes a reconnect lose and repeat nothing.

Messages sit at positions ``(sequence, index)`` of the log. The backlog hands out the earliest
critical message first (``notification`` by default), else the earliest message; a message of a
coalescing channel (``progress``) replaces the earlier one of its channel still waiting. After
each message handed out the reader holds a token ``"<watermark>[+<position>...]"``: every
position up to the watermark is done (handed out, coalesced away, or not a message of this
stream), and so are the listed positions beyond it (critical messages handed out early).
Resuming with the token gives exactly the messages not done yet. Without reordering the token
is just the last message's own position, ``"<sequence>-<index>"``; ``"<sequence>"`` alone means
"after that whole commit".

No I/O, no clock, no locking: :class:`blackbird.streams.subscription.Subscription` drives it.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

from actors.validation import MAX_SAFE_INT
from blackbird._validate import invalid

WHOLE_COMMIT = 1 << 62  # an index past every message of a commit
# a sequence and an index are at most 2**53 (16 digits), so a 10,000-digit id is refused up front
# rather than given to int(), which refuses more than 4,300 digits with an untyped error
_POSITION = re.compile(r"^(\d{1,16})(?:-(\d{1,16}))?\Z")
_MAX_TOKEN_PARTS = 10_000
_MAX_TOKEN_CHARS = _MAX_TOKEN_PARTS * 34  # each part: two 16-digit numbers, "-" and "+"


class Position(NamedTuple):
    sequence: int  # of the commit
    place: int  # among the commit's messages (WHOLE_COMMIT: past all of them)


START = Position(0, -1)


class Resume(NamedTuple):
    """Where a stream resumes: everything up to ``after`` and everything in ``done`` is done."""

    after: Position
    done: frozenset[Position]

    def due(self, position: Position) -> bool:
        return position > self.after and position not in self.done

    def token(self) -> str:
        return "+".join([_format(self.after), *(_format(p) for p in sorted(self.done))])


class Message(Protocol):
    @property
    def sequence(self) -> int: ...

    @property
    def index(self) -> int: ...

    @property
    def channel(self) -> str: ...


M = TypeVar("M", bound=Message)


def _format(position: Position) -> str:
    if position.place >= WHOLE_COMMIT:
        return str(position.sequence)
    if position.place < 0:  # before every message of its commit (a gap's place): the commit before
        return str(position.sequence - 1)
    return f"{position.sequence}-{position.place}"


def _before(position: Position) -> Position:
    """The position just before ``position``."""
    if position.place > 0:
        return Position(position.sequence, position.place - 1)
    return Position(position.sequence - 1, WHOLE_COMMIT)


def parse_resume(value: Any, field: str = "after") -> Resume:
    """A resume token (as a stream gave it), a commit sequence (int or digits), or None/"" for
    the start; ValidationError naming ``field`` for anything else."""
    if value is None or value == "":
        return Resume(START, frozenset())
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SAFE_INT:
        return Resume(Position(value, WHOLE_COMMIT), frozenset())
    if isinstance(value, str) and len(value) <= _MAX_TOKEN_CHARS:
        # "+" may arrive as a space (an unencoded "+" in a query string)
        parts = [_POSITION.match(part) for part in re.split(r"[+\s]+", value.strip())]
        if all(parts) and len(parts) <= _MAX_TOKEN_PARTS and all(
            int(m.group(1)) <= MAX_SAFE_INT and int(m.group(2) or 0) <= MAX_SAFE_INT for m in parts if m
        ):
            positions = [
                Position(int(m.group(1)), WHOLE_COMMIT if m.group(2) is None else int(m.group(2)))
                for m in parts if m
            ]
            after, done = positions[0], frozenset(positions[1:])
            return Resume(after, frozenset(p for p in done if p > after))
    raise invalid(
        field, 'a resume token as a stream gave it ("<sequence>-<index>", maybe with "+..."), '
        "or a sequence", repr(value)[:200],
    )


class Backlog(Generic[M]):
    """The messages waiting for one reader (anything with a sequence, an index and a channel)."""

    def __init__(self, resume: Resume, *, critical: Iterable[str] = (), coalesce: Iterable[str] = ()) -> None:
        self._pending: collections.deque[M] = collections.deque()  # by position
        self._critical = frozenset(critical)
        self._coalesce = frozenset(coalesce)
        self._read = resume.after  # the last position read from the log (or resumed after)
        self._ahead = set(resume.done)  # done positions beyond the watermark
        # how many waiting messages are critical, and of each coalescing channel: the common
        # case (none) needs no scan of what waits
        self._waiting: collections.Counter[str] = collections.Counter()
        self.coalesced = 0

    def __len__(self) -> int:
        return len(self._pending)

    def seen(self, position: Position) -> None:
        """The log was read up to ``position`` (a message of this stream or not)."""
        self._read = max(self._read, position)

    def replaces(self, message: M) -> bool:
        """Whether pushing ``message`` would replace a waiting one (the backlog does not grow)."""
        return message.channel in self._coalesce and self._waiting[message.channel] > 0

    def push(self, message: M) -> None:
        """A due message, after every message pushed before it."""
        position = Position(message.sequence, message.index)
        if self.replaces(message):
            for i, waiting in enumerate(self._pending):
                if waiting.channel == message.channel:
                    del self._pending[i]  # done: a newer one of its channel replaces it
                    self._waiting[message.channel] -= 1
                    self.coalesced += 1
                    break
        self._pending.append(message)
        if message.channel in self._critical or message.channel in self._coalesce:
            self._waiting[message.channel] += 1
        self.seen(position)

    def pop(self) -> tuple[M, str]:
        """The next message (the earliest critical one, else the earliest) and the resume token
        that holds once the reader has it. IndexError if nothing waits."""
        chosen = 0
        if any(self._waiting[c] for c in self._critical):
            chosen = next(i for i, m in enumerate(self._pending) if m.channel in self._critical)
        message = self._pending[chosen]
        del self._pending[chosen]
        if message.channel in self._waiting:
            self._waiting[message.channel] -= 1
        if self._pending:
            first = self._pending[0]
            watermark = _before(Position(first.sequence, first.index))
        else:
            watermark = self._read
        if chosen:
            self._ahead.add(Position(message.sequence, message.index))
        if not self._ahead:
            return message, _format(watermark)
        self._ahead = {p for p in self._ahead if p > watermark}
        return message, Resume(watermark, frozenset(self._ahead)).token()
