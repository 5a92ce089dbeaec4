"""BlackbirdSDK: the synchronous mirror of AsyncBlackbird.

It runs one AsyncBlackbird on an anyio blocking portal (an event loop in a background thread)
and forwards each call to it; calls are thread-safe. Each sync class names the async class it
mirrors and gets a blocking method for every public coroutine method of it, with the same name,
signature and docs, made when the class is created, so the two cannot drift apart. What differs
(context managers, properties, the calling thread as the default slot holder) is written here.

Type checkers and IDEs cannot see methods made at run time: ``_sync.pyi`` beside this module
declares them all. It is generated from these classes and the async ones by
``tools/make_sync_stubs.py``; run that after changing either (a test fails until you do).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from blackbird._client import AsyncBlackbird
from blackbird.agents.base import Agent, AgentReply
from blackbird.agents.conversation import Agents, ReplyStream
from blackbird.agents.learning import Extractor
from blackbird.audit.replay import Auditor
from blackbird.config import Settings
from blackbird.errors import ClosedError
from blackbird.memory.service import AsyncMemory
from blackbird.sessions.api_keys import ApiKey, ApiKeys
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.streams.subscription import (
    COALESCE,
    CRITICAL,
    AsyncStreams,
    StreamEvent,
    Subscription,
)
from blackbird.types import UsageRecord

T = TypeVar("T")


class _SyncMirror:
    """Forwards every public coroutine method of the mirrored async class through a blocking
    portal: ``class SessionManager(_SyncMirror, mirrors=AsyncSessionManager)``."""

    _async_type: ClassVar[type]
    _forwarded: ClassVar[tuple[str, ...]]  # the methods made here (the rest are written out)

    def __init__(self, target: Any, portal: BlockingPortal) -> None:
        self._target = target
        self._portal = portal

    def __init_subclass__(cls, mirrors: type, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._async_type = mirrors
        forwarded = []
        for name, member in inspect.getmembers(mirrors, inspect.iscoroutinefunction):
            if not name.startswith("_") and name not in cls.__dict__:
                setattr(cls, name, cls._forwarder(name, member))
                forwarded.append(name)
        cls._forwarded = tuple(forwarded)

    @staticmethod
    def _forwarder(name: str, member: Any) -> Any:
        @functools.wraps(member)
        def method(self: _SyncMirror, *args: Any, **kwargs: Any) -> Any:
            return self._portal.call(functools.partial(getattr(self._target, name), *args, **kwargs))

        return method


class SessionManager(_SyncMirror, mirrors=AsyncSessionManager):
    """Sessions and their limits, blocking: the methods of :class:`AsyncSessionManager`.

    ``sdk.session_manager``; every call waits for the event loop's answer. Safe to call from
    several threads.
    """

    @property
    def current_session(self) -> tuple[str, str] | None:
        """``(tenant, session_id)`` of the session this client created last (None before any)."""
        return self._target.current_session  # type: ignore[no-any-return]

    def add_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Call ``callback(record)`` once per usage charged through this client (track_usage,
        admit, settle), after it is durable, on the SDK's event-loop thread. A callback that
        raises is logged and breaks nothing."""
        self._target.add_usage_callback(callback)

    def remove_usage_callback(self, callback: Callable[[UsageRecord], Any]) -> None:
        """Stop calling ``callback``; unknown callbacks are ignored."""
        self._target.remove_usage_callback(callback)

    def manage_concurrency(
        self, session_id: str, operation: str, increment: bool, *, tenant: str | None = None,
        lease_seconds: float | None = None, holder: Hashable | None = None,
    ) -> int:
        """Take (``increment=True``) or give back a concurrency slot for ``operation``; returns
        the session's slots in use. Over the limit raises RateLimitError.

        As :meth:`AsyncSessionManager.manage_concurrency`, except that the holder defaults to
        the calling thread: a thread gives back only the slot it took.
        """
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
        """``with`` a concurrency slot; it is given back on exit, even on error. Over the limit,
        entering raises RateLimitError."""
        holder = ("slot", object())
        self.manage_concurrency(session_id, operation, True, tenant=tenant, holder=holder)
        try:
            yield
        finally:
            self.manage_concurrency(session_id, operation, False, tenant=tenant, holder=holder)


class Memory(_SyncMirror, mirrors=AsyncMemory):
    """Memory, blocking: the methods of :class:`AsyncMemory` (remember/recall, the key-value
    cache, sharing and erasure). ``sdk.memory``."""

    @property
    def embedder(self) -> Any:
        """The embedder (the local all-MiniLM-L6-v2 unless another was given)."""
        return self._target.embedder


class SyncAuditor(_SyncMirror, mirrors=Auditor):
    """Audit, blocking: the methods of :class:`Auditor` (``replay``, ``verify``). ``sdk.audit``."""

    @property
    def tenant(self) -> str:
        """The tenant audited when a call names none (the client's)."""
        return self._target.tenant  # type: ignore[no-any-return]


class SyncApiKeys(_SyncMirror, mirrors=ApiKeys):
    """API keys, blocking: the methods of :class:`ApiKeys` (create, list, revoke, verify).
    ``sdk.api_keys``."""

    def verify(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` (``bbk_<key_id>_<secret>``) is, or None: unknown, wrong
        secret, revoked, expired or not a key at all. Never waits, never raises."""
        return self._portal.call(self._target.verify, presented)  # type: ignore[no-any-return]

    def used(self, key_id: str) -> None:
        """Record that ``key_id`` was used now (at most once per 10 minutes per key), in the
        background; a failure is only logged."""
        self._portal.call(self._target.used, key_id)


class SyncSubscription(_SyncMirror, mirrors=Subscription):
    """The messages of one session, blocking: ``for event in sub`` waits for each message;
    ``get(timeout)`` gives None when none came in time. Made by :meth:`Streams.subscribe`."""

    @property
    def backlog(self) -> int:
        """How many messages wait for the reader."""
        return self._target.backlog  # type: ignore[no-any-return]

    @property
    def coalesced(self) -> int:
        """How many messages were replaced by a newer one of their channel before being read."""
        return self._target.coalesced  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[StreamEvent]:
        """Every message, in order, waiting for each; ends only with the subscription's error."""
        while True:
            yield self._portal.call(self._target.__anext__)


class Streams(_SyncMirror, mirrors=AsyncStreams):
    """Session streams, blocking: subscribe to a session's channel messages. ``sdk.streams``."""

    @contextlib.contextmanager
    def subscribe(
        self,
        session_id: str,
        *,
        channels: Sequence[str] | None = None,
        after: str | int | None = None,
        tenant: str | None = None,
        max_pending: int = 1000,
        coalesce: Sequence[str] = COALESCE,
        critical: Sequence[str] = CRITICAL,
    ) -> Iterator[SyncSubscription]:
        """``with sdk.streams.subscribe(session_id) as messages: for m in messages``.

        The arguments are those of :meth:`AsyncStreams.subscribe`: every message of the session
        (or of ``channels``) after ``after`` (a resume token or a commit sequence), then live
        ones; ``critical`` channels first, ``coalesce`` channels keep only their latest. Raises
        SessionNotFoundError, or ValidationError for a malformed argument.
        """
        manager = self._portal.wrap_async_context_manager(
            self._target.subscribe(
                session_id, channels=channels, after=after, tenant=tenant, max_pending=max_pending,
                coalesce=coalesce, critical=critical,
            )
        )
        with manager as subscription:
            yield SyncSubscription(subscription, self._portal)


class SyncReplyStream:
    """The reply's text as it is generated, blocking: ``for piece in sdk.stream_message(...)``;
    then ``reply`` is the persisted AgentReply. Leaving the loop early cancels the reply."""

    def __init__(self, stream: ReplyStream, portal: BlockingPortal) -> None:
        self._stream = stream
        self._portal = portal

    @property
    def reply(self) -> AgentReply:
        """The persisted reply; ClosedError before the stream was iterated to its end."""
        return self._stream.reply

    def __iter__(self) -> Iterator[str]:
        """The reply's text pieces, waiting for each."""
        pieces = self._stream.__aiter__()
        try:
            while True:
                try:
                    yield self._portal.call(pieces.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            self._portal.call(pieces.aclose)


class BlackbirdSDK:
    """Synchronous Blackbird client: :class:`AsyncBlackbird` run on an event loop in a
    background thread, with the same constructor.

    ``BlackbirdSDK(development_mode=True)`` starts an embedded nats-server on a temporary folder;
    ``data_dir=`` keeps data; ``nats_url=`` connects to an external server (a cluster: its URLs
    comma-separated or as a list). It opens when made
    (raising EmbeddedServerError if NATS cannot be reached). Close it with :meth:`close` or use
    it as a context manager. Safe to call from several threads.
    """

    def __init__(
        self,
        *,
        development_mode: bool = False,
        data_dir: str | Path | None = None,
        nats_url: str | Sequence[str] | None = None,
        tenant: str | None = None,
        remote: bool = False,
        clock: Callable[[], float] = time.time,
        embedder: Any = None,
        extractor: Extractor | None = None,
        **options: Any,
    ) -> None:
        client = AsyncBlackbird(
            development_mode=development_mode, data_dir=data_dir, nats_url=nats_url,
            tenant=tenant, remote=remote, clock=clock, embedder=embedder, extractor=extractor, **options,
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

    def _open_portal(self) -> BlockingPortal:
        if self._portal is None:
            raise ClosedError("BlackbirdSDK is closed")
        return self._portal

    @property
    def session_manager(self) -> SessionManager:
        """Sessions and their limits: create, get, touch, change tier, terminate; quotas, rate
        limits, concurrency, admission, analytics (blocking). Raises ClosedError once closed."""
        self._open_portal()
        return self._session_manager

    @property
    def memory(self) -> Memory:
        """Memory: remember/recall, the key-value cache, sharing and erasure (blocking). Raises
        ClosedError once closed."""
        return Memory(self._client.memory, self._open_portal())

    @property
    def api_keys(self) -> SyncApiKeys:
        """API keys of the HTTP API: create, list, revoke, verify (blocking). Raises ClosedError
        once closed, AccessDeniedError on tenant credentials."""
        return SyncApiKeys(self._client.api_keys, self._open_portal())

    @property
    def streams(self) -> Streams:
        """Session streams: subscribe to a session's channel messages (blocking iteration).
        Raises ClosedError once closed."""
        return Streams(self._client.streams, self._open_portal())

    @property
    def audit(self) -> SyncAuditor:
        """Replay a session, user or tenant up to an instant or sequence (blocking). Raises
        ClosedError once closed."""
        return SyncAuditor(self._client.audit, self._open_portal())

    @property
    def settings(self) -> Settings:
        """The settings in effect (defaults < ``BLACKBIRD_*`` environment < constructor)."""
        return self._client.settings

    @property
    def nats_url(self) -> str | None:
        """The NATS server this client is connected to."""
        return self._client.nats_url

    @property
    def data_dir(self) -> Path | None:
        """The embedded server's data folder (None with ``nats_url=``)."""
        return self._client.data_dir

    @property
    def tenant_credentials(self) -> bool:
        """Whether this client is connected with a tenant's credentials (see README, Security)."""
        return self._client.tenant_credentials

    @property
    def async_client(self) -> AsyncBlackbird:
        """The AsyncBlackbird this facade runs (use only from its portal's event loop)."""
        return self._client

    @property
    def agents(self) -> Agents:
        """The agents replies come from: ``register(agent)``, ``get(agent_id)``, ``default``."""
        return self._client.agents

    def send_message(
        self, message: str, session_id: str | None = None, *, agent: str | Agent | None = None,
        tenant: str | None = None,
    ) -> AgentReply:
        """Send ``message`` to the session's agent (default session: the last this SDK created)
        and return its reply; see :meth:`AsyncBlackbird.send_message`. To only post a message
        on a channel, use ``session_manager.send_message``."""
        return self.run(self._client.send_message, message, session_id, agent=agent, tenant=tenant)

    def stream_message(
        self, message: str, session_id: str | None = None, *, agent: str | Agent | None = None,
        tenant: str | None = None,
    ) -> SyncReplyStream:
        """As :meth:`send_message`, as an iterator of the reply's text pieces as generated
        (``for piece in sdk.stream_message(...)``); then the reply is the iterator's ``reply``."""
        stream = self._client.stream_message(message, session_id, agent=agent, tenant=tenant)
        return SyncReplyStream(stream, self._open_portal())

    def stop_reply(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Stop the reply being generated in ``session_id`` (in any process); see
        :meth:`AsyncBlackbird.stop_reply`."""
        return self.run(self._client.stop_reply, session_id, tenant=tenant)

    def passivate_idle(self, idle_for: float = 0.0) -> int:
        """Passivate the actors idle for ``idle_for`` seconds now; see
        :meth:`AsyncBlackbird.passivate_idle` (run on the client's event loop)."""
        count: int = self._open_portal().call(self._client.passivate_idle, idle_for)
        return count

    def run(self, func: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await func(*args, **kwargs)`` on this SDK's event loop and return its result.
        Raises ClosedError once closed."""
        return self._open_portal().call(functools.partial(func, *args, **kwargs))

    def close(self) -> None:
        """Stop actors, flush, stop the embedded server if this process owns it. Idempotent."""
        if self._portal is None:
            return
        self._portal = None
        self._stack.close()

    def __enter__(self) -> Self:
        """The SDK itself; it is closed on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the SDK."""
        self.close()

    def __del__(self) -> None:  # a forgotten close() must not leave a thread and server behind
        with contextlib.suppress(Exception):
            self.close()
