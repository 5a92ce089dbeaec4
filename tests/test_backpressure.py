"""Backpressure on session streams: a subscriber that does not read holds at most ``max_pending``
messages however many are posted (JetStream's flow control keeps the rest on the server), and
when it reads it gets every message once, in log order: nothing lost, nothing repeated. A
sentinel posted after the data shows that nothing follows the last one."""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio
import pytest

from blackbird import AsyncBlackbird
from blackbird.streams.subscription import StreamEvent, Subscription

pytestmark = pytest.mark.anyio

MAX_PENDING = 5
HISTORY = 20  # posted before subscribing
LIVE = 80  # posted while the subscriber holds a full backlog
DEADLINE = 10.0
READ_WITHIN = 5.0  # seconds a message already posted may take to reach the reader


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {DEADLINE}s"
        await anyio.sleep(0.01)


async def _post(bb: AsyncBlackbird, session_id: str, texts: list[str]) -> None:
    for text in texts:
        await bb.session_manager.send_message(text, session_id=session_id)


async def test_a_subscriber_that_does_not_read_holds_at_most_max_pending_and_then_gets_every_message_once(
    bb: AsyncBlackbird,
) -> None:
    s = await bb.session_manager.create_session("u1")
    history = [f"h{i}" for i in range(HISTORY)]
    live = [f"l{i}" for i in range(LIVE)]
    await _post(bb, s.session_id, history)
    # strict log order, every step: no coalescing, no critical channel jumping the queue
    async with bb.streams.subscribe(s.session_id, max_pending=MAX_PENDING, coalesce=(), critical=()) as stream:
        await _until(lambda: stream.backlog >= MAX_PENDING, "a full backlog")
        assert stream.backlog == MAX_PENDING, f"{stream.backlog} of the {HISTORY} messages held"
        highest = 0

        async def watch(stream: Subscription) -> None:
            nonlocal highest
            while True:
                highest = max(highest, stream.backlog)
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, stream)
            for text in live:
                await bb.session_manager.send_message(text, session_id=s.session_id)
                highest = max(highest, stream.backlog)
                assert stream.backlog <= MAX_PENDING
            await bb.session_manager.send_message("sentinel", session_id=s.session_id)
            tg.cancel_scope.cancel()
        assert highest == MAX_PENDING and stream.backlog == MAX_PENDING
        got: list[StreamEvent] = []
        while True:
            event = await stream.get(timeout=READ_WITHIN)
            assert event is not None, f"stream stopped after {len(got)} messages"
            assert stream.backlog <= MAX_PENDING
            if event.text == "sentinel":
                break
            got.append(event)
            assert len(got) <= HISTORY + LIVE, f"more messages than posted: {[e.text for e in got[-5:]]}"
    assert [e.text for e in got] == history + live  # every message, once, in order
    assert [e.sequence for e in got] == sorted({e.sequence for e in got})
    assert stream.coalesced == 0
