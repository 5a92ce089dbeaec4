"""The two timeout errors, raised by real faults on a real nats-server, typed and with their fields:

* ``CommandTimeoutError``: a remote client (``remote=True``) whose commands no ``blackbird serve``
  host answers gives up after ``command_timeout`` (not later, not with a raw nats-py error).
* ``ProjectionTimeoutError``: a read-model query waits for the caller's own last write
  (read-your-writes); when the projection cannot read the log (the server paused its consumer,
  JetStream's consumer pause), the query raises after ``command_timeout`` naming the projection,
  the sequence wanted and the one applied. Once the consumer resumes, the same query answers.
"""

from __future__ import annotations

import datetime
import json
import time

import anyio
import nats
import pytest

from blackbird import AsyncBlackbird, CommandTimeoutError, ProjectionTimeoutError

from .conftest import NatsServer

pytestmark = pytest.mark.anyio

TIMEOUT = 1.0  # the clients' command_timeout, seconds
MARGIN = 1.0  # what a timed-out call may take beyond it (scheduling on a busy 2-core machine)


async def test_a_remote_command_no_host_answers_raises_command_timeout_error_within_the_timeout(
    nats_server: NatsServer,
) -> None:
    # a host that has been and gone: the stream and the session exist, nothing serves commands now
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as host:
        session = await host.session_manager.create_session("u1")
    async with AsyncBlackbird(
        remote=True, nats_url=nats_server.url, tenant="acme", command_timeout=TIMEOUT
    ) as remote:
        started = time.monotonic()
        with anyio.fail_after(TIMEOUT + MARGIN), pytest.raises(CommandTimeoutError) as info:
            await remote.session_manager.touch_session(session.session_id, command_id="touch-1")
        took = time.monotonic() - started
    error = info.value
    assert error.subject == f"bbcmd.acme.{session.session_id}"
    assert error.command_id == "touch-1"
    assert error.code == "command_timeout"
    assert isinstance(error, TimeoutError)  # an ``except TimeoutError`` catches it too
    assert "touch-1" in str(error) and "blackbird serve" in str(error)
    assert took >= TIMEOUT * 0.9, f"gave up after {took:.2f}s, before its {TIMEOUT}s timeout"


async def _set_paused(url: str, filter_subject: str, paused: bool) -> int:
    """Pause (or resume) every consumer of the stream reading ``filter_subject``, with
    JetStream's consumer pause API; returns how many. A paused consumer keeps its heartbeats,
    so the client does not recreate it: it only stops delivering."""
    nc = await nats.connect(url)
    try:
        infos = await nc.jetstream().consumers_info("BLACKBIRD")
        names = [i.name for i in infos if i.config.filter_subject == filter_subject]
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        body = json.dumps({"pause_until": until.isoformat().replace("+00:00", "Z")}).encode() if paused else b""
        for name in names:
            reply = json.loads((await nc.request(f"$JS.API.CONSUMER.PAUSE.BLACKBIRD.{name}", body, timeout=5)).data)
            assert reply.get("paused", False) is paused, reply
        return len(names)
    finally:
        await nc.close()


async def test_a_read_model_that_cannot_reach_the_callers_write_raises_projection_timeout_error(
    nats_server: NatsServer,
) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", command_timeout=TIMEOUT) as bb:
        sm = bb.session_manager
        session = await sm.create_session("u1")
        before = await sm.get_statistics()  # starts the activity projection, caught up
        assert before["total_sessions"] == 1
        # the read models following the whole log stop receiving it (the log itself still works)
        assert await _set_paused(nats_server.url, "bb.>", paused=True) >= 1
        touched = await sm.touch_session(session.session_id)  # acknowledged: durable in the log
        started = time.monotonic()
        with anyio.fail_after(TIMEOUT + MARGIN), pytest.raises(ProjectionTimeoutError) as info:
            await sm.get_statistics()
        took = time.monotonic() - started
        error = info.value
        assert error.projection == "activity"
        assert error.wanted == touched.sequence
        assert error.applied < error.wanted
        assert error.code == "projection_timeout" and isinstance(error, TimeoutError)
        assert took >= TIMEOUT * 0.9, f"gave up after {took:.2f}s, before its {TIMEOUT}s timeout"
        # the consumer delivers again: the same query reaches the write and answers
        await _set_paused(nats_server.url, "bb.>", paused=False)
        after = await sm.get_statistics()
        assert after["total_sessions"] == 1


async def test_a_try_lasts_at_least_four_times_the_recent_answer_time() -> None:
    """The tries of a read (and of an append) are not given up before their answer could come
    through this process's own queues: the recent average answer time, four times over; an idle
    process keeps the fixed first try of 0.5 s. (The request's timeout is what the JetStream
    context is made with: recorded here, no server needed.)"""
    from blackbird._retry import RoundTrips, retrying, try_timeout

    given: list[float] = []

    async def op(js: object) -> str:
        given.append(float(js))  # type: ignore[arg-type]
        return "answer"

    trips = RoundTrips()
    assert await retrying("read", op, lambda t: t, timeout=5.0, trips=trips) == "answer"  # type: ignore[arg-type,return-value]
    assert given[-1] == try_timeout(0) == 0.5
    for _ in range(1000):  # a loaded process: answers take 0.4 s
        trips.observe(0.4)
    assert 1.59 < trips.floor() < 1.61
    await retrying("read", op, lambda t: t, timeout=5.0, trips=trips)  # type: ignore[arg-type]
    assert 1.59 < given[-1] < 1.61
    await retrying("read", op, lambda t: t, timeout=1.0, trips=trips)  # type: ignore[arg-type]
    assert given[-1] <= 1.0  # never past the call's own deadline
