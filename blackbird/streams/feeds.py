"""Live feeds: one ordered consumer per followed subject, shared by every subscription in a client.

A thousand subscribers of one session used to mean a thousand JetStream consumers, each decoding
every commit; the server refuses consumers past its limit. Here a subject's live commits are read
once, by its :class:`_Feed`, and handed to each follower's bounded queue without waiting for it.
A follower reads its history (what the feed had passed before it joined) by itself, a few
commits by direct gets, more with a consumer of its own that it drops once it reaches the feed,
then goes on from its queue. A follower that falls behind by a whole queue is let go by the feed,
reads alone up to the feed's position and joins it again; one whose feed fails follows the log on
its own from the last commit it handed on. Slow readers never hold up the others, and nobody
loses or repeats a commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import anyio.lowlevel
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from structlog.typing import FilteringBoundLogger

from actors.events import Commit
from blackbird.journal import Entry, Journal
from blackbird.subjects import matcher

log = structlog.get_logger("blackbird.streams")

QUEUE = 256  # commits a follower may fall behind its feed before it is let go
_YIELD_EVERY = 64  # queued commits a follower takes at least before it lets other tasks run
_DIRECT_READS = 8  # stream sequences of a follower's history it may read one by one (else a consumer)


def _name(on_entry: Callable[..., object]) -> str:
    """Who a follower is, for the log: its callback's qualified name."""
    return getattr(on_entry, "__qualname__", type(on_entry).__name__)


class _CaughtUp(Exception):
    """Ends a follower's history read: it has reached the feed."""


class _Listener:
    """One follower's place on a feed: the commits handed to it and not yet taken."""

    def __init__(self, capacity: int, follower: str) -> None:
        self.follower = follower  # who takes the commits (named in the log when let go)
        self.send: MemoryObjectSendStream[Entry]
        self.receive: MemoryObjectReceiveStream[Entry]
        self.send, self.receive = anyio.create_memory_object_stream[Entry](max_buffer_size=capacity)
        self.attached = True  # whether the feed still hands commits to it
        self.overflowed = False


class _Feed:
    """The live commits of one subject, from its last commit when the feed started."""

    def __init__(
        self, journal: Journal, subject: str, logger: FilteringBoundLogger, done: Callable[[_Feed], None]
    ) -> None:
        self._journal = journal
        self.subject = subject
        self._log = logger
        self._done = done  # tells the owner this feed is over (stopped or failed)
        self._listeners: set[_Listener] = set()
        self.position = 0  # the last sequence handed on (valid once ``ready``)
        self.ready = anyio.Event()  # position is known, or the feed failed
        self._scope = anyio.CancelScope()  # may be cancelled before run() enters it

    def attach(self, listener: _Listener) -> None:
        self._listeners.add(listener)

    def detach(self, listener: _Listener) -> None:
        """Stop handing commits to ``listener``; the last one to go stops the feed."""
        self._let_go(listener)
        if not self._listeners and not self._scope.cancel_called:
            self._done(self)
            self._scope.cancel()

    def _let_go(self, listener: _Listener) -> None:
        self._listeners.discard(listener)
        listener.attached = False
        listener.send.close()  # its follower takes what is queued, then sees the end

    async def run(self) -> None:
        """Follow the subject until stopped (by :meth:`detach`) or failed; never raises."""
        with self._scope:
            try:
                self.position = await self._journal.last_seq_of(self.subject)
                self.ready.set()
                self._log.debug("stream_feed_started", subject=self.subject, position=self.position)
                await self._journal.follow_now(self.subject, self.position, self._dispatch)
            except Exception as exc:  # its followers go on by themselves
                self._log.warning("stream_feed_failed", subject=self.subject, error=repr(exc))
                self._done(self)
            finally:
                # stopped, failed, or the client is closing: whoever still listens reads alone
                for listener in list(self._listeners):
                    self._let_go(listener)
                self.ready.set()

    def _dispatch(self, entry: Entry) -> None:
        # in the client's reader: a commit goes to every queue at once, and a full one is let go
        for listener in list(self._listeners):
            try:
                listener.send.send_nowait(entry)
            except anyio.WouldBlock:
                listener.overflowed = True
                self._let_go(listener)
                self._log.warning(
                    "stream_feed_overflow", subject=self.subject, seq=entry.seq, follower=listener.follower
                )
                if not self._listeners and not self._scope.cancel_called:
                    # nobody left to hand commits to: a feed kept running would read every
                    # commit again beside the follower's own catch-up
                    self._done(self)
                    self._scope.cancel()
        self.position = entry.seq


class LiveFeeds:
    """Shared live reading of the log, one feed per subject, for every subscription of a client.

    Feeds run in ``tasks`` (the client's task group), not in any subscriber's scope: a feed
    outlives the follower that started it and stops when its last follower leaves."""

    def __init__(self, journal: Journal, tasks: anyio.abc.TaskGroup, *, queue: int = QUEUE) -> None:
        self._journal = journal
        self._tasks = tasks
        self._queue = queue
        self._feeds: dict[str, _Feed] = {}

    def _over(self, feed: _Feed) -> None:
        if self._feeds.get(feed.subject) is feed:
            del self._feeds[feed.subject]

    async def follow_with(
        self,
        subject: str,
        after_seq: int,
        on_entry: Callable[[Entry], Awaitable[None]],
        *,
        logger: FilteringBoundLogger | None = None,
        alone: str | None = None,
        follower: str | None = None,
    ) -> None:
        """What :meth:`Journal.follow_with` does: every commit on ``subject`` with a sequence
        above ``after_seq``, in order, handed to ``on_entry`` (awaited) until cancelled; an
        error ``on_entry`` raises ends it with that error. ``logger`` (context bound) is what
        the feed and this follower report on. ``alone``: the narrower filter the follower reads
        its history and, once let go, the log with (its ``on_entry`` wants no more than that).
        ``follower``: its name in the log (by default ``on_entry``'s qualified name)."""
        logger = logger or log
        alone = alone or subject
        last = after_seq  # the last sequence handed on
        while True:
            feed = self._feeds.get(subject)
            if feed is None:
                feed = self._feeds[subject] = _Feed(self._journal, subject, logger, self._over)
                self._tasks.start_soon(feed.run, name=f"stream feed {subject}")
            listener = _Listener(self._queue, follower or _name(on_entry))
            feed.attach(listener)
            try:
                await feed.ready.wait()
                if listener.attached:
                    # the feed hands this listener every commit after ``joined``: read up to it alone
                    joined = feed.position
                    if last < joined:
                        last = await self._catch_up(alone, last, joined, on_entry, narrower=alone != subject)
                    with listener.receive:
                        last = await self._take_queued(listener, last, on_entry)
            finally:
                feed.detach(listener)
            if not listener.overflowed:
                break
            # It fell a whole queue behind: it reads alone up to where the feed is now and joins
            # it again (reading alone for good would have every commit delivered twice).
            logger.info("stream_feed_rejoining", subject=subject, after=last)
        # the feed failed: follow the log alone from here
        logger.info("stream_feed_left", subject=subject, after=last)
        await self._journal.follow_with(alone, last, on_entry)

    @staticmethod
    async def _take_queued(listener: _Listener, last: int, on_entry: Callable[[Entry], Awaitable[None]]) -> int:
        """Hand on what the feed queues for ``listener`` until it lets it go; the last sequence
        handed on. Queued commits are taken without a trip through the event loop each (a
        follower of a busy log would otherwise yield once per commit). Between two yields it
        takes what was queued at the last one, at least a few dozen: what arrived during one
        pass of the event loop is taken in the next, so it keeps pace however many writers the
        loop runs (a fixed few dozen per pass fell behind 1,000 busy sessions and was let go)."""
        receive = listener.receive
        taken = 0
        budget = _YIELD_EVERY
        while True:
            try:
                entry = receive.receive_nowait()
                taken += 1
                if taken >= budget:
                    await anyio.lowlevel.checkpoint()
                    taken = 0
                    budget = max(_YIELD_EVERY, receive.statistics().current_buffer_used)
            except anyio.WouldBlock:
                try:
                    entry = await receive.receive()
                except anyio.EndOfStream:
                    return last
            except anyio.EndOfStream:
                return last
            if entry.seq > last:  # the history read may have handed it on already
                await on_entry(entry)
                last = entry.seq

    async def _catch_up(
        self, subject: str, after_seq: int, until: int, on_entry: Callable[[Entry], Awaitable[None]],
        *, narrower: bool = False,
    ) -> int:
        """Hand on the commits on ``subject`` in (after_seq, until]; the last sequence read
        (handed on, or not a commit and skipped). ``narrower``: ``subject`` is narrower than the
        feed's, so ``until`` need not be on it: the read stops at the subject's last commit up
        to it (one more round trip, only then)."""
        last = after_seq
        stop = until
        if narrower:
            stop = min(until, await self._journal.last_seq_of(subject))
            if stop <= after_seq:
                return last  # nothing of the subject's in between
        if until - after_seq <= _DIRECT_READS:
            # A few stream sequences behind, as a reconnecting reader usually is: get the commits
            # one by one, a round trip each, rather than make a consumer. A thousand readers
            # joining at once would otherwise make a thousand consumers, which the server keeps
            # a while after they are dropped and refuses past its limit.
            while last < until:
                found = await self._journal.next_entry(subject, last + 1)
                if found is None or found[0] > until:  # ``until`` itself is gone: the feed has the rest
                    return last
                last, entry = found
                if entry is not None:
                    await on_entry(entry)
            return last

        async def take(entry: Entry) -> None:
            nonlocal last
            if entry.seq > until:
                raise _CaughtUp
            await on_entry(entry)
            last = entry.seq
            if entry.seq >= stop:
                raise _CaughtUp

        try:
            await self._journal.follow_with(subject, last, take)
        except _CaughtUp:
            pass
        return last


class SharedLog:
    """The log as the host's own followers read it (read models, the learner): every live
    follower of a filter within ``<prefix>.>`` rides one feed of the whole tenant log, so a
    commit reaches this process once and is decoded once, however many follow it (each used to
    have a consumer of its own: a delivery, a header parse and a decode per follower per
    commit). Each follower gets only its filter's commits, in order, none lost or repeated;
    one that falls a whole queue behind catches up alone and rejoins (see :class:`LiveFeeds`).
    Everything else is the journal's."""

    def __init__(self, journal: Journal, tasks: anyio.abc.TaskGroup, *, queue: int = 16_384) -> None:
        self._journal = journal
        self._feeds = LiveFeeds(journal, tasks, queue=queue)
        self.subjects = journal.subjects
        self._all = f"{journal.subjects.prefix}.>"

    async def follow_with(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[Entry], Awaitable[None]]
    ) -> None:
        """:meth:`Journal.follow_with`, on the shared feed."""
        if subject_filter == self._all:
            await self._feeds.follow_with(self._all, after_seq, on_entry)
            return
        matches = matcher(subject_filter)

        async def take(entry: Entry) -> None:
            if matches(entry.subject):
                await on_entry(entry)

        await self._feeds.follow_with(self._all, after_seq, take, alone=subject_filter, follower=_name(on_entry))

    def follow(self, subject_filter: str, after_seq: int = 0) -> AsyncIterator[Entry]:
        return self._journal.follow(subject_filter, after_seq)

    async def replay(
        self, subject_filter: str, after_seq: int, on_entry: Callable[[int, str, Commit], None],
        until_seq: int | None = None,
    ) -> int:
        return await self._journal.replay(subject_filter, after_seq, on_entry, until_seq)

    async def last_seq_of(self, subject: str, *, direct: bool = False) -> int:
        return await self._journal.last_seq_of(subject, direct=direct)

    async def stream_last_seq(self) -> int:
        return await self._journal.stream_last_seq()
