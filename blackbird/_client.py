"""AsyncBlackbird: the one implementation of the public API (BlackbirdSDK mirrors it)."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self

import anyio
import msgspec
import nats.errors
import nats.js.errors
import structlog
from nats.aio.client import Client as NATS

from actors.events import UserCommand
from actors.host import ActorHost, Behaviour, Outcome
from actors.memory import MemoryBehaviour
from actors.policy import Policy, PolicyError, default_policy, load_policy
from actors.ports import AggregateKey, NoSnapshots
from actors.session import SessionBehaviour
from actors.tenant import PolicyBook, TenantBehaviour
from actors.user import UserBehaviour
from blackbird._logging import configure_default_logging
from blackbird._nats import Connection
from blackbird._projections import MemoryCheckpoints, NatsCheckpoints, Projections, alert_raiser
from blackbird._retry import keep_running
from blackbird.agents.base import Agent, AgentReply
from blackbird.agents.conversation import Agents, Conversation, ReplyStream
from blackbird.agents.development import DevelopmentAgent
from blackbird.agents.learning import Extractor, Learner, RuleExtractor
from blackbird.audit.replay import Auditor
from blackbird.commands.dispatch import Dispatcher, LocalDispatcher, ask_or_raise
from blackbird.commands.logs import LogService, Reconnects, RemoteLog
from blackbird.commands.remote import RemoteDispatcher
from blackbird.commands.service import CommandService
from blackbird.config import Settings, build_settings, nats_servers, redact_url
from blackbird.connection import connect_options, identity_name
from blackbird.errors import (
    AccessDeniedError,
    BlackbirdError,
    ClosedError,
    EmbeddedServerError,
    ValidationError,
    field_of,
)
from blackbird.journal import Journal
from blackbird.memory.index import MemoryIndex
from blackbird.memory.keys import UserKeys
from blackbird.memory.master_key import load_master_keys
from blackbird.memory.service import AsyncMemory
from blackbird.server.access import inbox_prefix
from blackbird.server.embedded import EmbeddedServer
from blackbird.sessions.analytics import Analytics
from blackbird.sessions.api_keys import ApiKeys
from blackbird.sessions.gateway import SessionGateway, acting_principal
from blackbird.sessions.manager import AsyncSessionManager
from blackbird.sessions.quotas import Quotas
from blackbird.sessions.tenants import TenantDirectory
from blackbird.streams.feeds import LiveFeeds, SharedLog
from blackbird.streams.subscription import AsyncStreams
from blackbird.subjects import Subjects, validate_token
from projections.abuse import AbuseConfig, AbuseProjection
from projections.activity import ActivityProjection
from projections.graph import GraphProjection

log = structlog.get_logger("blackbird")

DEFAULT_DATA_DIR = "blackbird-data"


def _load_policy(settings: Settings) -> Policy:
    if settings.policy_file is None:
        return default_policy()
    try:
        return load_policy(Path(settings.policy_file).read_bytes())
    except (OSError, PolicyError) as exc:
        raise ValidationError(
            f"policy_file: {exc}", field="policy_file", expected="a readable tier policy TOML file"
        ) from None


def _default_extractor(settings: Settings) -> Extractor:
    """The OpenAI-compatible extractor when an agent endpoint is configured, else the rules."""
    if settings.agent_base_url:
        # imported on use: only hosts configured for a model API load the HTTP agent's module
        from blackbird.agents.openai import OpenAIExtractor

        extractor = OpenAIExtractor.from_settings(settings)
        if extractor is not None:
            return extractor
    return RuleExtractor()


def _owner_lookup(gateway: SessionGateway) -> Callable[[str, str], Awaitable[str | None]]:
    async def owner_of(session_id: str, tenant: str) -> str | None:
        session = await gateway.find(session_id, tenant)
        return None if session is None else session.user_id

    return owner_of


def _agents(settings: Settings) -> Agents:
    """The development agent, and the OpenAI-compatible one (the default) when the settings
    name a model API (``agent_base_url``)."""
    agents = Agents(DevelopmentAgent())
    if settings.agent_base_url:
        # imported on use: only clients configured for a model API load the HTTP agent's module
        from blackbird.agents.openai import OpenAIAgent

        made = OpenAIAgent.from_settings(settings)
        if made is not None:
            agents.register(made, default=True)
    return agents


def _abuse_config(settings: Settings) -> AbuseConfig:
    try:
        return msgspec.convert(settings.abuse, AbuseConfig)
    except (msgspec.ValidationError, ValueError) as exc:
        field = "abuse" + ("." + field_of(exc, "")).rstrip(".") if "`$." in str(exc) else "abuse"
        raise ValidationError(
            f"{field}: {exc}", field=field, expected="thresholds of projections.abuse.AbuseConfig"
        ) from None


class _NoReadModels:
    """The read models of a client on tenant credentials: none (they fold every tenant's log)."""

    def __init__(self, principal: str, tenant: str) -> None:
        self._principal = principal
        self._tenant = tenant

    async def verify(self) -> dict[str, list[str]]:
        raise AccessDeniedError(
            "audit verify rebuilds the read models from the whole log: it needs the service identity, "
            "not tenant credentials", principal=self._principal, action="audit verify", tenant=self._tenant,
        )


async def _has_jetstream(nc: NATS, timeout: float) -> bool:
    """Whether this connection's account has JetStream (a tenant's account has none)."""
    try:
        await nc.jetstream(timeout=timeout).account_info()
    except nats.js.errors.ServiceUnavailableError:  # "JetStream not enabled for account"
        return False
    except nats.errors.NoRespondersError:
        return False
    except nats.js.errors.APIError as exc:
        return exc.err_code != _JETSTREAM_NOT_ENABLED
    return True


_JETSTREAM_NOT_ENABLED = 10039


class AsyncBlackbird:
    """Durable agent sessions over NATS JetStream. Use as ``async with AsyncBlackbird(...) as bb``.

    Where the data lives:

    * ``development_mode=True``: an embedded nats-server on a temporary folder, removed on close;
    * ``data_dir="path"``: an embedded nats-server whose store is under ``path`` (persistent;
      processes opening the same folder share one server);
    * ``nats_url="nats://..."`` (or ``BLACKBIRD_NATS_URL``): an external server or cluster; a
      cluster's URLs comma-separated (``"nats://a:4222,nats://b:4222"``) or as a list.

    With none of them, ``./blackbird-data`` is used. ``remote=True`` hosts no actors in this
    process and sends every command to the hosts serving the command subjects (``blackbird
    serve``); ``serve_commands=True`` makes this process one of those hosts. ``clock`` (seconds
    since the epoch) is what actors decide with; tests pass a controllable one.
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
        self.settings = build_settings(data_dir=data_dir, nats_url=nats_url, tenant=tenant, **options)
        configure_default_logging(self.settings.log_level)  # only if the application configured none
        self._embedder = embedder  # None: the local all-MiniLM-L6-v2, loaded on first use
        self._extractor = extractor  # None: chosen from the settings when a host opens
        validate_token(self.settings.tenant, "tenant")
        self.development_mode = development_mode
        self.remote = remote
        self._clock = clock
        self.policy = _load_policy(self.settings)
        self._abuse_config = _abuse_config(self.settings)
        self._stack: contextlib.AsyncExitStack | None = None
        self._session_manager: AsyncSessionManager | None = None
        self._nc: NATS | None = None
        self._journal: Journal | None = None
        self._host: ActorHost | None = None
        self._hosts: list[ActorHost] = []  # every actor host of this process (passivate_idle)
        self._auditor: Auditor | None = None
        self._projections: Projections | None = None
        self._memory: AsyncMemory | None = None
        self._learner: Learner | None = None
        self._streams: AsyncStreams | None = None
        self._api_keys: ApiKeys | None = None
        self._conversation: Conversation | None = None
        self._tasks: anyio.abc.TaskGroup | None = None
        self.agents: Agents = _agents(self.settings)
        """The agents replies come from: ``register(agent)``, ``get(agent_id)``, ``default``."""
        self.data_dir: Path | None = None
        self.nats_url: str | None = self.settings.nats_url
        """The server URLs connected to (comma-separated; the embedded server's once open)."""
        self.tenant_credentials = False
        """Whether this client is connected with a tenant's credentials (no JetStream: see README Security)."""
        self._reconnects = Reconnects()

    @property
    def session_manager(self) -> AsyncSessionManager:
        """Sessions: create, get, touch, change tier, terminate (coroutines)."""
        if self._session_manager is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._session_manager

    def _conversing(self) -> Conversation:
        if self._conversation is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._conversation

    async def send_message(
        self, message: str, session_id: str | None = None, *, agent: str | Agent | None = None,
        tenant: str | None = None,
    ) -> AgentReply:
        """Send ``message`` to the session's agent and return its reply, once persisted.

        ``session_id`` None: the session this client created last (else ValidationError naming
        ``session_id``). ``agent``: a registered agent's id or an Agent; None: the session's
        agent, else ``agents.default``. The message is posted on ``chat`` (role "user"); the agent
        gets the session, the chat's last messages, memories recalled for the message (user,
        tenant and ``agent:<id>`` scopes) and the user's preferences, within a token budget; one
        admission (the ``send_message`` rate limit, a concurrency slot, a token reservation of
        the prompt plus the reply's maximum) comes before any model call and raises
        RateLimitError or QuotaExceededError when refused; the reply is posted on ``chat``
        (role "assistant", with its usage and the message and memory ids it was given) and
        the reservation settled with the real usage. While it is generated, its text so far is
        posted on ``draft``. To only post a message on a channel, use
        :meth:`AsyncSessionManager.send_message`."""
        return await self._conversing().reply(message, session_id, agent=agent, tenant=tenant)

    def stream_message(
        self, message: str, session_id: str | None = None, *, agent: str | Agent | None = None,
        tenant: str | None = None,
    ) -> ReplyStream:
        """As :meth:`send_message`, as an async iterator of the reply's text pieces as they are
        generated (``async for piece in bb.stream_message(...)``); the persisted reply is then
        the iterator's ``reply``. Leaving the loop early cancels the reply (its reservation is
        released)."""
        if self._tasks is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._conversing().stream(self._tasks, message, session_id, agent=agent, tenant=tenant)

    async def stop_reply(self, session_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Stop the reply being generated in ``session_id`` (in any process): a ``stop`` message
        on its ``control`` channel, in the log; the reply so far is persisted with
        ``stopped=True``. A stop with no reply being generated changes nothing. Returns where
        the request landed (``sequence``)."""
        return await self._conversing().stop(session_id, tenant=tenant)

    def _converse(self, tasks: anyio.abc.TaskGroup) -> None:
        s = self.settings
        self._tasks = tasks
        self._conversation = Conversation(
            self.session_manager, self.streams, lambda: None if self.tenant_credentials else self._memory,
            self.agents, max_reply_tokens=s.agent_max_tokens, timeout=s.command_timeout,
            journal=None if self.tenant_credentials else self._journal,
        )


    @property
    def journal(self) -> Journal:
        """The event log (read history, follow a tenant's or a session's commits)."""
        self._needs_service_identity("the journal")
        if self._journal is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._journal

    def _needs_service_identity(self, what: str) -> None:
        if self.tenant_credentials:
            raise AccessDeniedError(
                f"{what} needs the service identity: this client is connected with tenant credentials, "
                "which reach commands, session streams and audits of their tenant only",
                principal=self.settings.nats_user or "tenant", action=what, tenant=self.settings.tenant,
            )

    @property
    def projections(self) -> Projections:
        """The read models this client runs (lag, verify, rebuild)."""
        self._needs_service_identity("projections")
        if self._projections is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._projections

    @property
    def audit(self) -> Auditor:
        """Replay a session, user or tenant up to an instant or sequence (see :class:`Auditor`)."""
        if self._auditor is None or self._stack is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._auditor

    @property
    def memory(self) -> AsyncMemory:
        """Memory: remember/recall, the key-value cache, sharing and erasure (coroutines)."""
        self._needs_service_identity("memory")
        if self._memory is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._memory

    @property
    def learning(self) -> Learner:
        """The learner this host runs: users' stated facts become user-scope memories, off the
        reply path (``await bb.learning.caught_up(seq)`` waits until a message is learned).
        ClosedError before opening; BlackbirdError on a remote client or with ``learn=False``
        (no learner runs in this process)."""
        if self._learner is None:
            if self._stack is None:
                raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
            raise BlackbirdError(
                "this client runs no learner: hosts (not remote=True) with learn=True do"
            )
        return self._learner

    @property
    def api_keys(self) -> ApiKeys:
        """API keys of the HTTP API: create, list, revoke (coroutines); verify (at once)."""
        self._needs_service_identity("API keys")
        if self._api_keys is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._api_keys

    @property
    def streams(self) -> AsyncStreams:
        """Session streams: subscribe to a session's channel messages, resumable by event id."""
        if self._streams is None:
            raise ClosedError("AsyncBlackbird is not open; use `async with AsyncBlackbird(...)`")
        return self._streams

    @property
    def host(self) -> ActorHost | None:
        """The session actor host of this process (None for a remote client or before opening)."""
        return self._host

    def passivate_idle(self, idle_for: float = 0.0) -> int:
        """Passivate the actors (sessions, users, tenants, memory scopes) idle for ``idle_for``
        seconds now, as every host does on its own after ``passivate_after``; how many went."""
        return sum(host.passivate_idle(idle_for) for host in self._hosts)

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        await stack.__aenter__()
        try:
            await self._open(stack)
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def _open(self, stack: contextlib.AsyncExitStack) -> None:
        s = self.settings
        url = s.nats_url
        auth = connect_options(s)
        if url is None:
            if self.development_mode and s.data_dir is None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="blackbird-dev-"))
                self.data_dir = Path(tmp)
            else:
                self.data_dir = Path(s.data_dir or DEFAULT_DATA_DIR).resolve()
            server = await stack.enter_async_context(EmbeddedServer(self.data_dir, subject_prefix=s.subject_prefix))
            url = server.url
            if not auth:  # the folder's own service identity
                auth = server.service_auth()
        name = identity_name(auth)
        if name is not None:  # replies come to the one inbox prefix a tenant credential may subscribe to
            auth = {**auth, "inbox_prefix": inbox_prefix(name)}
        self.nats_url = url
        if s.memory_dir is not None:
            memory_dir = Path(s.memory_dir)
        elif self.data_dir is not None:
            memory_dir = self.data_dir / "memory"
        else:  # removed last, after everything that may still write to it has stopped
            memory_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blackbird-memory-")))
        nc = await self._connect(url, auth=auth)
        self._nc = nc
        stack.push_async_callback(self._drain_connection, nc, min(s.command_timeout, 5.0))
        if not await _has_jetstream(nc, s.command_timeout):
            if not self.remote:
                raise ValidationError(
                    "remote: these credentials reach no JetStream (a tenant's credentials, or a server without "
                    "JetStream), so this client cannot host actors; open it with remote=True to send commands "
                    "to the hosts (`blackbird serve`)",
                    field="remote", expected="True for a tenant's credentials", got=False,
                )
            await self._open_on_tenant_credentials(stack, nc)
            return
        # A remote client only sends commands: it must not need the rights to (re)configure the
        # stream, nor reconfigure it with settings that differ from the hosts'.
        journal = await stack.enter_async_context(Journal.open(nc, s, configure=not self.remote))
        self._journal = journal
        # Tenant policies: this process runs tenant commands itself (OCC keeps the tenant
        # aggregate single-writer) and follows every tenant's log; it is caught up before any
        # session command is decided or any limit reported.
        book = PolicyBook(self.policy)
        tenant_host = await stack.enter_async_context(self._actor_host(TenantBehaviour(self.policy), journal))
        tenants = TenantDirectory(journal, book, tenant_host, s.principal)
        tasks = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tasks.cancel_scope.cancel)
        # Background tasks run under keep_running: a failure once they are started is logged
        # and they start again; nothing they meet ends the client. (Without a stream, which only
        # a remote client opened before any host can meet, there are no policies to follow.)
        if journal.replicas is not None:
            with anyio.fail_after(s.command_timeout):  # caught up with the tenants' log in time
                await tasks.start(keep_running, "tenant_policies", tenants.follow)
        users = await stack.enter_async_context(
            self._actor_host(UserBehaviour(book), journal, snapshots=not self.remote)
        )

        async def user_commands(
            tenant: str, user_id: str, command: UserCommand, command_id: str | None
        ) -> Outcome:
            key = AggregateKey(tenant, "user", user_id)
            return await ask_or_raise(users, key, command, command_id, acting_principal.get() or s.principal)

        dispatcher: Dispatcher
        if self.remote:
            dispatcher = RemoteDispatcher(nc, journal.subjects, s.command_timeout)
        else:
            host = await stack.enter_async_context(
                self._actor_host(SessionBehaviour(book), journal, snapshots=True)
            )
            self._host = host
            dispatcher = LocalDispatcher(host, user_commands, clock=self._clock)
            if s.serve_commands:
                service = CommandService(nc, journal.subjects, dispatcher, s.queue_group, s.tenant_accounts)
                await tasks.start(keep_running, "command_service", service.run)
                reads = LogService(nc, journal, dispatcher, s.queue_group, s.tenant_accounts)
                await tasks.start(keep_running, "log_service", reads.run)
        # Read models: started on first use (a command-line client that never asks pays
        # nothing), checkpointed in NATS when this client may create buckets.
        checkpoints = await NatsCheckpoints.open(journal, s.replicas, create=not self.remote)
        # The host's own followers (read models, the learner) share one feed of the log.
        followers = SharedLog(journal, tasks)
        projections = Projections(followers, checkpoints or MemoryCheckpoints(), tasks, s.command_timeout)
        projections.register(ActivityProjection(s.usage_history_limit))
        projections.register(GraphProjection())
        if not self.remote and s.detect_abuse:  # hosts watch for abuse from the start
            projections.register(AbuseProjection(self._abuse_config), alert_raiser(user_commands, dispatcher))
            await projections.runner(AbuseProjection.name)
        self._projections = projections
        gateway = SessionGateway(
            dispatcher, book, user_commands, tenants.command, tenant=s.tenant, principal=s.principal,
            clock=self._clock,
        )
        quotas = Quotas(gateway)
        self._session_manager = AsyncSessionManager(
            gateway, quotas, Analytics(gateway, quotas, projections, s.analytics_k)
        )
        self._auditor = Auditor(journal, book, s.tenant, projections=self._projections)
        self._streams = AsyncStreams(gateway, journal, timeout=s.command_timeout, feeds=LiveFeeds(journal, tasks))
        self._api_keys = ApiKeys(tenants, book, tasks, tenant=s.tenant, clock=self._clock)
        # Memory: its actors here (OCC keeps each scope single-writer across processes), its
        # LanceDB index beside the data (or in a temporary folder: it is rebuilt from the log).
        # The master key wrapping the data keys: required where memory actors run (a remote
        # client without one can still do everything but seal or open memories).
        master_keys = load_master_keys(s, self.data_dir, required=not self.remote)
        keys = await UserKeys.open(
            journal.jetstream, replicas=s.replicas, create=not self.remote, contexts=journal.contexts,
            timeout=s.command_timeout, master_keys=master_keys,
        )
        memory_host = await stack.enter_async_context(
            self._actor_host(MemoryBehaviour(), journal, snapshots=not self.remote)
        )
        self._memory = AsyncMemory(
            gateway, quotas, memory_host, MemoryIndex(
                memory_dir, journal, keys, private_if_busy=s.memory_dir is None,
                cache_rows=s.memory_cache_rows,
            ),
            journal, keys, self._embedder, tasks=tasks, principal=s.principal, timeout=s.command_timeout,
            clock=self._clock, projections=projections, functional_predicates=s.functional_predicates,
        )
        if not self.remote and s.learn:  # hosts learn what users state, off the reply path
            learner = Learner(
                followers, self._memory, _owner_lookup(gateway), checkpoints or MemoryCheckpoints(),
                self._extractor or _default_extractor(s), timeout=s.command_timeout,
            )
            await tasks.start(keep_running, "learner", learner.run)
            self._learner = learner
        self._converse(tasks)
        log.info("blackbird_opened", nats_url=url, data_dir=str(self.data_dir), remote=self.remote)

    async def _open_on_tenant_credentials(self, stack: contextlib.AsyncExitStack, nc: NATS) -> None:
        """A remote client whose account has no JetStream (a tenant's credentials): commands go to
        the hosts as ever, and the log (audits, streams, the tenant's policy) is read through them;
        the rest (memory, analytics, operator actions) needs the service identity."""
        s = self.settings
        self.tenant_credentials = True
        reader = RemoteLog(nc, Subjects(s.subject_prefix), s.tenant, s.command_timeout, reconnects=self._reconnects)
        book = PolicyBook(self.policy)
        tenants = TenantDirectory(reader, book, None, s.principal, only=s.tenant)
        tasks = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tasks.cancel_scope.cancel)
        with anyio.fail_after(s.command_timeout):
            await tasks.start(keep_running, "tenant_policy", tenants.follow)

        async def user_commands(tenant: str, user_id: str, command: UserCommand, command_id: str | None) -> Outcome:
            raise AccessDeniedError(
                f"{type(command).__name__} needs the service identity, not tenant credentials",
                principal=s.nats_user or "tenant", action=type(command).__name__, tenant=tenant,
            )

        gateway = SessionGateway(
            RemoteDispatcher(nc, reader.subjects, s.command_timeout), book, user_commands, tenants.command,
            tenant=s.tenant, principal=s.nats_user or s.principal, clock=self._clock, confined=True,
        )
        quotas = Quotas(gateway)
        self._session_manager = AsyncSessionManager(gateway, quotas, Analytics(gateway, quotas, None, s.analytics_k))
        self._auditor = Auditor(reader, book, s.tenant, projections=_NoReadModels(s.nats_user or "tenant", s.tenant))
        self._streams = AsyncStreams(gateway, reader, timeout=s.command_timeout)
        self._converse(tasks)
        log.info("blackbird_opened", nats_url=self.nats_url, tenant=s.tenant, tenant_credentials=True)

    def _actor_host(self, behaviour: Behaviour[Any], journal: Journal, *, snapshots: bool = False) -> ActorHost:
        """An actor host with this client's settings; ``snapshots`` in the journal's KV bucket."""
        s = self.settings
        host = ActorHost(
            behaviour, journal, journal if snapshots else NoSnapshots(),
            snapshot_every=s.snapshot_every, passivate_after=s.passivate_after,
            max_retries=s.max_retries, retry_for=s.command_timeout / 2, timeout=s.command_timeout,
            clock=self._clock,
        )
        self._hosts.append(host)
        return host

    async def _connect(self, url: str, *, auth: dict[str, Any] | None = None) -> NATS:
        """Connect to any of the servers ``url`` lists within ``command_timeout``; once connected,
        reconnect forever (to any server of the cluster) on blips.

        ``auth``: the ``connect()`` keywords that authenticate this client (credentials, TLS);
        None: those of the settings (:func:`~blackbird.connection.connect_options`).

        Why these options: a server that is back is found within ``reconnect_time_wait`` (0.5 s);
        a server that stops answering (paused, or a network that drops packets) is given up
        after three unanswered pings, so the client moves to another node of a cluster; a forced
        flush of a full outgoing buffer waits at most ``flush_timeout`` instead of for ever. A
        server that refuses the credentials or the TLS handshake while connecting raises
        :class:`~blackbird.errors.NatsAuthError` at once: nats-py would retry it until the timeout.
        """
        import ssl

        from blackbird.connection import connect_options, credential_kind
        from blackbird.errors import NatsAuthError

        timeout = self.settings.command_timeout
        servers = nats_servers(url)
        shown = ",".join(redact_url(u) for u in servers)
        options = connect_options(self.settings) if auth is None else auth
        kind = credential_kind(options)

        quiet = False  # after the first failed reconnection attempt, the next ones are debug lines
        connecting = True  # until the first connection is made
        refused: Exception | None = None  # the server's refusal of the credentials or TLS handshake

        class Refused(Exception):
            """Raised by on_error to end nats-py's first-connect loop on a refusal."""

        async def on_error(exc: Exception) -> None:
            nonlocal quiet, refused
            if connecting and _refused(exc):
                refused = exc
                raise Refused  # out of nc.connect(): retrying the same credentials cannot help
            (log.debug if quiet else log.warning)(
                "nats_connection_error", nats_url=shown, error=str(exc) or type(exc).__name__
            )
            quiet = not nc.is_connected

        def _refused(exc: Exception) -> bool:
            text = str(exc).lower()
            return (
                isinstance(exc, nats.errors.AuthorizationError | ssl.SSLError)
                or "authorization violation" in text
                or "authentication" in text  # 'Authentication Timeout', '... Authentication Expired'
            )

        async def on_disconnected() -> None:
            if not nc.is_closed:  # closing the client is no news
                log.warning("nats_disconnected", nats_url=shown)

        async def on_reconnected() -> None:
            nonlocal quiet
            quiet = False
            log.warning("nats_reconnected", server=redact_url(nc.connected_url.geturl()) if nc.connected_url else None)
            self._reconnects.happened()

        nc = Connection()
        try:
            with anyio.fail_after(timeout):
                await nc.connect(
                    servers,
                    name="blackbird",
                    connect_timeout=max(1, min(int(timeout / 2), 5)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py annotates int, sleeps a float
                    ping_interval=max(1, int(timeout / 4)),
                    max_outstanding_pings=2,
                    flush_timeout=timeout,
                    error_cb=on_error,
                    disconnected_cb=on_disconnected,
                    reconnected_cb=on_reconnected,
                    **options,
                )
                connecting = False
                return nc
        except (Refused, TimeoutError, OSError, nats.errors.Error) as exc:
            # bounded: after a TLS handshake that failed, nats-py's close waits for ever for the
            # plain transport it upgraded to be closed
            with anyio.CancelScope(shield=True, deadline=anyio.current_time() + 1), \
                    contextlib.suppress(Exception):
                await nc.close()
            if refused is not None:
                reason = getattr(refused, "reason", None) or str(refused) or type(refused).__name__
                if isinstance(refused, ssl.SSLCertVerificationError):
                    problem = f"the TLS certificate of NATS at {shown} is not trusted (check tls_ca)"
                elif isinstance(refused, ssl.SSLError):
                    problem = f"NATS at {shown} refused the TLS handshake of this client"
                else:
                    problem = f"NATS at {shown} refused the credentials of this client"
                raise NatsAuthError(f"{problem} (auth: {kind}): {reason}", nats_url=shown, auth=kind) from None
            raise EmbeddedServerError(
                f"could not connect to NATS at {shown} within {timeout:g}s "
                f"({type(exc).__name__}); is the server running?",
                nats_url=shown,
            ) from None

    @staticmethod
    async def _drain_connection(nc: NATS, timeout: float) -> None:
        """Flush what is still to be sent and close, within ``timeout`` (a server that does not
        answer must not hold up closing): then just close."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(timeout):
                try:
                    await nc.drain()
                    return
                except Exception:  # already closed or the server is gone: nothing left to flush
                    pass
            with anyio.move_on_after(timeout), contextlib.suppress(Exception):
                await nc.close()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop hosting actors, flush the connection and stop the embedded server if we own it."""
        stack, self._stack = self._stack, None
        self._session_manager = None
        self._streams = None
        self._api_keys = None
        self._conversation = None
        self._tasks = None
        if stack is not None:
            await stack.aclose()
            log.info("blackbird_closed")
