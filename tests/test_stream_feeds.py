"""Live feeds on a real nats-server: every subscriber of a session shares one consumer of its live
commits, yet each gets exactly the messages after its own resume point, once, in order; a reader
too slow for the shared feed is let go, catches up alone and joins the feed again without losing
or repeating anything, and without stalling the others; a feed stops with its last subscriber and
a new one starts afresh."""

from __future__ import annotations

import anyio
import pytest
from structlog.testing import capture_logs

from blackbird import AsyncBlackbird
from blackbird.streams.subscription import StreamEvent, Subscription

from .conftest import NatsServer

pytestmark = pytest.mark.anyio

SENTINEL = "end-of-test-data"


async def post(bb: AsyncBlackbird, sid: str, texts: list[str]) -> None:
    for text in texts:
        await bb.session_manager.send_message(text, session_id=sid)


async def until_sentinel(stream: Subscription, sentinel: str = SENTINEL) -> list[StreamEvent]:
    """Every message before ``sentinel`` (which must come)."""
    out: list[StreamEvent] = []
    while True:
        event = await stream.get(timeout=20)
        assert event is not None, f"no {sentinel!r} after {len(out)} messages"
        if event.text == sentinel:
            return out
        out.append(event)


async def consumers_of(bb: AsyncBlackbird, sid: str) -> int:
    """How many JetStream consumers read this session's subject (whatever their state)."""
    subject = bb.journal.subjects.session("acme", sid)
    infos = await bb._nc.jetstream().consumers_info(bb.journal.stream)
    return sum(1 for info in infos if info.config.filter_subject == subject)


async def settles_at(bb: AsyncBlackbird, sid: str, wanted: int) -> None:
    """Wait until the server holds ``wanted`` consumers of the session: one a client has dropped
    lingers on the server until it notices nobody listens (seconds)."""
    with anyio.fail_after(30):
        while await consumers_of(bb, sid) != wanted:
            await anyio.sleep(0.2)


async def test_fifty_subscribers_from_different_resume_points_share_one_live_consumer(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    history = [f"h{i}" for i in range(20)]
    await post(bb, s.session_id, history + [SENTINEL])
    async with bb.streams.subscribe(s.session_id) as stream:
        ids = [e.id for e in await until_sentinel(stream)]
    live = [f"l{i}" for i in range(30)]
    # resume from the start, the middle of the history, and its end (the sentinel's own id)
    starts: list[tuple[str | None, list[str]]] = [
        (None, [*history, SENTINEL, *live]),
        (ids[9], [*history[10:], SENTINEL, *live]),
        (ids[-1], [SENTINEL, *live]),
    ]
    got: dict[int, list[str]] = {}
    done, leave = anyio.Event(), anyio.Event()

    async def subscriber(i: int, after: str | None) -> None:
        async with bb.streams.subscribe(s.session_id, after=after) as stream:
            texts: list[str] = []
            while not texts or texts[-1] != "end":
                event = await stream.get(timeout=20)
                assert event is not None, f"subscriber {i}: only {texts}"
                texts.append(event.text)
            got[i] = texts[:-1]
            if len(got) == 50:
                done.set()
            await leave.wait()  # still subscribed while the consumers are counted

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(subscriber, i, starts[i % 3][0])
            if i % 10 == 5:  # posting goes on while subscribers join
                await post(bb, s.session_id, live[i // 10 * 6 : i // 10 * 6 + 6])
        await post(bb, s.session_id, ["end"])
        with anyio.fail_after(30):
            await done.wait()
        await settles_at(bb, s.session_id, 1)  # the catch-ups' consumers are gone, the feed's stays
        leave.set()
    for i, texts in got.items():
        assert texts == starts[i % 3][1], f"subscriber {i}"


async def test_a_slow_subscriber_is_let_go_catches_up_alone_rejoins_and_stalls_nobody(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    texts = [f"m{i}" for i in range(400)]  # more than a follower's queue (256) and its backlog
    with capture_logs() as lines:
        async with bb.streams.subscribe(s.session_id, max_pending=1, coalesce=()) as slow:
            async with bb.streams.subscribe(s.session_id) as fast:
                await fast.caught_up()
                await slow.caught_up()
                await post(bb, s.session_id, [*texts, SENTINEL])
                # the fast reader gets everything while the slow one has read nothing yet
                assert [e.text for e in await until_sentinel(fast)] == texts
                assert [e.text for e in await until_sentinel(slow)] == texts
                # caught up, the slow one is back on the shared feed: one consumer reads the
                # session for both (its own catch-up consumer is gone), and both get what follows
                await settles_at(bb, s.session_id, 1)
                await post(bb, s.session_id, ["after", SENTINEL])
                for stream in (fast, slow):
                    assert [e.text for e in await until_sentinel(stream)] == ["after"]
    assert any(line["event"] == "stream_feed_overflow" and line["follower"] for line in lines)  # named


async def test_a_feed_stops_with_its_last_subscriber_and_a_new_subscriber_starts_another(bb: AsyncBlackbird) -> None:
    s = await bb.session_manager.create_session("u1")
    async with bb.streams.subscribe(s.session_id) as one, bb.streams.subscribe(s.session_id) as two:
        await post(bb, s.session_id, ["a", SENTINEL])
        assert [e.text for e in await until_sentinel(one)] == ["a"]
        assert [e.text for e in await until_sentinel(two)] == ["a"]
        await settles_at(bb, s.session_id, 1)
    await settles_at(bb, s.session_id, 0)
    await post(bb, s.session_id, ["b"])
    async with bb.streams.subscribe(s.session_id, after=None) as three:
        await post(bb, s.session_id, ["c", "end"])
        assert [e.text for e in await until_sentinel(three, "end")] == ["a", SENTINEL, "b", "c"]
        await settles_at(bb, s.session_id, 1)


async def test_a_feed_goes_on_across_a_killed_and_restarted_server(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        s = await bb.session_manager.create_session("u1")
        with capture_logs() as lines:
            async with bb.streams.subscribe(s.session_id) as one, bb.streams.subscribe(s.session_id) as two:
                await post(bb, s.session_id, ["a", SENTINEL])
                for stream in (one, two):
                    assert [e.text for e in await until_sentinel(stream)] == ["a"]
                nats_server.kill()  # SIGKILL: the feed's consumer is gone with the server's memory
                nats_server.start()
                await post(bb, s.session_id, ["b", "c", "end"])
                for stream in (one, two):
                    assert [e.text for e in await until_sentinel(stream, "end")] == ["b", "c"]
        # the feed's ordered consumer was made again: its followers never had to read alone
        assert not [line for line in lines if line["event"] in ("stream_feed_failed", "stream_feed_overflow")]
