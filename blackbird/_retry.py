"""Riding out NATS failover: transient failures are retried until a deadline, then a typed error.

While a JetStream stream elects a new leader (4-9 s after its leader died) its API requests get
no answer and publishes to its subjects get "no responders"; while a server restarts the client
is disconnected. Neither is an error worth showing a caller if it ends before the caller's
deadline. So an operation that is safe to repeat (a read; an append, which carries
``Nats-Msg-Id`` and an expected sequence) is tried again:

* after a try that got no answer, at once, on a short per-try timeout (:data:`TRY_TIMEOUTS`:
  the first tries are short so that a new leader is found within a second of answering);
* after a fast refusal (no responders, HTTP-like status 5xx, not connected), after a short
  backoff (:func:`backoff`), so that an election is not hammered;

until the deadline (the client's ``command_timeout``), and then raises
:class:`~blackbird.errors.LogError` naming the operation and the last failure. Any other error
from nats-py is raised as a typed error too (:func:`typed`): no raw nats exception reaches a
caller. :func:`keep_running` restarts a background task that failed, so that no background
failure ends the client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import anyio.abc
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from blackbird.errors import BlackbirdError, ClosedError, LogError

T = TypeVar("T")

log = structlog.get_logger("blackbird.retry")

#: Seconds one try waits for an answer; after the last entry, every try waits that long.
TRY_TIMEOUTS = (0.5, 0.75, 1.0)
_BACKOFF_FIRST = 0.05  # seconds before the second try after a fast refusal; doubles
_BACKOFF_CAP = 0.25
_RESTART_CAP = 5.0  # seconds at most between restarts of a failing background task


def try_timeout(attempt: int) -> float:
    """How long try number ``attempt`` (0 first) waits for an answer."""
    return TRY_TIMEOUTS[min(attempt, len(TRY_TIMEOUTS) - 1)]


def backoff(attempt: int) -> float:
    """The pause before trying again after fast refusal number ``attempt`` (0 first)."""
    return min(_BACKOFF_FIRST * (1 << min(attempt, 8)), _BACKOFF_CAP)


def transient(exc: BaseException) -> bool:
    """Whether ``exc`` (raised by nats-py) may pass by itself: no answer, no leader or
    responder yet, a connection being re-established, a server busy or recovering (5xx)."""
    if isinstance(exc, TimeoutError | ConnectionError):  # nats.errors.TimeoutError included
        return True
    if isinstance(
        exc,
        nats.errors.NoRespondersError
        | nats.errors.StaleConnectionError  # and UnexpectedEOF
        | nats.errors.OutboundBufferLimitError  # disconnected, with the reconnect buffer full
        | nats.errors.ConnectionReconnectingError
        | nats.js.errors.NoStreamResponseError  # a JetStream publish answered "no responders"
        | nats.js.errors.ServiceUnavailableError,
    ):
        return True
    if isinstance(exc, nats.js.errors.APIError):
        return status_code(exc.code) >= 500  # e.g. 10008 "JetStream system temporarily unavailable"
    return False


def status_code(code: Any) -> int:
    """A JetStream status code (an int, or a string in a status header) as an int; 0 if none."""
    try:
        return int(str(code or 0))
    except ValueError:
        return 0


def describe(exc: BaseException | None) -> str:
    """A short text for a nats-py error (its description, else its class name)."""
    if exc is None:
        return "no answer"
    text = getattr(exc, "description", None) or str(exc)
    name = type(exc).__name__
    return name if not text or text == name else f"{name}: {text}"


def typed(exc: BaseException, what: str) -> BlackbirdError:
    """The typed error for a nats-py error that is not worth retrying."""
    if isinstance(exc, BlackbirdError):
        return exc
    if isinstance(exc, nats.errors.ConnectionClosedError | nats.errors.ConnectionDrainingError):
        return ClosedError(f"{what}: the NATS connection is closed (the client was closed)")
    return LogError(f"{what} failed: {describe(exc)}")


class Contexts:
    """JetStream contexts by request timeout (nats-py gives a context one timeout for all the
    requests made through it, and a bucket handle the timeout of its context)."""

    def __init__(self, nc: NATS) -> None:
        self._nc = nc
        self._cached = {t: nc.jetstream(timeout=t) for t in TRY_TIMEOUTS}

    def __call__(self, timeout: float) -> JetStreamContext:
        found = self._cached.get(timeout)
        return found if found is not None else self._nc.jetstream(timeout=timeout)


class Bucket:
    """A KV bucket used through retries: each try binds a handle to that try's JetStream
    context (nats-py gives a handle the request timeout of its context)."""

    def __init__(self, name: str, *, direct: bool) -> None:
        self.name = name
        self.direct = direct

    def __call__(self, js: JetStreamContext) -> KeyValue:
        return KeyValue(name=self.name, stream=f"KV_{self.name}", pre=f"$KV.{self.name}.", js=js, direct=self.direct)


class RoundTrips:
    """How long this process's answered requests took lately (a running average). Under load an
    answer waits in the process's own queues (the flusher's and the reader's turn in the event
    loop): at 10,000 sessions in flight that took over a second, and fixed 0.5 s tries sent
    40-50% of appends twice, which slowed the loop further. A try is not given up before
    ``FACTOR`` times the average; an idle process keeps the fixed tries."""

    FACTOR = 4.0
    WEIGHT = 0.01  # of one answer in the average

    def __init__(self) -> None:
        self.average = 0.0

    def observe(self, seconds: float) -> None:
        self.average += (seconds - self.average) * self.WEIGHT

    def floor(self) -> float:
        """The least a try should last now."""
        return self.FACTOR * self.average


async def retrying(
    what: str,
    op: Callable[[JetStreamContext], Awaitable[T]],
    contexts: Callable[[float], JetStreamContext],
    *,
    timeout: float,
    per_try: float | None = None,
    expected: tuple[type[BaseException], ...] = (),
    trips: RoundTrips | None = None,
) -> T:
    """``await op(js)`` until it returns, where ``js`` times out its requests after one try
    (:func:`try_timeout`, at least ``trips.floor()``; or ``per_try`` seconds for operations
    that take long by nature).

    Transient failures are retried for ``timeout`` seconds, then LogError. An error of the
    ``expected`` types is raised as it is (the caller handles it: "not found" and the like);
    any other error is raised as its typed error.
    """
    deadline = time.monotonic() + timeout
    attempt = 0
    last: BaseException | None = None
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0.01:
            break
        try:
            if per_try is None:
                wait = try_timeout(attempt) if trips is None else max(try_timeout(attempt), trips.floor())
                started = time.monotonic()
                answer = await op(contexts(min(wait, remaining)))
                if trips is not None:
                    trips.observe(time.monotonic() - started)
                return answer
            if per_try <= remaining:
                return await op(contexts(per_try))
            # the handle may live on (a consumer nats-py recreates): keep its timeout, end the try in time
            with anyio.fail_after(remaining):
                return await op(contexts(per_try))
        except expected:
            raise
        except Exception as exc:
            if not transient(exc):
                raise typed(exc, what) from None
            last = exc
            if not isinstance(exc, TimeoutError):  # refused at once: do not hammer an election
                await anyio.sleep(min(backoff(attempt), max(0.0, deadline - time.monotonic())))
            attempt += 1
    raise LogError(
        f"{what}: failed for {timeout:g}s ({describe(last)}); NATS or the stream's leader is "
        "unavailable, try again"
    )


class _Started:
    """Passes the first ``started()`` of a restarted task on, and remembers it came."""

    def __init__(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.task_status = task_status
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self.task_status.started(value)


async def keep_running(
    name: str,
    run: Callable[..., Awaitable[None]],
    *,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``run(task_status=...)`` as a background task that never ends its task group.

    Until ``run`` reports that it started, its errors are the starter's (``tg.start`` raises
    them). After that, an error is logged and ``run`` is called again after a backoff (0.1 s,
    doubling up to 5 s; a run that lasted longer starts the backoff over). Returning ends it.
    """
    status = _Started(task_status)
    failures = 0
    while True:
        began = time.monotonic()
        try:
            await run(task_status=status)
            return
        except Exception as exc:
            if not status.done:
                raise
            if time.monotonic() - began > _RESTART_CAP:
                failures = 0
            delay = min(0.1 * (1 << min(failures, 8)), _RESTART_CAP)
            failures += 1
            log.error("background_task_failed", task=name, error=repr(exc), restart_in=delay)
            await anyio.sleep(delay)
