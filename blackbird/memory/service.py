"""Memory: a key-value cache and semantic vector memory, event-sourced, on LanceDB.

Writes go through the memory scope's actor (``<scope>:<owner>``) and become events; texts,
vectors and metadata are redacted, then sealed with the author's data key before they are
appended. The LanceDB tables are a projection of those events (:mod:`blackbird.memory.index`).

Every call names the acting session (``session_id=``): it tells the tenant, the user and the
tier (capacity, retention, redaction, storage quota), and every scope read or written is checked
against it: ``session`` (that session), ``user`` (its user), ``tenant`` (any user of the
tenant), ``group:<id>`` and ``agent:<id>`` (members only, see :meth:`AsyncMemory.add_members`; a
member is a user or an agent: a session reaches such a scope if its user or its assigned agent is
a member, and an agent always reaches its own ``agent:<id>``).
"""

from __future__ import annotations

import asyncio
import builtins
import json
import math
import operator
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any, NamedTuple

import anyio
import anyio.abc
import msgspec
import numpy as np
import structlog

from actors.events import (
    ChangeMembers,
    DeleteCache,
    EraseUser,
    ForgetAuthor,
    ForgetMemory,
    GetCache,
    GetSession,
    MemoryRemembered,
    MemorySuperseded,
    Remember,
    SetCache,
)
from actors.host import ActorHost
from actors.memory import SCOPES, MemoryState, scope_id
from actors.policy import MemoryPolicy
from actors.ports import AggregateKey
from actors.redaction import RedactionPolicy, redact
from actors.validation import CACHE_VALUE, MAX_MEMORY_TEXT
from blackbird._errors_group import single_error
from blackbird._projections import Projections
from blackbird._validate import (
    check_document,
    check_epoch,
    check_fraction,
    check_metadata,
    check_seconds,
    check_str,
    check_text,
    invalid,
)
from blackbird.commands.dispatch import ask_or_raise
from blackbird.errors import (
    EmbeddingModelMismatchError,
    PayloadTooLargeError,
    ProjectionTimeoutError,
    ScopeAccessError,
    SessionInactiveError,
)
from blackbird.ids import derived_id, new_id
from blackbird.journal import Journal
from blackbird.memory.graph import FunctionalPredicates, GraphMemory, GraphReader
from blackbird.memory.index import MemoryIndex, Sealed
from blackbird.memory.keys import UserKeys
from blackbird.sessions.gateway import SessionGateway, acting_principal
from blackbird.sessions.quotas import Quotas
from blackbird.subjects import validate_token
from blackbird.types import Memory

log = structlog.get_logger("blackbird.memory")

DEFAULT_WEIGHTS = {"similarity": 0.6, "keyword": 0.15, "recency": 0.1, "importance": 0.15, "graph": 0.25}
RECENCY_HALF_LIFE = 7 * 86400.0
_REDACT_ALL = RedactionPolicy()  # every kind: what any tier's policy could redact


class AsyncMemory(GraphMemory):
    """``.memory`` on AsyncBlackbird: remember/recall, the knowledge graph (relate, entity,
    neighbors, facts_about, ...), the key-value cache, sharing, erasure."""

    def __init__(
        self,
        gateway: SessionGateway,
        quotas: Quotas,
        host: ActorHost,
        index: MemoryIndex,
        journal: Journal,
        keys: UserKeys,
        embedder: Any,
        *,
        tasks: anyio.abc.TaskGroup,
        principal: str,
        timeout: float,
        clock: Callable[[], float] = time.time,
        projections: Projections | None = None,
        functional_predicates: Sequence[str] = (),
    ) -> None:
        self._gateway = gateway
        self._quotas = quotas
        self._journal = journal
        self._host = host
        self.index = index
        self._keys = keys
        self._embedder = embedder
        self._query_vectors: OrderedDict[tuple[str, str], asyncio.Future[np.ndarray]] = OrderedDict()
        self._tasks = tasks
        self._index_started = False
        self._index_starting = anyio.Lock()
        self._principal = principal
        self._timeout = timeout
        self._clock = clock
        self._projections = projections  # the graph's read model among them
        self._functional = FunctionalPredicates(functional_predicates)
        self._graph_reader = GraphReader(keys)
        self._written = 0  # the last memory sequence this client wrote (read-your-writes)
        # this client's writes the index may not hold yet: (seq, tenant, scope id, id, vector)
        self._pending: list[tuple[int, str, str, str, np.ndarray]] = []

    # ------------------------------------------------------------------ helpers

    @property
    def embedder(self) -> Any:
        """The embedder (the local all-MiniLM-L6-v2 unless another was given)."""
        if self._embedder is None:
            from blackbird.embedding import default_embedder

            self._embedder = default_embedder()
        return self._embedder

    async def _index(self) -> MemoryIndex:
        """The index, started (caught up with the log, then following it) on first use."""
        if not self._index_started:
            async with self._index_starting:
                if not self._index_started:
                    await self._tasks.start(self.index.run)
                    self._index_started = True
        return self.index

    async def _caller(self, session_id: Any, tenant: str | None) -> tuple[Any, MemoryPolicy]:
        session = await self._gateway.existing(session_id, tenant)
        if not session.active_at(self._clock()):
            raise SessionInactiveError(
                f"session {session.session_id!r} is not active; memory needs an active session",
                session_id=session.session_id, reason=session.status.value,
            )
        return session, self._gateway.memory_policy(session)

    async def _ask(self, tenant: str, sid: str, command: Any, command_id: str | None = None) -> Any:
        outcome = await ask_or_raise(
            self._host, AggregateKey(tenant, "memory", sid), command, command_id,
            acting_principal.get() or self._principal
        )
        self._written = max(self._written, outcome.sequence)
        return outcome

    async def _scope(self, spec: Any, session: Any, *, write: bool) -> str:
        """``spec`` ("user", "group:research", ...) as a scope id the caller may use."""
        if not isinstance(spec, str) or not spec:
            raise invalid("scope", "one of session, user, tenant, group:<id>, agent:<id>", repr(spec))
        kind, _, owner = spec.partition(":")
        if kind not in SCOPES:
            raise invalid("scope", "one of session, user, tenant, group:<id>, agent:<id>", repr(spec))
        if kind in ("session", "user", "tenant"):
            mine = {"session": session.session_id, "user": session.user_id, "tenant": session.tenant}[kind]
            if owner and owner != mine:
                raise ScopeAccessError(
                    f"scope {spec!r}: the acting session's {kind} is {mine!r}", scope=spec,
                    user_id=session.user_id,
                )
            return scope_id(kind, mine)
        owner = validate_token(owner, "scope")
        agent = getattr(session, "agent_id", None)  # the agent answering the session, if assigned
        if kind == "agent" and agent is not None and owner == agent:
            return scope_id(kind, owner)  # an agent's own scope
        state: MemoryState = (await self._ask(session.tenant, scope_id(kind, owner), GetSession())).state
        if session.user_id not in state.members and (agent is None or agent not in state.members):
            raise ScopeAccessError(
                f"user {session.user_id!r} is not a member of {spec!r}"
                + ("" if write else " and cannot read it"),
                scope=spec, user_id=session.user_id,
            )
        return scope_id(kind, owner)

    def _query_vector(self, query: str) -> asyncio.Future[np.ndarray]:
        """The query's vector, embedded in a worker thread unless a recall of the same text close
        by did or is doing it (an agent's turn recalls its message from several scopes at once);
        the last few are kept, a failed one is not. One future shared by its recalls: each
        awaits it shielded, so a cancelled recall leaves it to the others."""
        key = (str(getattr(self.embedder, "model_id", "")), query)
        future = self._query_vectors.get(key)
        if future is not None:
            self._query_vectors.move_to_end(key)
            return future
        future = asyncio.get_running_loop().run_in_executor(None, self.embedder.embed, [query])
        self._query_vectors[key] = future
        while len(self._query_vectors) > _QUERY_CACHE:
            self._query_vectors.popitem(last=False)

        def forget_failure(done: asyncio.Future[np.ndarray]) -> None:
            # (reading the error also keeps asyncio from logging it when no recall awaits it)
            if (done.cancelled() or done.exception() is not None) and self._query_vectors.get(key) is done:
                del self._query_vectors[key]  # the next recall of this text embeds it again

        future.add_done_callback(forget_failure)
        return future

    def _vector(self, text: str, vector: Any) -> np.ndarray:
        if vector is None:
            embedded: np.ndarray = self.embedder.embed([text])[0]
            return embedded
        expected = f"{self.embedder.dimension} finite numbers ({self.embedder.model_id})"
        if isinstance(vector, str | bytes) or not isinstance(vector, Sequence | np.ndarray):
            raise invalid("vector", expected, type(vector).__name__)
        try:
            array = np.asarray(vector, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError, OverflowError):
            raise invalid("vector", expected, "values that are not all numbers") from None
        if array.shape[0] != self.embedder.dimension or not np.all(np.isfinite(array)):
            raise invalid("vector", expected, f"{array.shape[0]} values")
        norm = float(np.linalg.norm(array))
        if norm == 0:
            raise invalid("vector", "a non-zero vector", "all zeros")
        return array / norm

    # ------------------------------------------------------------------ semantic memory

    async def remember(
        self,
        text: str,
        *,
        session_id: str,
        scope: str = "user",
        importance: float = 0.5,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        kind: str = "fact",
        vector: Sequence[float] | None = None,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> Memory:
        """Remember ``text`` in ``scope``; durable when it returns.

        Emails, phone numbers and card numbers are redacted first (per the tier's memory
        policy); the text counts against the session's storage quota (QuotaExceededError). A
        near-duplicate of a memory in the scope (cosine above the tier's threshold) updates it;
        a memory with the same ``key`` supersedes the older one (which ``recall(as_of=...)``
        still finds for earlier instants). ``vector`` skips embedding (it must have the
        embedder's dimension). Retention per ``kind`` comes from the tier's memory policy.
        """
        return (await self.remember_many(
            [text], session_id=session_id, scope=scope, importance=importance, metadata=metadata,
            key=key, kind=kind, vectors=None if vector is None else [vector], tenant=tenant,
            command_id=command_id,
        ))[0]

    async def remember_many(
        self,
        texts: Sequence[str],
        *,
        session_id: str,
        scope: str = "user",
        importance: float = 0.5,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        kind: str = "fact",
        vectors: Sequence[Sequence[float]] | None = None,
        dedupe: bool = True,
        tenant: str | None = None,
        command_id: str | None = None,
    ) -> list[Memory]:
        """Remember several texts at once: embedded in one batch, appended together (the
        scope's actor puts the writes that queue up into shared commits)."""
        if isinstance(texts, str) or not isinstance(texts, Sequence) or not texts:
            raise invalid("texts", "a non-empty list of strings", type(texts).__name__)
        cleaned = [_check_memory_text(t) for t in texts]
        importance = check_fraction(importance, "importance")
        meta = check_metadata(metadata)
        kind = check_text(kind, "kind")
        if key is not None:
            key = check_text(key, "key")
            if len(texts) > 1:
                raise invalid("key", "no key when remembering several texts", key)
        if vectors is not None:
            expected = f"{len(texts)} vectors, one per text"
            if isinstance(vectors, str | bytes) or not isinstance(vectors, Sequence | np.ndarray):
                raise invalid("vectors", expected, type(vectors).__name__)
            if len(vectors) != len(texts):
                raise invalid("vectors", expected, str(len(vectors)))
            for v in vectors:  # their length is the embedder's to check, their type is known now
                if isinstance(v, str | bytes) or not isinstance(v, Sequence | np.ndarray):
                    raise invalid("vector", "a sequence of finite numbers", type(v).__name__)
        # A text no policy would redact is the text embedded whatever the tier says: embed it
        # while the session is looked up (otherwise only once the tier's redaction is known).
        early = vectors is None and all(sum(redact(t, _REDACT_ALL)[1].values()) == 0 for t in cleaned)
        embedded: list[np.ndarray] = []

        async def embed() -> None:
            embedded.append(await anyio.to_thread.run_sync(self.embedder.embed, cleaned))

        with single_error():
            async with anyio.create_task_group() as tg:
                if early:
                    tg.start_soon(embed)
                session, policy = await self._caller(session_id, tenant)
                sid = await self._scope(scope, session, write=True)
        rules = RedactionPolicy.of(policy.redact)
        cleaned = [redact(t, rules)[0] for t in cleaned]
        if vectors is not None:
            matrix = np.stack([self._vector(t, v) for t, v in zip(cleaned, vectors, strict=True)])
        else:
            if not early:
                await embed()
            matrix = embedded[0]
        sizes = [len(t.encode()) for t in cleaned]
        await self._charge(session, sum(sizes), "memory.remember", command_id)
        retention = policy.retention_for(kind)
        now = self._clock()
        duplicates: list[str | None] = [None] * len(cleaned)
        if dedupe:
            duplicates = await self._duplicates(session.tenant, sid, matrix, policy.duplicate_threshold)
        memories: list[Memory] = [None] * len(cleaned)  # type: ignore[list-item]

        async def write(i: int) -> None:
            # a retry under the same command id writes the same memory (its id, and a fingerprint
            # of its content, are the same; the nonce and the clock are not, see Remember.volatile)
            memory_id = new_id(12) if command_id is None else derived_id(session.tenant, sid, command_id, str(i))[:24]
            sealed_plain = msgspec.msgpack.encode(
                Sealed(text=cleaned[i], vector=matrix[i].astype("<f4").tobytes(), metadata=meta)
            )
            target = duplicates[i] or memory_id
            # bound to its scope: a sealed payload copied into another scope does not open
            sealed = await self._keys.encrypt(session.tenant, session.user_id, sealed_plain, aad=sid.encode())
            kind_, owner = sid.split(":", 1)
            command = Remember(
                memory_id=memory_id, scope=kind_, owner=owner, author=session.user_id, key=key,
                kind=kind, importance=float(importance), model_id=self.embedder.model_id,
                size=sizes[i], sealed=sealed, expires_at=None if retention is None else now + retention,
                duplicate_of=duplicates[i],
                text_mac=None if command_id is None else await self._keys.mac(
                    session.tenant, session.user_id, sid.encode() + b"\x00" + sealed_plain
                ),
            )
            cid = None if command_id is None else f"{command_id}:{i}"
            outcome = await self._ask(session.tenant, sid, command, cid)
            remembered = next((e for e in outcome.events if isinstance(e, MemoryRemembered)), None)
            if remembered is not None:
                self._pending.append((outcome.sequence, session.tenant, sid, remembered.memory_id, matrix[i]))
            superseded = next((e.memory_id for e in outcome.events if isinstance(e, MemorySuperseded)), None)
            memories[i] = Memory(
                memory_id=remembered.memory_id if remembered else target, text=cleaned[i],
                scope=kind_, owner=owner, author=session.user_id, key=key, kind=kind,
                importance=float(importance), metadata=meta, valid_from=now, valid_to=None,
                sequence=outcome.sequence, updated=bool(remembered and remembered.updated),
                superseded=superseded,
            )

        with single_error():
            async with anyio.create_task_group() as tg:
                for i in range(len(cleaned)):
                    tg.start_soon(write, i)
        return memories

    async def _duplicates(self, tenant: str, sid: str, matrix: np.ndarray, threshold: float) -> list[str | None]:
        """For each vector, a memory of the scope it nearly duplicates (cosine >= threshold).

        Looks in the index as it is (without waiting for it to catch up: that wait was most of
        a write's latency) and in this client's own writes the index has not applied yet, so a
        client never writes a near-duplicate of its own earlier write. Two clients writing
        near-duplicates within the index's lag (milliseconds) may both keep theirs."""
        await self._index()
        self._pending = [p for p in self._pending if p[0] > self.index.seq]
        mine = [(mid, vec) for _, t, s, mid, vec in self._pending if t == tenant and s == sid]
        model = self.embedder.model_id

        (known,) = await self.index.scopes(tenant, model, [sid])

        def search() -> list[str | None]:
            ids = [row["memory_id"] if row else None for row in known.rows] + [mid for mid, _ in mine]
            parts = [known.similarity(matrix)]  # rows: known memories (dead ones: -inf)
            parts += [np.stack([v for _, v in mine]) @ matrix.T] if mine else []
            similarity = np.concatenate(parts)
            if not len(similarity):
                return [None] * len(matrix)
            found: list[str | None] = []
            for column in range(similarity.shape[1]):
                best = int(np.argmax(similarity[:, column]))
                found.append(ids[best] if similarity[best, column] >= threshold else None)
            return found

        # one product: a few vectors are answered on the spot, a batch in a worker thread
        return search() if len(matrix) <= 8 else await anyio.to_thread.run_sync(search)

    async def _caught_up(self) -> None:
        await self._index()
        if not await self.index.wait_for(self._written, self._timeout):
            raise ProjectionTimeoutError(
                f"the memory index applied sequence {self.index.seq}, not {self._written}, "
                f"within {self._timeout}s", projection="memory_index", wanted=self._written,
                applied=self.index.seq,
            )

    async def recall(
        self,
        query: str,
        *,
        session_id: str,
        scopes: Sequence[str] = ("session", "user"),
        k: int = 5,
        filters: dict[str, Any] | None = None,
        as_of: float | None = None,
        weights: dict[str, float] | None = None,
        tenant: str | None = None,
        expand: int = 0,
    ) -> list[Memory]:
        """The ``k`` memories most relevant to ``query`` in ``scopes`` (each checked against the
        acting session), best first. Hybrid: vector search and full-text (BM25) search fused by
        reciprocal rank, then re-ranked by ``weights`` of similarity, keyword rank, recency,
        importance and graph (1 for a memory a fact about an entity named in the query was
        extracted from: "where does Ada live?" finds "The user lives in Berlin" once the graph
        knows the user is Ada). ``filters``: exact matches on kind, key, author or
        ``metadata.<field>``. ``as_of``: what was known at that instant (superseded memories
        included, later ones not). ``expand=1``: each memory also carries ``facts``, the facts
        one hop from the entities of the facts extracted from it. Includes everything this
        client wrote before the call."""
        query = _check_memory_text(query, "query")
        if isinstance(expand, bool) or expand not in (0, 1):
            raise invalid("expand", "0 or 1 (hops of facts to add to each memory)", repr(expand))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 1000:
            raise invalid("k", "an int from 1 to 1000", repr(k))
        if isinstance(scopes, str) or not isinstance(scopes, Sequence) or not scopes:
            raise invalid("scopes", "a non-empty list of scopes", repr(scopes))
        if as_of is not None:
            check_epoch(as_of, "as_of")
        mix = dict(DEFAULT_WEIGHTS, **_check_weights(weights))
        wanted = _check_filters(filters)
        plan = await self._plan_recall(query, session_id, tenant, scopes, k, bool(wanted), as_of)
        if plan is None:
            return []
        linked: builtins.set[str] = builtins.set()
        by_graph: list[dict[str, Any]] = []
        if mix["graph"]:
            _, linked = await self._graph_links(plan.tenant, plan.sids, query, as_of)
            by_graph = plan.candidates.by_ids(linked)
        # The query is embedded once the rest is done, not beside it: on two cores, ONNX
        # Runtime's two threads, this loop's work and nats-server answering the session lookup
        # slow each other down about as much as running side by side saves (recall p50, same
        # run and data: 4.30 after vs 4.29 ms beside at load 1.0, 4.48-4.51 vs 4.65-4.73 ms at
        # load 1.5), and a call refused on the way (session, scope, model) embeds nothing.
        vector = (await asyncio.shield(self._query_vector(query)))[0]
        by_vector = await plan.candidates.by_vector(vector, plan.pool)
        found = _rank(by_vector, plan.by_text, vector, wanted, mix, plan.now, k, linked, by_graph)
        if expand and found:
            facts = await self._facts_of_memories(plan.tenant, [m.memory_id for m in found], plan.sids, as_of)
            found = [msgspec.structs.replace(m, facts=facts.get(m.memory_id, ())) for m in found]
        return found

    async def _plan_recall(
        self, query: str, session_id: str, tenant: str | None, scopes: Sequence[str], k: int,
        filtered: bool, as_of: float | None,
    ) -> _RecallPlan | None:
        """All of a recall but the query's embedding and the vector side: who asks, which
        scopes, the keyword side. None when the tenant has no memories yet."""
        session, _ = await self._caller(session_id, tenant)
        sids = sorted({await self._scope(s, session, write=False) for s in scopes})
        await self._caught_up()
        table = self._table_for(session.tenant)
        if table is None:
            return None
        now = self._clock()
        at = now if as_of is None else float(as_of)
        pool = max(k * (10 if filtered else 4), 20)
        candidates = _Candidates(self.index, session.tenant, self.embedder.model_id, sids, at, past=as_of is not None)
        by_text = await candidates.by_text(query, pool)
        return _RecallPlan(candidates, by_text, pool, now, session.tenant, sids)

    def _table_for(self, tenant: str) -> Any | None:
        """The tenant's table of this client's embedding model; None if it has no memories yet.
        Raises EmbeddingModelMismatchError if its memories were embedded by other models only."""
        model = self.embedder.model_id
        table = self.index.table(tenant, model)
        if table is None:
            others = self.index.models_of(tenant)
            if others:
                raise EmbeddingModelMismatchError(
                    f"tenant {tenant!r} has memories embedded with another model "
                    f"({', '.join(others)}), not {model!r}: searching across "
                    "models is refused; rebuild the index with this embedder "
                    "(memory.rebuild_index()) or use the model the memories were written with",
                    model_id=model,
                )
        return table

    async def forget(self, memory_id: str, *, session_id: str, scope: str = "user", tenant: str | None = None) -> bool:
        """Delete a memory from ``scope`` (an event; the index drops it). False if unknown."""
        memory_id = check_text(memory_id, "memory_id")
        session, _ = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        outcome = await self._ask(session.tenant, sid, ForgetMemory(memory_id=memory_id))
        return bool(outcome.events)

    # ------------------------------------------------------------------ key-value cache

    async def set(
        self, key: str, value: Any, scope: str = "session", ttl: float | None = None, *,
        session_id: str, importance: float = 0.5, tenant: str | None = None,
    ) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``; it expires after ``ttl`` seconds.
        Beyond the tier's capacity the entry with the lowest retention score (importance,
        access frequency, recency) is evicted, as an event."""
        key = check_text(key, "key")
        ttl = check_seconds(ttl, "ttl")
        data = msgspec.json.encode(check_document(value, "value", CACHE_VALUE))
        importance = check_fraction(importance, "importance")
        session, policy = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        sealed = await self._keys.encrypt(session.tenant, session.user_id, data, aad=key.encode())
        await self._ask(session.tenant, sid, SetCache(
            key=key, author=session.user_id, sealed=sealed, size=len(data),
            importance=float(importance), expires_at=None if ttl is None else self._clock() + ttl,
            capacity=policy.cache_entries,
        ))

    async def get(
        self, key: str, scope: str = "session", *, session_id: str, default: Any = None,
        tenant: str | None = None,
    ) -> Any:
        """The value under ``key`` (``default`` if absent, expired or evicted); a hit counts
        towards the entry's retention."""
        key = check_text(key, "key")
        session, _ = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=False)
        state: MemoryState = (await self._ask(session.tenant, sid, GetCache(key=key))).state
        entry = state.cache.get(key)
        if entry is None:
            return default
        plain = await self._keys.decrypt(session.tenant, entry.author, entry.sealed, aad=key.encode())
        return default if plain is None else json.loads(plain)

    async def delete(self, key: str, scope: str = "session", *, session_id: str, tenant: str | None = None) -> bool:
        """Remove ``key``; False if it was not there."""
        key = check_text(key, "key")
        session, _ = await self._caller(session_id, tenant)
        sid = await self._scope(scope, session, write=True)
        return bool((await self._ask(session.tenant, sid, DeleteCache(key=key))).events)

    # ------------------------------------------------------------------ sharing and erasure

    async def add_members(self, scope: str, user_ids: Sequence[str], *, tenant: str | None = None) -> list[str]:
        """Let ``user_ids`` read and write a ``group:<id>`` or ``agent:<id>`` scope (an
        administrative call: it is not checked against a session). Returns the members."""
        return await self._members(scope, add=user_ids, remove=(), tenant=tenant)

    async def remove_members(self, scope: str, user_ids: Sequence[str], *, tenant: str | None = None) -> list[str]:
        """Take ``user_ids`` out of a ``group:<id>`` or ``agent:<id>`` scope (an administrative call);
        they can no longer read or write it. Returns the members left."""
        return await self._members(scope, add=(), remove=user_ids, tenant=tenant)

    async def _members(self, scope: str, *, add: Sequence[str], remove: Sequence[str], tenant: str | None) -> list[str]:
        kind, _, owner = scope.partition(":") if isinstance(scope, str) else ("", "", "")
        if kind not in ("group", "agent") or not owner:
            raise invalid("scope", "group:<id> or agent:<id>", repr(scope))
        validate_token(owner, "scope")
        ids = tuple(validate_token(u, "user_ids") for u in (*add, *remove))
        tenant = self._gateway.tenant_of(tenant)
        outcome = await self._ask(tenant, scope_id(kind, owner), ChangeMembers(
            add=ids[: len(add)], remove=ids[len(add):]))
        return list(outcome.state.members)

    async def forget_user(self, user_id: str, *, tenant: str | None = None) -> dict[str, Any]:
        """Erase a user: their memories and cache entries leave every scope and index, and
        their data key is destroyed, so what they wrote cannot be recovered from the log
        either (crypto-shredding). The erasure itself is an event (``UserErased``)."""
        user_id = validate_token(user_id, "user_id")
        tenant = self._gateway.tenant_of(tenant)
        await self._gateway.user_commands(tenant, user_id, EraseUser(), f"erase:{user_id}:{new_id(4)}")
        scopes = await self._scopes_written_by(tenant, user_id)
        erased = 0
        for sid in scopes:
            outcome = await self._ask(tenant, sid, ForgetAuthor(author=user_id))
            erased += len(outcome.events)
        await self._keys.forget(tenant, user_id)
        self._graph_reader.forget_tenant(tenant)  # names it opened, the erased user's among them
        await self._caught_up()
        await self.index.erase_history()
        log.info("user_forgotten", tenant=tenant, user_id=user_id, scopes=len(scopes), removed=erased)
        return {"user_id": user_id, "scopes": sorted(scopes), "removed": erased}

    async def _scopes_written_by(self, tenant: str, user_id: str) -> builtins.set[str]:
        """Every memory scope of the tenant with a commit by ``user_id`` (from the log)."""
        found: builtins.set[str] = {scope_id("user", user_id)}
        prefix = f"{self._journal.subjects.prefix}.{tenant}.memory."

        def collect(seq: int, subject: str, commit: Any) -> None:
            for applied in commit.commands:
                for event in applied.events:
                    if getattr(event, "author", None) == user_id:
                        found.add(subject[len(prefix):])

        await self._journal.replay(prefix + "*", 0, collect)
        return found

    async def rebuild_index(self, *, reembed: bool = False) -> int:
        """Drop the LanceDB tables and rebuild them from the log; with ``reembed``, every text
        is embedded again with this client's embedder (moving the memories to its model)."""
        await self._index()
        return await self.index.rebuild(embedder=self.embedder if reembed else None)


# --------------------------------------------------------------------------- recall candidates


class _RecallPlan(NamedTuple):
    candidates: _Candidates
    by_text: list[dict[str, Any]]
    pool: int
    now: float
    tenant: str
    sids: list[str]


class _Candidates:
    """A recall's candidates, from the scopes' rows the index keeps in memory: BM25 over their
    inverted indexes for the words, a matrix product for the vector (no LanceDB query: a recall
    costs about one query embedding). Of the present: the current rows. ``past`` (a recall
    ``as_of``): the rows valid at that instant, current or superseded."""

    def __init__(self, index: MemoryIndex, tenant: str, model: str, sids: list[str], at: float, *, past: bool) -> None:
        self._index, self._tenant, self._model, self._sids, self._at = index, tenant, model, sids, at
        self._past = past
        self._scopes: list[Any] = []

    async def by_text(self, query: str, pool: int) -> list[dict[str, Any]]:
        self._scopes = await self._index.scopes(self._tenant, self._model, self._sids)
        # in memory from here on: no thread hop
        if self._past:
            return self._index.keyword_search(self._scopes, query, pool, at=self._at)
        rows = self._index.keyword_search(self._scopes, query, pool)
        return [row for row in rows if row["valid_from"] <= self._at]

    def by_ids(self, memory_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The current rows of these memories (those in the scopes and valid then)."""
        if self._past:
            return []  # as_of: the graph signal re-ranks the searches' rows only (as before)
        rows = [row for scope in self._scopes for mid in memory_ids if (row := scope.scope.rows.get(mid))]
        return [row for row in rows if row["valid_from"] <= self._at]

    async def by_vector(self, vector: np.ndarray, pool: int) -> list[dict[str, Any]]:
        best: list[tuple[float, int, dict[str, Any]]] = []
        for scope in self._scopes:
            if not self._past:  # rows not valid yet (another host's clock ahead) go below
                parts: list[tuple[Sequence[Any], np.ndarray]] = [(scope.rows, scope.similarity(vector))]
            else:
                parts = [(scope.rows, scope.similarity_at(vector, self._at))]
                if len(scope.past):
                    parts.append((scope.past.rows, scope.past.similarity_at(vector, self._at)))
            for rows, similarity in parts:
                n = len(similarity)
                top = np.argpartition(-similarity, pool)[:pool] if n > pool else np.arange(n)
                # plain floats and ints in one go (not a numpy scalar per row)
                first = len(best)
                best += [
                    (-value, first + j, rows[i])
                    for j, (i, value) in enumerate(zip(top.tolist(), similarity[top].tolist(), strict=True))
                    if value != -math.inf
                ]
        best.sort(key=_by_similarity)
        return [row for _, _, row in best if row["valid_from"] <= self._at][:pool]


_by_similarity = operator.itemgetter(0, 1)  # best first; ties in the order they were found


# --------------------------------------------------------------------------- ranking (pure)


def _rank(
    by_vector: list[dict[str, Any]], by_text: list[dict[str, Any]], query: np.ndarray,
    wanted: dict[str, Any], weights: dict[str, float], now: float, k: int,
    linked: Collection[str] = (), by_graph: Sequence[dict[str, Any]] = (),
) -> list[Memory]:
    fused: dict[str, float] = {}
    rows: dict[str, dict[str, Any]] = {}
    # linked by the graph (whatever their words and vectors): a third ranking in the fusion
    for ranking in (by_vector, by_text, by_graph):
        for rank, row in enumerate(ranking):
            rows.setdefault(row["memory_id"], row)
            fused[row["memory_id"]] = fused.get(row["memory_id"], 0.0) + 1.0 / (60 + rank + 1)
    best = 2.0 / 61
    w_similarity, w_keyword, w_recency, w_importance, w_graph = (weights[name] for name in _PARTS)
    scored: list[tuple[float, str, float, float, float, float]] = []
    metadata: dict[str, dict[str, Any]] = {}
    # one product for every candidate's similarity (not one dot product per row)
    similarities = (
        (np.stack([row["vector"] for row in rows.values()]).astype(np.float32, copy=False) @ query).tolist()
        if rows else ()
    )
    for (memory_id, row), similarity in zip(rows.items(), similarities, strict=True):
        if wanted:
            metadata[memory_id] = json.loads(row["metadata"])
            if not _matches(row, metadata[memory_id], wanted):
                continue
        keyword = fused[memory_id] / best
        recency = math.exp(-max(0.0, now - row["valid_from"]) * math.log(2) / RECENCY_HALF_LIFE)
        importance = float(row["importance"])
        graph = 1.0 if memory_id in linked else 0.0
        # the parts added in _PARTS order, as sum() over them would
        score = (0 + w_similarity * similarity + w_keyword * keyword + w_recency * recency
                 + w_importance * importance + w_graph * graph)
        scored.append((score, memory_id, similarity, keyword, recency, importance))
    scored.sort(key=lambda item: (-item[0], item[1]))
    out = []
    for score, memory_id, similarity, keyword, recency, importance in scored[:k]:
        row = rows[memory_id]
        parts = {
            "similarity": similarity, "keyword": keyword, "recency": recency, "importance": importance,
            "graph": 1.0 if memory_id in linked else 0.0,
        }
        out.append(Memory(
            memory_id=memory_id, text=row["text"], scope=row["scope"], owner=row["owner"],
            author=row["author"], key=row["key"] or None, kind=row["kind"],
            importance=importance,
            metadata=metadata.get(memory_id) or json.loads(row["metadata"]),
            valid_from=row["valid_from"],
            valid_to=None if math.isinf(row["valid_to"]) else row["valid_to"], sequence=row["seq"],
            score=score, scores=parts,
        ))
    return out


_PARTS = ("similarity", "keyword", "recency", "importance", "graph")  # a score's parts, in order


def _matches(row: dict[str, Any], metadata: dict[str, Any], wanted: dict[str, Any]) -> bool:
    for name, value in wanted.items():
        if name.startswith("metadata."):
            if metadata.get(name[len("metadata."):]) != value:
                return False
        elif (row[name] or None) != value:
            return False
    return True


def _check_filters(filters: Any) -> dict[str, Any]:
    if filters is None:
        return {}
    if not isinstance(filters, dict):
        raise invalid("filters", "a dict", type(filters).__name__)
    for name in filters:
        if name not in ("kind", "key", "author") and not (isinstance(name, str) and name.startswith("metadata.")):
            raise invalid("filters", "keys kind, key, author or metadata.<field>", repr(name))
    return dict(filters)


def _check_weights(weights: Any) -> dict[str, float]:
    """Ranking weights by part name (those not given keep their default)."""
    expected = f"a dict of finite numbers with keys among {sorted(DEFAULT_WEIGHTS)}"
    if weights is None:
        return {}
    if not isinstance(weights, dict):
        raise invalid("weights", expected, type(weights).__name__)
    unknown = sorted(str(name) for name in weights if name not in DEFAULT_WEIGHTS)
    if unknown:
        raise invalid("weights", expected, unknown)
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not -1e6 <= value <= 1e6:
            raise invalid("weights", expected + " (each within +/-1e6)", f"{name}={value!r}"[:200])
    return {name: float(value) for name, value in weights.items()}


def _check_memory_text(text: Any, field: str = "text") -> str:
    expected = f"a non-empty string of at most {MAX_MEMORY_TEXT} characters"
    if not isinstance(text, str) or not text.strip():
        raise invalid(field, expected, repr(text) if isinstance(text, str) else type(text).__name__)
    if len(text) > MAX_MEMORY_TEXT:
        raise PayloadTooLargeError(
            f"{field}: {len(text)} characters, expected at most {MAX_MEMORY_TEXT}",
            field=field, expected=expected, got=len(text),
        )
    return check_str(text, field)


_QUERY_CACHE = 64  # query vectors kept (recent recall texts)

