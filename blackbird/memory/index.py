"""The memory index: a projection of the memory events into LanceDB tables.

* One table per tenant and embedding model (``mem_<tenant hex>_<model>``): tenants never share a
  table, and vectors of two models are never searched together.
* Rows are written in batches (upsert by memory id, ``valid_to`` set when a newer memory with
  the same key supersedes one, deleted when forgotten, expired or erased). Applying a batch
  twice gives the same table, so the checkpoint (the last sequence, in a file beside the tables
  it describes) may lag.
* The text, vector and metadata arrive sealed with the author's key; a sealed payload whose key
  was destroyed (``forget_user``) can no longer be opened and is skipped.
* Rebuildable: drop the tables, replay the log. With an embedder of another model, the replay
  re-embeds every text into that model's tables.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import json
import math
import os
import tempfile
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import msgspec
import numpy as np
import structlog

from actors.events import AuthorErased, Commit, MemoryForgotten, MemoryRemembered, MemorySuperseded
from blackbird.errors import DecryptionError, MemoryIndexBusyError, ValidationError
from blackbird.journal import Journal
from blackbird.memory.fulltext import search
from blackbird.memory.rows import LiveScope, Row, ScopeRows
from projections.runner import Waiters

log = structlog.get_logger("blackbird.memory")

INF = math.inf
OPTIMIZE_EVERY = 2_000  # rows written (or 64 small writes) before a table is compacted and re-indexed


class Sealed(msgspec.Struct, frozen=True):
    """What a memory event carries encrypted."""

    text: str
    vector: bytes  # float32, little-endian
    metadata: dict[str, Any] = {}


def table_name(tenant: str, model_id: str) -> str:
    model = "".join(c if c.isalnum() else "_" for c in model_id.lower())[-40:]
    return f"mem_{tenant.encode().hex()}_{model}"


def schema(dimension: int) -> Any:
    import pyarrow as pa  # imported when a table is first made: a CLI call never pays for it

    return pa.schema([
        pa.field("memory_id", pa.string()),
        pa.field("scope_id", pa.string()),
        pa.field("scope", pa.string()),
        pa.field("owner", pa.string()),
        pa.field("author", pa.string()),
        pa.field("key", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("importance", pa.float64()),
        pa.field("metadata", pa.string()),
        pa.field("text", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dimension)),
        pa.field("valid_from", pa.float64()),
        pa.field("valid_to", pa.float64()),
        pa.field("seq", pa.int64()),
    ])


class _Batch:
    """What one batch of commits does to the tables, coalesced per memory id."""

    def __init__(self) -> None:
        self.upserts: dict[tuple[str, str], dict[str, Any]] = {}  # (table, id) -> row
        self.valid_to: dict[tuple[str, str], float] = {}
        self.deletes: dict[str, set[str]] = {}  # tenant -> ids (from every model's table)
        self.erased: set[str] = set()  # tenants with a user erased: old table versions must go
        self.erased_ids: dict[str, set[str]] = {}  # tenant -> ids forgotten by an erasure
        self.erased_authors: dict[str, set[str]] = {}  # tenant -> authors an erasure named


_RETRY_CAP = 5.0  # seconds at most between two attempts to follow the log again


class MemoryIndex:
    """Keeps LanceDB in step with the log. ``await tg.start(index.run)``."""

    def __init__(
        self, path: Path, journal: Journal, keys: Any, *, embedder: Any = None,
        private_if_busy: bool = False, cache_rows: int = 200_000,
    ) -> None:
        self.path = Path(path)
        self._checkpoint = self.path / "checkpoint.json"
        self._private_if_busy = private_if_busy
        self._journal = journal
        self._keys = keys
        self._embedder = embedder  # re-embed with it when its model differs from the writer's
        self._db: Any = None
        self._unoptimized: dict[str, int] = {}  # table -> rows written since its last optimize
        # The rows of the scopes asked about, current and superseded, for the near-duplicate
        # check of a write and both sides of a recall, of the present or as of an earlier
        # instant: a matrix product and an in-memory BM25 instead of LanceDB queries (which cost
        # 4-8 ms each however small the scope). (table name, scope id) -> its rows; loaded from
        # the table on first use, kept in step by every batch. The least recently used scopes
        # leave once they hold more than cache_rows rows together (superseded ones included).
        self._current: collections.OrderedDict[tuple[str, str], LiveScope] = collections.OrderedDict()
        self._current_lock = threading.Lock()
        self._cache_rows = cache_rows
        self._cached_rows = 0  # rows of every scope in _current, kept in step (no sum per batch)
        # held while a batch is written and while a scope is read from the table, so a scope
        # never misses a batch written between its read and its arrival in _current
        self._write_lock = threading.Lock()
        self.seq = 0
        # True once the tables are known to hold the log up to self.seq and nothing after it
        self._exact = False
        self._waiters = Waiters()
        self._tables: dict[str, Any] = {}
        self._filter = f"{journal.subjects.prefix}.*.memory.*"
        self._lock = anyio.Lock()

    # ------------------------------------------------------------------ tables

    @property
    def db(self) -> Any:
        if self._db is None:
            import lancedb  # heavy (over a second): only a client that uses memory imports it

            self._db = lancedb.connect(str(self.path))
        return self._db

    def table(self, tenant: str, model_id: str) -> Any | None:
        name = table_name(tenant, model_id)
        table = self._tables.get(name)
        if table is None and name in self._table_names():
            table = self._tables[name] = self.db.open_table(name)
        return table

    def _table_names(self) -> list[str]:
        listed = self.db.list_tables()
        return list(getattr(listed, "tables", listed))

    def models_of(self, tenant: str) -> list[str]:
        prefix = f"mem_{tenant.encode().hex()}_"
        return [n[len(prefix):] for n in self._table_names() if n.startswith(prefix)]

    # ------------------------------------------------------------------ folding

    async def _prepare(self, entries: list[tuple[int, str, Commit]]) -> _Batch:
        batch = _Batch()
        for seq, subject, commit in entries:
            tenant = subject.split(".")[1]
            for applied in commit.commands:
                for event in applied.events:
                    if isinstance(event, MemoryRemembered):
                        row = await self._row(tenant, seq, event)
                        if row is not None:
                            name = table_name(tenant, row.pop("_model"))
                            earlier = batch.upserts.get((name, event.memory_id))
                            row["_new"] = earlier["_new"] if earlier else not event.updated
                            batch.upserts[(name, event.memory_id)] = row
                    elif isinstance(event, MemorySuperseded):
                        touched = [k for k in batch.upserts if k[1] == event.memory_id]
                        for k in touched:
                            batch.upserts[k]["valid_to"] = event.valid_to
                        if not touched:
                            batch.valid_to[(tenant, event.memory_id)] = event.valid_to
                    elif isinstance(event, MemoryForgotten):
                        for k in [k for k in batch.upserts if k[1] == event.memory_id]:
                            del batch.upserts[k]
                        batch.valid_to.pop((tenant, event.memory_id), None)
                        batch.deletes.setdefault(tenant, set()).add(event.memory_id)
                        if event.reason == "erased":
                            batch.erased.add(tenant)
                            batch.erased_ids.setdefault(tenant, set()).add(event.memory_id)
                    elif isinstance(event, AuthorErased):
                        batch.erased.add(tenant)
                        batch.erased_authors.setdefault(tenant, set()).add(event.author)
        return batch

    async def _row(self, tenant: str, seq: int, event: MemoryRemembered) -> dict[str, Any] | None:
        try:
            aad = f"{event.scope}:{event.owner}".encode()
            plain = await self._keys.decrypt(tenant, event.author, event.sealed, aad=aad)
        except (DecryptionError, ValidationError):  # unreadable for good (a destroyed key gives None)
            plain = None  # (a key bucket that cannot be read now raises LogError: retried)
        if plain is None:
            return None
        sealed = msgspec.msgpack.decode(plain, type=Sealed)
        vector = np.frombuffer(sealed.vector, dtype=np.float32)
        model = event.model_id
        if self._embedder is not None and self._embedder.model_id != model:
            vector = (await anyio.to_thread.run_sync(self._embedder.embed, [sealed.text]))[0]
            model = self._embedder.model_id
        return {
            "memory_id": event.memory_id, "scope_id": f"{event.scope}:{event.owner}",
            "scope": event.scope, "owner": event.owner, "author": event.author,
            "key": event.key or "", "kind": event.kind, "importance": event.importance,
            "metadata": json.dumps(sealed.metadata, sort_keys=True), "text": sealed.text,
            "vector": vector.astype(np.float32), "valid_from": event.valid_from, "valid_to": INF,
            "seq": seq, "_model": model, "_dimension": len(vector),
        }

    def _write(self, batch: _Batch) -> None:
        """Apply a prepared batch (blocking: runs in a worker thread)."""
        with self._write_lock:
            self._write_batch(batch)

    def _write_batch(self, batch: _Batch) -> None:
        by_table: dict[str, list[dict[str, Any]]] = {}
        for (name, _), row in batch.upserts.items():
            by_table.setdefault(name, []).append(row)
        for name, rows in by_table.items():
            dimension = rows[0].pop("_dimension")
            for row in rows[1:]:
                row.pop("_dimension", None)
            table = self._tables.get(name)
            if table is None:
                table = self._tables[name] = self.db.create_table(
                    name, schema=schema(dimension), exist_ok=True
                )
                with contextlib.suppress(Exception):  # vectors alone still work without them
                    from lancedb.index import FTS, BTree

                    table.create_index("text", config=FTS(), replace=True)
                    # every search is prefiltered by scope: an index on it makes that cheap
                    table.create_index("scope_id", config=BTree(), replace=True)
            # A memory id first remembered here is not in the table, unless this batch was
            # applied once already before a crash cut its checkpoint: adding is then only safe
            # once the start-up catch-up (upserts) has passed every such batch. Adding costs
            # a third of an upsert (4 vs 12 ms for one row of a 30,000-row table).
            fresh: list[dict[str, Any]] = []
            known: list[dict[str, Any]] = []
            for row in rows:
                (fresh if row.pop("_new") and self._exact else known).append(row)
            if fresh:
                table.add(fresh)
            if known:
                table.merge_insert("memory_id").when_matched_update_all().when_not_matched_insert_all().execute(known)
            with self._current_lock:
                for row in rows:
                    scope = self._current.get((name, row["scope_id"]))
                    if scope is not None:
                        before = len(scope)
                        if math.isinf(row["valid_to"]):
                            scope.put(row)
                        else:  # superseded in this very batch
                            scope.supersede(row)
                        self._cached_rows += len(scope) - before
                self._evict()
            # every write adds a fragment: count rows, and small writes as a batch's worth each
            self._unoptimized[name] = self._unoptimized.get(name, 0) + max(len(rows), OPTIMIZE_EVERY // 64)
        superseded = {memory_id: valid_to for (_, memory_id), valid_to in batch.valid_to.items()}
        gone = {i for ids in batch.deletes.values() for i in ids}
        if superseded or gone:
            with self._current_lock:
                for scope in self._current.values():
                    before = len(scope)
                    for memory_id, valid_to in superseded.items():
                        scope.retire(memory_id, valid_to)
                    for memory_id in gone:
                        scope.drop(memory_id)
                    self._cached_rows += len(scope) - before
        for tenant in sorted(set(batch.erased_ids) | set(batch.erased_authors)):
            self._erase_superseded(tenant, batch.erased_ids.get(tenant, set()), batch.erased_authors.get(tenant, set()))
        for (tenant, memory_id), valid_to in batch.valid_to.items():
            for table in self._tenant_tables(tenant):
                table.update(where=f"memory_id = {quote(memory_id)}", values={"valid_to": valid_to})
        for tenant, ids in batch.deletes.items():
            for table in self._tenant_tables(tenant):
                table.delete(f"memory_id IN ({', '.join(quote(i) for i in sorted(ids))})")
        # An erasure applied by any host (not only the one that ran forget_user) must leave no
        # older table version holding the text on this host's disk.
        for tenant in sorted(batch.erased):
            self._drop_old_versions(self._tenant_tables(tenant))
        # Each batch adds a fragment that the indices do not cover yet (searched by a scan):
        # compact and fold them into the indices once enough rows have piled up. Measured at
        # 30,000 rows: prefiltered vector search 28 -> 14 ms, full-text search 20 -> 7 ms.
        for name, pending in list(self._unoptimized.items()):
            if pending >= OPTIMIZE_EVERY:
                table = self._tables.get(name)
                if table is not None:
                    table.optimize()
                del self._unoptimized[name]

    def _erase_superseded(self, tenant: str, erased_ids: set[str], named: set[str]) -> None:
        """Remove the superseded rows of erased authors: those ``named`` by AuthorErased events
        and, for logs written before that event, the authors whose memories ``erased_ids`` are
        (an erasure's MemoryForgotten events name the author's current memories only: the scope's
        state no longer knows the superseded ones, but the tables and the in-memory copies keep
        them for as_of). Blocking; called before the erased rows themselves are deleted."""
        authors = set(named)
        tables = list(self._tenant_tables(tenant))
        if erased_ids:
            listed = ", ".join(quote(i) for i in sorted(erased_ids))
            for table in tables:
                found = table.search().where(f"memory_id IN ({listed})", prefilter=True).select(["author"]).limit(None)
                authors |= {row["author"] for row in found.to_list()}
        if not authors:
            return
        who = ", ".join(quote(a) for a in sorted(authors))
        for table in tables:
            table.delete(f"author IN ({who}) AND valid_to < 1e300")
        prefix = f"mem_{tenant.encode().hex()}_"
        with self._current_lock:
            for (name, _), scope in self._current.items():
                if name.startswith(prefix):
                    gone = [mid for mid, row in scope.past.items() if row["author"] in authors]
                    for memory_id in gone:
                        scope.drop(memory_id)
                    self._cached_rows -= len(gone)

    def _tenant_tables(self, tenant: str) -> Iterable[Any]:
        prefix = f"mem_{tenant.encode().hex()}_"
        for name in self._table_names():
            if name.startswith(prefix):
                table = self._tables.get(name) or self.db.open_table(name)
                self._tables[name] = table
                yield table

    def _scope(self, name: str, tenant: str, model_id: str, scope_id: str) -> LiveScope:
        key = (name, scope_id)
        with self._current_lock:
            scope = self._current.get(key)
            if scope is not None:
                self._current.move_to_end(key)
                return scope
        with self._write_lock:
            with self._current_lock:
                scope = self._current.get(key)
            if scope is not None:  # another thread read it meanwhile
                return scope
            table = self.table(tenant, model_id)
            loaded: dict[str, dict[str, Any]] = {}
            past: dict[str, dict[str, Any]] = {}
            if table is not None:
                found = table.search().where(f"scope_id = {quote(scope_id)}", prefilter=True).limit(None).to_arrow()
                for row in found.to_pylist():
                    row["vector"] = np.asarray(row["vector"], dtype=np.float32)
                    (loaded if math.isinf(row["valid_to"]) else past)[row["memory_id"]] = row
            scope = LiveScope(loaded, past)
            with self._current_lock:
                self._current[key] = scope
                self._cached_rows += len(scope)
                self._evict()
        return scope

    def _evict(self) -> None:
        """Drop the least recently used scopes beyond the row budget (a scope's next use reads
        it again). Called with the current-rows lock held."""
        while self._cached_rows > self._cache_rows and len(self._current) > 1:
            _, scope = self._current.popitem(last=False)
            self._cached_rows -= len(scope)

    def current(self, tenant: str, model_id: str, scope_id: str) -> ScopeRows:
        """A scope's memories, current and superseded (blocking on first use of a scope, when they are read from
        the table: call it from a worker thread)."""
        scope = self._scope(table_name(tenant, model_id), tenant, model_id, scope_id)
        with self._current_lock:
            return scope.snapshot()

    async def scopes(self, tenant: str, model_id: str, scope_ids: list[str]) -> list[ScopeRows]:
        """``current`` of each scope, reading those not in memory yet in a worker thread."""
        name = table_name(tenant, model_id)
        with self._current_lock:  # all in memory: answered here, nothing can block
            held = [self._current.get((name, sid)) for sid in scope_ids]
            if all(scope is not None for scope in held):  # (an empty scope is held too)
                for sid in scope_ids:
                    self._current.move_to_end((name, sid))
                return [scope.snapshot() for scope in held if scope is not None]
        return await anyio.to_thread.run_sync(
            lambda: [self.current(tenant, model_id, sid) for sid in scope_ids]
        )

    def keyword_search(self, scopes: Iterable[ScopeRows], query: str, limit: int, at: float | None = None) -> list[Row]:
        """The rows of the ``limit`` current memories of ``scopes`` best matching ``query`` by
        full-text BM25 (the scopes scored as one corpus), best first; with ``at``, of the
        memories valid at that instant, current or superseded (scored against the scopes' whole
        history, as LanceDB's index scores against its whole table). In memory, never blocking
        on I/O."""
        with self._current_lock:
            live = [snapshot.scope for snapshot in scopes]
            if at is None:
                found = search([scope.keywords for scope in live], query, limit)
                return [row for memory_id in found for scope in live if (row := scope.rows.get(memory_id))]
            valid: dict[str, Row] = {}

            def keep(memory_id: str) -> bool:
                for scope in live:
                    row = scope.rows.get(memory_id) or scope.past.get(memory_id)
                    if row is not None and row["valid_from"] <= at < row["valid_to"]:
                        valid[memory_id] = row
                        return True
                return False

            indexes = [ix for scope in live for ix in (scope.keywords, scope.past_keywords)]
            return [valid[memory_id] for memory_id in search(indexes, query, limit, keep)]

    async def apply(self, entries: list[tuple[int, str, Commit]]) -> None:
        fresh = [e for e in entries if e[0] > self.seq]
        if not fresh:
            return
        batch = await self._prepare(fresh)
        async with self._lock:
            await anyio.to_thread.run_sync(self._write, batch)
            self.seq = fresh[-1][0]
        self._waiters.wake(self.seq)

    async def wait_for(self, seq: int, timeout: float) -> bool:
        """True once the tables include sequence ``seq``; False after ``timeout``."""
        return await self._waiters.wait(seq, timeout, lambda: self.seq)

    # ------------------------------------------------------------------ running

    async def catch_up(self, chunk: int = 2_000) -> int:
        """Apply everything the log holds now, in batches of ``chunk`` commits."""
        while True:
            target = await self._journal.last_seq_of(self._filter)
            if target <= self.seq:
                return self.seq
            entries: list[tuple[int, str, Commit]] = []

            # entries bound now: collect is called only by the replay just below, never later
            def collect(
                seq: int, subject: str, commit: Commit, entries: list[tuple[int, str, Commit]] = entries
            ) -> None:
                entries.append((seq, subject, commit))

            await self._journal.replay(self._filter, self.seq, collect, min(target, self.seq + chunk * 50))
            for i in range(0, len(entries), chunk):
                await self.apply(entries[i : i + chunk])
            if not entries:
                return self.seq

    def _claim(self, stack: contextlib.ExitStack) -> None:
        """Hold the folder's writer lock while running: two writers of one folder would apply
        every event twice and share one checkpoint. When another client holds it, a private
        folder (rebuilt from the log, removed at exit) if ``private_if_busy``, else
        MemoryIndexBusyError."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = stack.enter_context(open(self.path / "writer.lock", "a+b"))  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if not self._private_if_busy:
                raise MemoryIndexBusyError(
                    f"the memory index in {self.path} is maintained by another client: give "
                    "this one its own memory_dir (any folder: the index is rebuilt from the log)",
                    path=str(self.path),
                ) from None
        shared = self.path
        self.path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blackbird-memory-")))
        self._checkpoint = self.path / "checkpoint.json"
        log.info("memory_index_private", shared=str(shared), path=str(self.path))

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        with contextlib.ExitStack() as stack:
            self._claim(stack)
            try:
                await self._run(task_status)
            finally:  # the lock (and a private folder) go, the tables' handles first
                self._tables.clear()
                self._db = None

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        self.seq = self._load_checkpoint()
        await self.catch_up()
        await self._save()
        self._exact = True  # the tables hold exactly the log up to self.seq from here on
        task_status.started()
        failures = 0
        try:
            while True:  # only cancellation ends it: a failure is logged and followed by a retry
                try:
                    if not self._exact:
                        await self.catch_up()  # upserts: safe over a batch written in part
                        await self._save()
                        self._exact = True
                    await self._follow()
                except Exception as exc:
                    # A batch may have been written in part: upsert until caught up again.
                    self._exact = False
                    delay = min(0.1 * (1 << min(failures, 8)), _RETRY_CAP)
                    failures += 1
                    log.warning("memory_index_interrupted", seq=self.seq, error=repr(exc), retry_in=delay)
                    await anyio.sleep(delay)
                else:
                    failures = 0
        finally:
            with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
                await self._save()

    async def _follow(self) -> None:
        """Apply the log as it comes, in batches, until a failure (raised)."""
        send, receive = anyio.create_memory_object_stream[tuple[int, str, Commit]](max_buffer_size=10_000)

        async def follow() -> None:
            async with send:
                async for entry in self._journal.follow(self._filter, self.seq):
                    await send.send((entry.seq, entry.subject, entry.commit))

        async with anyio.create_task_group() as tg:
            tg.start_soon(follow)
            async with receive:
                async for first in receive:
                    batch = [first]
                    while len(batch) < 1000:
                        try:
                            batch.append(receive.receive_nowait())
                        except anyio.WouldBlock:
                            break
                    await self.apply(batch)
                    await self._save()

    def _load_checkpoint(self) -> int:
        try:
            return int(json.loads(self._checkpoint.read_text())["seq"])
        except (OSError, ValueError, KeyError):
            return 0

    async def _save(self) -> None:
        tmp = self._checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seq": self.seq}))
        os.replace(tmp, self._checkpoint)

    async def rebuild(self, *, embedder: Any = None) -> int:
        """Drop this index's tables and fold the whole log again. With an ``embedder``, every
        text of another model is embedded again with it (from now on, live ones too)."""
        self._embedder = embedder
        async with self._lock:
            for name in self._table_names():
                if name.startswith("mem_"):
                    self.db.drop_table(name)
            self._tables.clear()
            with self._current_lock:
                self._current.clear()
                self._cached_rows = 0
            self.seq = 0
        await self.catch_up()
        await self._save()
        return self.seq

    async def erase_history(self) -> None:
        """Remove old table versions, so deleted rows are gone from disk too (erasure)."""

        def compact() -> None:
            self._drop_old_versions(
                self._tables.get(name) or self.db.open_table(name) for name in self._table_names()
            )

        async with self._lock:  # not while a batch is being written
            await anyio.to_thread.run_sync(compact)

    @staticmethod
    def _drop_old_versions(tables: Iterable[Any]) -> None:
        """Compact ``tables`` and delete every older version (blocking; under the index's lock)."""
        for table in tables:
            # Erasure needs every older version gone. LanceDB warns that a concurrent user
            # of an older version would fail: this index is the tables' only writer and
            # holds its lock, and a search in flight retries on the next version.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                table.optimize(cleanup_older_than=datetime.timedelta(0), delete_unverified=True)

    def rows(self, tenant: str) -> list[dict[str, Any]]:
        """Every row of a tenant's tables, sorted (to compare two indexes)."""
        out: list[dict[str, Any]] = []
        for table in self._tenant_tables(tenant):
            for row in table.to_arrow().to_pylist():
                row["vector"] = [round(float(x), 5) for x in row["vector"]]
                out.append(row)
        return sorted(out, key=lambda r: r["memory_id"])


def quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
