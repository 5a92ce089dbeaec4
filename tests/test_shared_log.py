"""The host's followers share one feed of the log (blackbird.streams.feeds.SharedLog), on a real
nats-server: each follower gets exactly the commits of its own filter, once and in order, whether
it starts at the head, far behind (its history read alone, up to a feed position that is not on
its filter), or falls a whole queue behind, catches up alone and rejoins; and a live follow taken
by the client's reader goes on in order across a killed server."""

from __future__ import annotations

import anyio
import pytest
import structlog

from blackbird import AsyncBlackbird
from blackbird.journal import Entry
from blackbird.streams.feeds import SharedLog

from .conftest import NatsServer

pytestmark = pytest.mark.anyio


async def _expected(bb: AsyncBlackbird, subject_filter: str, after: int = 0) -> list[int]:
    seqs: list[int] = []
    await bb.journal.replay(subject_filter, after, lambda seq, subject, commit: seqs.append(seq))
    return seqs


class Follower:
    def __init__(self, log: SharedLog, subject_filter: str, after: int, *, slow: anyio.Event | None = None) -> None:
        self.log, self.filter, self.after, self.slow = log, subject_filter, after, slow
        self.seqs: list[int] = []
        self.subjects: list[str] = []
        self.changed = anyio.Event()

    async def run(self) -> None:
        async def take(entry: Entry) -> None:
            if self.slow is not None:
                await self.slow.wait()  # held until the test lets it go on
            self.seqs.append(entry.seq)
            self.subjects.append(entry.subject)
            self.changed.set()

        await self.log.follow_with(self.filter, self.after, take)

    async def until(self, seqs: list[int]) -> None:
        with anyio.fail_after(20):
            while self.seqs[: len(seqs)] != seqs and len(self.seqs) < len(seqs):
                self.changed = anyio.Event()
                await self.changed.wait()
        assert self.seqs == seqs


async def _load(bb: AsyncBlackbird, sessions: int, touches: int) -> None:
    ids = [(await bb.session_manager.create_session(f"user-{i}")).session_id for i in range(sessions)]
    for _ in range(touches):
        for sid in ids:
            await bb.session_manager.touch_session(sid)


async def test_each_follower_gets_its_filters_commits_once_in_order(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", learn=False, detect_abuse=False) as bb:
        await _load(bb, 3, 3)  # history: users' and sessions' commits; the last one is a session's
        async with anyio.create_task_group() as tg:
            log = SharedLog(bb.journal, tg)
            everything = Follower(log, "bb.>", await bb.journal.stream_last_seq())  # at the head
            users = Follower(log, "bb.acme.user.*", 0)  # far behind, on a filter the head is not on
            sessions = Follower(log, "bb.acme.session.*", 2)
            for follower in (everything, users, sessions):
                tg.start_soon(follower.run)
            # the history alone: the feed's position is a session's commit, not on users' filter
            await users.until(await _expected(bb, "bb.acme.user.*"))
            await _load(bb, 4, 5)  # more while they follow
            head = await bb.journal.stream_last_seq()
            await users.until(await _expected(bb, "bb.acme.user.*"))
            await sessions.until(await _expected(bb, "bb.acme.session.*", 2))
            await everything.until([s for s in await _expected(bb, "bb.>") if s > everything.after])
            assert everything.seqs[-1] == head
            assert all(s.startswith("bb.acme.user.") for s in users.subjects)
            tg.cancel_scope.cancel()


async def test_a_follower_that_read_its_history_alone_joins_the_feed_without_waiting_for_its_filter(
    nats_server: NatsServer,
) -> None:
    """Its history ends at the feed's position, which is not on its filter: it must join the
    feed at once, not wait for its filter's next commit while the feed queues up for it."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", learn=False, detect_abuse=False) as bb:
        await _load(bb, 3, 3)  # the last commit is a session's
        async with anyio.create_task_group() as tg:
            log = SharedLog(bb.journal, tg, queue=8)
            users = Follower(log, "bb.acme.user.*", 0)
            with structlog.testing.capture_logs() as logs:
                tg.start_soon(users.run)
                await users.until(await _expected(bb, "bb.acme.user.*"))
                sid = await _any_session(bb)
                for _ in range(30):  # session commits only: more than the queue holds
                    await bb.session_manager.touch_session(sid)
                await bb.session_manager.create_session("late-user")  # one more on its filter
                await users.until(await _expected(bb, "bb.acme.user.*"))
            assert not [e for e in logs if e["event"] == "stream_feed_overflow"], logs
            tg.cancel_scope.cancel()


async def _any_session(bb: AsyncBlackbird) -> str:
    found: list[str] = []
    await bb.journal.replay("bb.acme.session.*", 0, lambda seq, subject, commit: found.append(subject))
    return found[-1].rsplit(".", 1)[1]


async def test_a_follower_a_whole_queue_behind_catches_up_alone_and_rejoins_losing_nothing(
    nats_server: NatsServer,
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", learn=False, detect_abuse=False) as bb:
        await _load(bb, 1, 1)
        async with anyio.create_task_group() as tg:
            log = SharedLog(bb.journal, tg, queue=4)
            held = anyio.Event()
            start = await bb.journal.stream_last_seq()
            slow = Follower(log, "bb.acme.session.*", start, slow=held)
            quick = Follower(log, "bb.>", start)
            tg.start_soon(slow.run)
            tg.start_soon(quick.run)
            await _load(bb, 3, 6)  # far more than 4 queued for the held follower: it is let go
            await quick.until(await _expected(bb, "bb.>", start))
            held.set()
            await slow.until(await _expected(bb, "bb.acme.session.*", start))
            tg.cancel_scope.cancel()


async def test_a_live_follow_taken_by_the_reader_goes_on_in_order_across_a_killed_server(
    nats_server: NatsServer,
) -> None:
    """Journal.follow_now: commits are handed on by the client's reader (the ordered consumer is
    registered for direct delivery while it runs, and only then); after a SIGKILL and restart the
    consumer is made again and the follow goes on with every commit once, in order."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", learn=False, detect_abuse=False) as bb:
        await _load(bb, 2, 2)
        start = await bb.journal.stream_last_seq()
        got: list[int] = []
        grew = anyio.Event()

        def take(entry: Entry) -> None:
            nonlocal grew
            got.append(entry.seq)
            grew.set()

        async def until(seqs: list[int]) -> None:
            nonlocal grew
            with anyio.fail_after(20):
                while len(got) < len(seqs):
                    grew = anyio.Event()
                    await grew.wait()
            assert got == seqs

        nc = bb._nc
        async with anyio.create_task_group() as tg:
            tg.start_soon(bb.journal.follow_now, "bb.acme.>", start, take)
            await _load(bb, 2, 3)
            await until(await _expected(bb, "bb.acme.>", start))
            assert len(nc._ordered) == 1 and nc.stats["in_msgs"] > 0  # delivered directly
            nats_server.kill()
            nats_server.start()
            await _load(bb, 2, 3)
            await until(await _expected(bb, "bb.acme.>", start))
            tg.cancel_scope.cancel()
        assert nc._ordered == {}
