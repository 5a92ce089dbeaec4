"""BlackbirdSDK: the synchronous mirror of AsyncBlackbird.

It runs one AsyncBlackbird on an anyio blocking portal (an event loop in a background thread)
and forwards each call to it; calls are thread-safe. Method names, arguments and docs are
those of the async API, generated from it so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from blackbird.audit.replay import Auditor
from blackbird._client import AsyncBlackbird
from blackbird.memory.service import AsyncMemory
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.streams.subscription import AsyncStreams, StreamEvent, Subscription
from blackbird.errors import ClosedError
from blackbird.types import UsageRecord

T = TypeVar("T")


class _SyncMirror:
    """Forwards every coroutine method of an async object through a blocking portal."""

    _async_type: type

    def __init__(self, target: Any, portal: BlockingPortal) -> None:
        self._target = target
        self._portal = portal

    def __init_subclass__(cls, mirrors: type, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._async_type = mirrors
        for name, member in inspect.getmembers(mirrors, inspect.iscoroutinefunction):
            if not name.startswith("_") and name not in cls.__dict__:
                setattr(cls, name, cls._forwarder(name, member))

    @staticmethod
    def _forwarder(name: str, member: Any) -> Any:
        @functools.wraps(member)
        def method(self: _SyncMirror, *args: Any, **kwargs: Any) -> Any:
            return self._portal.call(functools.partial(getattr(self._target, name), *args, **kwargs))

        return method


class SessionManager(_SyncMirror, mirrors=AsyncSessionManager):
    """Synchronous session manager: same methods as :class:`AsyncSessionManager`, blocking."""

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Call ``callback(record)`` once per usage tracked through this client (on the SDK's
        event-loop thread). A callback that raises is logged and breaks nothing."""
        self._target.add_usage_callback(callback)

    def remove_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        self._target.remove_usage_callback(callback)

    def manage_concurrency(
        self, session_id: str, operation: str, increment: bool, *, tenant: str | None = None,
        lease_seconds: float | None = None, holder: Hashable | None = None,
    ) -> int:
        """Take or give back a concurrency slot (see the async method). The holder defaults to
        the calling thread: a thread gives back only the slot it took."""
        if holder is None:
            holder = ("thread", threading.get_ident())
        return self._portal.call(  # type: ignore[no-any-return]
            functools.partial(
                self._target.manage_concurrency, session_id, operation, increment, tenant=tenant,
                lease_seconds=lease_seconds, holder=holder,
            )
        )

    @contextlib.contextmanager
    def concurrency_slot(
        self, session_id: str, operation: str, *, tenant: str | None = None
    ) -> Iterator[None]:
        """``with`` a concurrency slot; it is given back on exit, even on error."""
        holder = ("slot", object())
        self.manage_concurrency(session_id, operation, True, tenant=tenant, holder=holder)
        try:
            yield
        finally:
            self.manage_concurrency(session_id, operation, False, tenant=tenant, holder=holder)


class Memory(_SyncMirror, mirrors=AsyncMemory):
    """Synchronous memory: same methods as :class:`~blackbird.memory.service.AsyncMemory`, blocking."""

    @property
    def embedder(self) -> Any:
        """The embedder (the local all-MiniLM-L6-v2 unless another was given)."""
        return self._target.embedder


class SyncAuditor(_SyncMirror, mirrors=Auditor):
    """Synchronous audit: same methods as :class:`~blackbird.audit.replay.Auditor` (``replay``,
    ``verify``), blocking."""

    @property
    def tenant(self) -> str:
        return self._target.tenant  # type: ignore[no-any-return]


class SyncSubscription:
    """The blocking side of a :class:`~blackbird.streams.subscription.Subscription`: ``for event in sub``
    waits for each message; ``get(timeout)`` gives None when none came in time."""

    def __init__(self, target: Subscription, portal: BlockingPortal) -> None:
        self._target = target
        self._portal = portal

    @property
    def backlog(self) -> int:
        return self._target.backlog

    @property
    def coalesced(self) -> int:
        return self._target.coalesced

    def caught_up(self) -> None:
        """Return once the history (the log as it was at subscription) has been read."""
        self._portal.call(self._target.caught_up)

    def get(self, timeout: float | None = None) -> StreamEvent | None:
        """The next message, or None if none came within ``timeout`` seconds."""
        return self._portal.call(self._target.get, timeout)

    def __iter__(self) -> Iterator[StreamEvent]:
        while True:
            yield self._portal.call(self._target.__anext__)


class Streams:
    """Synchronous session streams: same as :class:`~blackbird.streams.subscription.AsyncStreams`."""

    def __init__(self, target: AsyncStreams, portal: BlockingPortal) -> None:
        self._target = target
        self._portal = portal

    @contextlib.contextmanager
    def subscribe(self, session_id: str, **options: Any) -> Iterator[SyncSubscription]:
        """``with sdk.streams.subscribe(session_id) as messages: for m in messages``; the
        options are those of :meth:`AsyncStreams.subscribe`."""
        manager = self._portal.wrap_async_context_manager(self._target.subscribe(session_id, **options))
        with manager as subscription:
            yield SyncSubscription(subscription, self._portal)


class BlackbirdSDK:
    """Synchronous Blackbird client. Same constructor as :class:`AsyncBlackbird`.

    ``BlackbirdSDK(development_mode=True)`` starts an embedded nats-server on a temporary folder;
    ``data_dir=`` keeps data; ``nats_url=`` connects to an external server. Close it with
    :meth:`close` or use it as a context manager. Safe to call from several threads.
    """

    def __init__(
        self,
        *,
        development_mode: bool = False,
        data_dir: str | Path | None = None,
        nats_url: str | None = None,
        tenant: str | None = None,
        remote: bool = False,
        **options: Any,
    ) -> None:
        client = AsyncBlackbird(
            development_mode=development_mode, data_dir=data_dir, nats_url=nats_url,
            tenant=tenant, remote=remote, **options,
        )
        self._stack = contextlib.ExitStack()
        try:
            portal = self._stack.enter_context(start_blocking_portal(backend="asyncio"))
            self._client = self._stack.enter_context(portal.wrap_async_context_manager(client))
        except BaseException:
            self._stack.close()
            raise
        self._portal: BlockingPortal | None = portal
        self._session_manager = SessionManager(self._client.session_manager, portal)
        # The portal's event-loop thread is not a daemon, and the interpreter joins such threads
        # before atexit handlers run: without this hook a script that forgets close() would hang
        # on exit instead of flushing and stopping its embedded server.
        ref = weakref.ref(self)

        def close_at_exit() -> None:
            sdk = ref()
            if sdk is not None:
                sdk.close()

        threading._register_atexit(close_at_exit)  # type: ignore[attr-defined]

    @property
    def session_manager(self) -> SessionManager:
        """Sessions: create, get, touch, change tier, terminate (blocking)."""
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return self._session_manager

    @property
    def memory(self) -> Memory:
        """Memory: remember/recall, the key-value cache, sharing and erasure (blocking)."""
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return Memory(self._client.memory, self._portal)

    @property
    def streams(self) -> Streams:
        """Session streams: subscribe to a session's channel messages (blocking iteration)."""
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return Streams(self._client.streams, self._portal)

    @property
    def audit(self) -> SyncAuditor:
        """Replay a session, user or tenant up to an instant or sequence (blocking)."""
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return SyncAuditor(self._client.audit, self._portal)

    @property
    def settings(self) -> Any:
        return self._client.settings

    @property
    def nats_url(self) -> str | None:
        return self._client.nats_url

    @property
    def data_dir(self) -> Path | None:
        return self._client.data_dir

    @property
    def async_client(self) -> AsyncBlackbird:
        """The AsyncBlackbird this facade runs (use only from its portal's event loop)."""
        return self._client

    def send_message(self, message: str, **options: Any) -> dict[str, Any]:
        """Post a message on a session's channel (default: the last session this SDK created);
        see :meth:`AsyncSessionManager.send_message`."""
        return self.session_manager.send_message(message, **options)  # type: ignore[attr-defined,no-any-return]

    def run(self, func: Any, *args: Any) -> Any:
        """Run ``await func(*args)`` on this SDK's event loop and return its result."""
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return self._portal.call(func, *args)

    def close(self) -> None:
        """Stop actors, flush, stop the embedded server if this process owns it. Idempotent."""
        if self._portal is None:
            return
        self._portal = None
        self._stack.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave a thread and server behind
        with contextlib.suppress(Exception):
            self.close()
