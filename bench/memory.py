"""Benchmark: memory writes and recall through AsyncBlackbird vs. raw LanceDB and numpy.

Run as ``python bench/memory.py [--quick] [--profile FILE] [--default-gc]``.

It starts its own nats-server (``blackbird.server.embedded.EmbeddedServer`` on a temporary data dir,
default fsync mode: JetStream's ``sync_interval`` of 2 minutes), connects
``AsyncBlackbird(nats_url=..., tenant="bench", embedder=MiniLMEmbedder())`` (the real local
all-MiniLM-L6-v2 on its default engine, ONNX Runtime when installed; the header line says which
engine and how many threads; the LanceDB index in a temporary folder; connected as the data
folder's service identity, ``bench.commands.service_settings``) and measures

1. the embedder alone: sentences/s in batches of 256 and single-sentence latency, on the default
   engine and on ``MiniLMEmbedder(engine="numpy")`` in the same run; then writes/s of
   ``memory.remember_many`` in batches of 64 into one user scope, one call after the other:
   with embedding (the real model, default dedupe on), and with precomputed ``vectors=``
   (dedupe off, dedupe on). Every memory is a durable append (one Remember command each,
   sealed with the author's key; the scope's actor group-commits what queues up);
2. ``memory.remember(sentence)`` latency p50/p95 (embedding + storage-quota usage append +
   near-duplicate search + the durable append), one call after the other, into a user scope
   (of its own tenant) that already holds a few hundred indexed memories, so the duplicate
   search has work; the same with ``vector=`` given (no embedding); the durable path alone
   (``remember_many([text], vectors=, dedupe=False)``) and the index lag after such a write
   (until recall can find it). The same again at the end, into the recall tenant's table at
   its largest size;
3. recall p50/p99 (``memory.recall(query, session_id=..., k=10)``, default scopes session and
   user) with the tenant's table at 10k and 100k memories (``--quick``: 10k and 30k; 100k
   cannot be loaded within its minute). The memories are loaded through the actors:
   ``remember_many(texts, vectors=..., dedupe=False)`` in batches of 64, several user scopes
   at once, 1,000 memories per user, so the recalling user's scopes hold ~1,000 of the
   tenant's N rows; then the bench waits until ``bb.memory.index.seq`` reaches the last
   sequence written. Texts are generated sentences from a small vocabulary (subject, verb,
   object, time), so the keyword side has words to find; their vectors are composed from
   the real MiniLM embeddings of the four parts plus noise (embedding 100k sentences would
   take minutes here) — the output compares them with the sentences' own embeddings.
   A recall of the present runs no LanceDB query: it looks up the session, checks the
   scopes and runs the keyword side in memory (``MemoryIndex.scopes`` snapshot, BM25
   ``MemoryIndex.keyword_search``), then embeds the query in a worker thread
   (``loop.run_in_executor``), then one matrix product per scope for the vector side, then
   ranks. Recall keeps the last 64 query vectors,
   so every timed recall gets a text it has not seen (the whole call, embedding included);
   the same texts once more give the call without the embedding ("query vector cached"). The
   CPU split (this process vs nats-server) is printed beside. At the largest size: recall with 8
   concurrent callers (recalls/s, per-call p50/p99), ``recall(as_of=now)`` latency (also in
   memory: the scopes' current and superseded rows valid then, a masked matrix product and
   BM25; until 2026-11-26 LanceDB's prefiltered vector and full-text searches, still timed in
   4 as "as_of's ... search") and where the time of one recall
   goes, step by step, each step timed alone (session lookup, query embedding, scopes
   snapshot, keyword search, vector product, ranking, an empty worker-thread hop through the
   loop's executor), then the first stage as recall runs it (lookup + keyword side, then the
   embedding) and as it could (the embedding in a worker thread beside them): on 2 cores
   the two slow each other down;
4. raw LanceDB on the same data in the same run: ``table.search(vec).limit(10).to_list()`` on
   the live table (``bb.memory.index.table(tenant, model_id)``: flat, no filter), the same
   with recall's scope prefilter, on a compacted COPY of it, the two prefiltered searches
   ``recall(as_of=...)`` runs (vector and full-text, limit = recall's pool) on the live table
   and on the copy with an FTS index over every row and a BITMAP index on scope_id, an IVF_PQ
   index built on that copy (the live table is not modified), and numpy brute force over the
   whole table (``M @ q`` + argpartition); these are figures for LanceDB, not comparisons;
4b. like for like, at the largest size, alternated (recall, numpy, LanceDB, then LanceDB, numpy,
   recall, ...; ``pair_reps`` runs of ``pair_samples`` queries each, 3 x 40 with ``--quick``,
   5 x 100 without, the same queries on every side): recall of the present; (1) embedding the
   query with the same embedder + numpy ``M @ q`` + argpartition over the vectors of exactly
   the rows recall searches (the session's and the user's scopes, current rows: ~1,000), the
   least work a recall of the present must do; (2) embedding the query + LanceDB's search
   prefiltered to the same scopes and instant on the compacted copy (``optimize()``d, BITMAP
   on scope_id). Each figure is the median of the runs' p50s. ``ratio_vs_raw`` = numpy
   baseline p50 ÷ recall p50 (1.0: recall costs no more than the least work it must do; below
   1, its overhead); ``ratio_vs_lancedb_prefiltered`` the same with baseline (2). (Until
   2026-11-26 ``ratio_vs_raw`` divided an unfiltered flat scan of every row of the live,
   fragmented table by recall's p50: different work, not a comparison.);
5. recall@10 of the IVF_PQ search against exact brute force (numpy) over 100 random queries
   (held-out vectors from the same generator), target >= 0.95.

A human-readable table goes to stdout; the very last line is one JSON object. Timings are
wall-clock on a shared machine: other processes skew every figure (the load average is shown).
``--profile FILE`` runs cProfile over the recall loop at the largest size.
"""

from __future__ import annotations

import asyncio
import base64
import cProfile
import ctypes
import glob
import itertools
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/memory.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import lancedb
import numpy as np

from bench.commands import (
    FSYNC,
    GC_MODE,
    CpuMeter,
    alternate,
    create_sessions,
    load_average,
    median,
    percentile,
    row,
    run_cli,
    run_context,
    service_settings,
    spread,
)
from blackbird import AsyncBlackbird
from blackbird.embedding import MiniLMEmbedder
from blackbird.memory.index import quote
from blackbird.memory.service import DEFAULT_WEIGHTS, _Candidates, _rank
from blackbird.server.embedded import EmbeddedServer

TENANT = "bench"  # the recall data set
WRITE_TENANT = "benchw"  # the write phases (their own table, so the recall sizes stay exact)
REMEMBER_TENANT = "benchr"  # remember() latency: a table of a few hundred memories
TIER = "enterprise"  # storage quota 100 GB / 30 days, no retention: nothing expires meanwhile
BATCH = 64
EMBED_BATCH = 256
PER_USER = 1_000  # memories per user scope in the recall data set
K = 10
ANN_QUERIES = 100
CALLERS = 8  # concurrent recall callers

SUBJECTS = (
    "I", "my manager", "my sister", "the customer", "our team", "the new intern", "my doctor",
    "the landlord", "my best friend", "the project lead", "my daughter", "the support agent",
)
VERBS = (
    "prefers", "asked about", "complained about", "recommended", "is allergic to", "booked",
    "forgot about", "wants to learn", "reviewed", "cancelled", "bought", "needs help with",
    "is excited about", "moved",
)
OBJECTS = (
    "dark roast coffee", "green tea", "the quarterly report", "a flight to Lisbon",
    "peanut butter", "the Python migration", "a vegetarian menu", "the database backup",
    "jazz concerts", "the dentist appointment", "a standing desk", "the rust compiler",
    "hiking boots", "the hotel in Kyoto", "the invoice from March", "a birthday cake",
    "the onboarding checklist", "noise cancelling headphones", "the kubernetes cluster",
    "spanish lessons", "the pull request", "a used bicycle", "the insurance claim",
    "sourdough bread",
)
WHENS = (
    "this morning", "last week", "every Monday", "before the deadline", "during the meeting",
    "on weekends", "yesterday evening", "next month", "after lunch", "in the summer",
)
PARTS = (SUBJECTS, VERBS, OBJECTS, WHENS)
PART_WEIGHTS = np.array([0.6, 1.0, 1.4, 0.5], np.float32)  # the object matters most
NOISE = 0.35  # norm of the added gaussian noise relative to the composed vector's norm


@dataclass(frozen=True)
class Config:
    quick: bool
    sizes: tuple[int, ...]  # memories in the recall tenant's table
    embed_reps: int  # batches of EMBED_BATCH timed
    single_samples: int  # single-sentence embeddings timed
    write_embed: int  # memories written with embedding (batches of BATCH)
    write_plain: int  # ... with vectors=, dedupe off
    write_dedupe: int  # ... with vectors=, dedupe on
    warm_memories: int  # in the scope remember() writes into
    remember_samples: int
    remember_large_samples: int  # remember() into the recall tenant at the largest size
    recall_samples: int  # per size
    raw_samples: int
    breakdown_samples: int
    concurrent_per_caller: int  # recalls per caller, CALLERS callers at once
    load_concurrency: int  # user scopes loaded at once
    ivf_sub_vectors: int
    flat_check_queries: int  # queries comparing LanceDB's flat search with numpy (sanity)
    pair_reps: int  # like-for-like: repetitions, recall and its baselines alternated
    pair_samples: int  # ... queries per side per repetition (the same queries for every side)


def make_config(quick: bool) -> Config:
    if quick:
        return Config(
            quick=True, sizes=(10_000, 30_000), embed_reps=1, single_samples=20, write_embed=128,
            write_plain=1_024, write_dedupe=256, warm_memories=300, remember_samples=30,
            remember_large_samples=12,
            recall_samples=30, raw_samples=15, breakdown_samples=12, concurrent_per_caller=8,
            load_concurrency=8,
            ivf_sub_vectors=24, flat_check_queries=10, pair_reps=3, pair_samples=40,
        )
    return Config(
        quick=False, sizes=(10_000, 100_000), embed_reps=4, single_samples=100, write_embed=1_024,
        write_plain=4_096, write_dedupe=2_048, warm_memories=500, remember_samples=100,
        remember_large_samples=50,
        recall_samples=200, raw_samples=100, breakdown_samples=50, concurrent_per_caller=40,
        load_concurrency=8,
        ivf_sub_vectors=48, flat_check_queries=ANN_QUERIES, pair_reps=5, pair_samples=100,
    )


# --------------------------------------------------------------------------- helpers


class Corpus:
    """Generated sentences (subject verb object time) and vectors composed from the real
    embeddings of their four parts plus noise: clustered like sentence embeddings, cheap to
    make by the hundred thousand."""

    def __init__(self, embedder: Any, seed: int = 20_240_601) -> None:
        self._parts = [embedder.embed(list(p)) for p in PARTS]
        self._rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[list[str], np.ndarray]:
        rng = self._rng
        idx = np.stack([rng.integers(0, len(p), n) for p in PARTS], axis=1)
        vectors = sum(PART_WEIGHTS[j] * self._parts[j][idx[:, j]] for j in range(len(PARTS)))
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors + NOISE * norms * rng.standard_normal(vectors.shape).astype(np.float32) / math.sqrt(
            vectors.shape[1])
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        texts = [f"{SUBJECTS[a]} {VERBS[b]} {OBJECTS[c]} {WHENS[d]}" for a, b, c, d in idx]
        return texts, vectors.astype(np.float32)


class Blas:
    """numpy's OpenBLAS thread count (the BLAS behind recall's in-memory vector product and the
    numpy engine), if its library can be reached (scipy-openblas builds)."""

    def __init__(self) -> None:
        self._get = None
        libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libscipy_openblas*"))
        for path in libs:
            try:
                lib = ctypes.CDLL(path)
                for suffix in ("64_", ""):
                    getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                    if getter is not None:
                        self._get = getter
                        return
            except OSError:
                continue

    @property
    def threads(self) -> int | None:
        return int(self._get()) if self._get is not None else None


def engine_text(embedder: Any, blas: Blas) -> str:
    """Which engine runs ``embedder`` and on how many threads (ONNX Runtime's intra-op threads,
    or numpy's OpenBLAS threads)."""
    engine = getattr(embedder, "engine", "?")
    threads: int | None = None
    if engine == "onnxruntime":
        try:  # the session's own setting (MiniLMEmbedder(threads=...), default 2)
            threads = embedder._encoder._session.get_session_options().intra_op_num_threads
        except AttributeError:
            threads = None
    elif engine == "numpy":
        threads = blas.threads
    return f"{engine}, {threads or '?'} thread{'' if threads == 1 else 's'}"


def embed_timings(embedder: Any, texts: list[str], cfg: Config) -> tuple[list[float], list[float]]:
    """Seconds per batch of ``texts`` (cfg.embed_reps) and per single sentence (warmed first)."""
    embedder.embed(texts[:8])  # warm
    batches = timed_sync(lambda: embedder.embed(texts), cfg.embed_reps, warmup=0)
    return batches, timed_sync(lambda: embedder.embed([texts[7]]), cfg.single_samples)


def ms(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) * 1000


def lat_text(values: list[float], qs: tuple[float, ...] = (0.5, 0.99)) -> str:
    names = {0.5: "p50", 0.95: "p95", 0.99: "p99"}
    return "  ".join(f"{names[q]} {ms(values, q):.2f} ms" for q in qs)


async def timed(fn: Callable[[], Awaitable[Any]], n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        await fn()
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


def timed_sync(fn: Callable[[], Any], n: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out




async def writer_sessions(bb: AsyncBlackbird, tenant: str, users: list[str]) -> dict[str, str]:
    """One session per user in ``tenant`` (bench.commands.create_sessions uses the client's)."""
    sm = bb.session_manager
    for user in users:
        await sm.create_session(user, tier=TIER, tenant=tenant, session_id=f"s-{user}")
    return {user: f"s-{user}" for user in users}


async def write_batches(
    bb: AsyncBlackbird, tenant: str, sid: str, texts: list[str], vectors: np.ndarray | None,
    dedupe: bool,
) -> tuple[float, int, int]:
    """``remember_many`` in batches of BATCH, one call after the other: (seconds, last
    sequence, memories that updated a near-duplicate instead of being new)."""
    memory = bb.memory
    last = updated = 0
    t0 = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        written = await memory.remember_many(
            texts[i : i + BATCH], session_id=sid, tenant=tenant, dedupe=dedupe,
            vectors=None if vectors is None else cast(Any, vectors[i : i + BATCH]),
        )
        last = max(last, max(m.sequence for m in written))
        updated += sum(m.updated for m in written)
    return time.perf_counter() - t0, last, updated


async def bulk_load(
    bb: AsyncBlackbird, sids: list[str], texts: list[str], vectors: np.ndarray, concurrency: int,
) -> tuple[float, int]:
    """PER_USER memories per session's user scope, ``concurrency`` scopes at a time, each in
    batches of BATCH (one scope is written by one task: a scope's actor group-commits what
    queues up, and a commit must stay under the server's max_payload). (seconds, last seq)."""
    memory = bb.memory
    limiter = anyio.CapacityLimiter(concurrency)
    last = [0]

    async def user(j: int, sid: str) -> None:
        async with limiter:
            lo, hi = j * PER_USER, (j + 1) * PER_USER
            for i in range(lo, hi, BATCH):
                written = await memory.remember_many(
                    texts[i : min(hi, i + BATCH)], session_id=sid, tenant=TENANT,
                    vectors=cast(Any, vectors[i : min(hi, i + BATCH)]), dedupe=False,
                )
                last[0] = max(last[0], max(m.sequence for m in written))

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for j, sid in enumerate(sids):
            tg.start_soon(user, j, sid)
    return time.perf_counter() - t0, last[0]


async def wait_indexed(bb: AsyncBlackbird, seq: int, timeout: float = 600.0) -> float:
    t0 = time.perf_counter()
    if not await bb.memory.index.wait_for(seq, timeout):
        raise RuntimeError(f"memory index at {bb.memory.index.seq}, not {seq}, after {timeout}s")
    return time.perf_counter() - t0


def recall_where(sids: list[str]) -> str:
    """The LanceDB filter ``recall(as_of=now)`` built for ``sids`` until 2026-11-26 (recall
    queries no LanceDB table now): the LanceDB figures beside recall's."""
    at = time.time()
    return (f"scope_id IN ({', '.join(quote(s) for s in sorted(sids))}) "
            f"AND valid_from <= {at!r} AND valid_to > {at!r}")


def fragments(table: Any) -> str:
    try:
        stats = table.stats()
        return f"{stats['fragment_stats']['num_fragments']} fragments, {stats['num_indices']} indices"
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"stats unavailable ({type(exc).__name__})"


async def remember_phase(
    bb: AsyncBlackbird, corpus: Corpus, tenant: str, sid: str, samples: int,
) -> dict[str, Any]:
    """Sequential single writes into ``sid``'s user scope: ``remember(text)`` (embedding and
    duplicate search), ``remember(text, vector=)`` (no embedding), and ``remember_many([text],
    vectors=, dedupe=False)`` (the durable path alone) followed by waiting for the index to
    hold it (from then on recall finds it). Latencies in seconds, and the
    table's fragments before and after (every indexed write adds one until an optimize)."""
    memory = bb.memory
    table = memory.index.table(tenant, memory.embedder.model_id)
    out: dict[str, Any] = {"fragments_before": fragments(table)}
    texts, vecs = corpus.sample(3 * (samples + 2))
    it = iter(range(len(texts)))

    async def remember() -> None:
        await memory.remember(texts[next(it)], session_id=sid, tenant=tenant)

    async def vector() -> None:
        i = next(it)
        await memory.remember(texts[i], session_id=sid, tenant=tenant, vector=vecs[i])

    plain: list[float] = []
    lag: list[float] = []

    async def durable() -> None:
        i = next(it)
        t0 = time.perf_counter()
        written = await memory.remember_many([texts[i]], session_id=sid, tenant=tenant,
                                             vectors=cast(Any, vecs[i : i + 1]), dedupe=False)
        t1 = time.perf_counter()
        await wait_indexed(bb, written[0].sequence)
        lag.append(time.perf_counter() - t1)
        plain.append(t1 - t0)

    out["remember"] = await timed(remember, samples)
    out["vector"] = await timed(vector, samples)
    await timed(durable, samples)
    out["durable"], out["index_lag"] = plain, lag
    out["fragments_after"] = fragments(memory.index.table(tenant, memory.embedder.model_id))
    return out


def report_remember(res: dict[str, Any], scope_size: int) -> None:
    row("remember(), vector= given", f"p95 {ms(res['vector'], 0.95):.2f} ms",
        f"{lat_text(res['vector'], (0.5, 0.95, 0.99))}; the same without embedding")
    row("  remember_many([1], vectors=, dedupe off)", f"p50 {ms(res['durable'], 0.5):.2f} ms",
        f"{lat_text(res['durable'], (0.5, 0.95))}; session lookup + usage append + seal + "
        "memory append: no embedding, no search")
    row("  index lag after one write", f"p50 {ms(res['index_lag'], 0.5):.2f} ms",
        f"{lat_text(res['index_lag'], (0.5, 0.95))}; call returned -> index.seq covers it "
        "(merge_insert + checkpoint): from then on recall finds it; it runs in a thread beside "
        "the next write's embedding and search")
    row("  table fragments, before -> after", "", f"{res['fragments_before']} -> "
        f"{res['fragments_after']} (user scope ~{scope_size:,} memories)")


# --------------------------------------------------------------------------- main


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "memory"}
    blas = Blas()
    embedder = MiniLMEmbedder()
    model_id = embedder.model_id
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            url = server.url
            print(f"nats-server {url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; OpenBLAS threads {blas.threads or 'n/a'}; "
                  f"lancedb {lancedb.__version__}; embedder {model_id} (local, "
                  f"{engine_text(embedder, blas)}); "
                  f"load average {load_start} (other processes skew every figure); gc: "
                  + ("as `blackbird serve`" if GC_MODE[0] == "serve" else "CPython default"))
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)

            # ---------------------------------------------------------------- 1a. embedder
            corpus = Corpus(embedder)
            embed_texts, composed = corpus.sample(EMBED_BATCH)
            embedder.embed(embed_texts[:8])  # warm
            true_vecs: list[np.ndarray] = []
            batch_s = timed_sync(lambda: true_vecs.append(embedder.embed(embed_texts)), cfg.embed_reps, warmup=0)
            embed_per_s = EMBED_BATCH / statistics.median(batch_s)
            single = timed_sync(lambda: embedder.embed([embed_texts[7]]), cfg.single_samples)
            row(f"embed, batches of {EMBED_BATCH}", f"{embed_per_s:,.0f} sent/s",
                f"{engine_text(embedder, blas)}; median of {cfg.embed_reps}; generated sentences "
                "of ~7 words")
            row("embed, one sentence", f"{ms(single, 0.5):.2f} ms", lat_text(single, (0.5, 0.95)))
            # the same model on the numpy engine, for comparison (same vectors to float32 rounding)
            np_engine = MiniLMEmbedder(engine="numpy")
            np_desc = engine_text(np_engine, blas)
            np_batch, np_single = embed_timings(np_engine, embed_texts, cfg)
            del np_engine  # its weights are not needed any more
            embed_numpy = {"sentences_per_s": EMBED_BATCH / statistics.median(np_batch),
                           "single_p50_ms": ms(np_single, 0.5)}
            row("  same, numpy engine", f"{embed_numpy['sentences_per_s']:,.0f} sent/s",
                f"MiniLMEmbedder(engine=\"numpy\") ({np_desc}); one sentence "
                f"{lat_text(np_single, (0.5, 0.95))}")
            real = true_vecs[0]
            cos_true = float(np.mean(np.sum(real * composed, axis=1)))
            sim_true, sim_comp = real @ real.T, composed @ composed.T
            np.fill_diagonal(sim_true, -2)
            np.fill_diagonal(sim_comp, -2)
            agree = float(np.mean([
                len(set(np.argsort(-sim_true[i])[:K]) & set(np.argsort(-sim_comp[i])[:K])) / K
                for i in range(EMBED_BATCH)
            ]))
            row("composed vectors vs real embeddings", f"cos {cos_true:.2f}",
                f"{EMBED_BATCH} sentences: top-{K} neighbours shared {agree:.0%}; nearest-neighbour "
                f"cos {float(np.mean(sim_comp.max(1))):.2f} composed vs "
                f"{float(np.mean(sim_true.max(1))):.2f} real")

            async with AsyncBlackbird(**service_settings(server), tenant=TENANT, embedder=embedder) as bb:
                memory = bb.memory
                writers = ["w-embed", "w-plain", "w-dedupe", "w-single"]
                wsids = await writer_sessions(bb, WRITE_TENANT, writers)
                # starts the index projection (recall waits for it; remember with dedupe off not)
                await memory.recall("warm up", session_id=wsids["w-single"], tenant=WRITE_TENANT)

                # ------------------------------------------------------------ 1b. writes/s
                writes: dict[str, float] = {}
                texts, _ = corpus.sample(cfg.write_embed)
                secs, last, upd = await write_batches(bb, WRITE_TENANT, wsids["w-embed"], texts, None, True)
                writes["embed_dedupe"] = len(texts) / secs
                row(f"remember_many x{BATCH}, embedding", f"{writes['embed_dedupe']:,.0f} mem/s",
                    f"real MiniLM, dedupe on (default); {len(texts):,} memories, one scope, "
                    f"sequential calls; {upd} updated a near-duplicate")
                texts, vecs = corpus.sample(cfg.write_plain)
                meter = CpuMeter(server.pid)
                secs, last, _ = await write_batches(bb, WRITE_TENANT, wsids["w-plain"], texts, vecs, False)
                writes["vectors_no_dedupe"] = len(texts) / secs
                lag = await wait_indexed(bb, last)
                row(f"remember_many x{BATCH}, vectors=, dedupe off", f"{writes['vectors_no_dedupe']:,.0f} mem/s",
                    f"{len(texts):,} memories; index caught up {lag * 1000:.0f} ms after the last "
                    f"append; {meter.text()}")
                texts, vecs = corpus.sample(cfg.write_dedupe)
                secs, last, upd = await write_batches(bb, WRITE_TENANT, wsids["w-dedupe"], texts, vecs, True)
                writes["vectors_dedupe"] = len(texts) / secs
                row(f"remember_many x{BATCH}, vectors=, dedupe on", f"{writes['vectors_dedupe']:,.0f} mem/s",
                    f"{len(texts):,} memories (near-duplicate check: one in-memory matrix product "
                    f"per call over the scope's vectors); {upd} updated")

                # ------------------------------------------------------------ 2. remember()
                rsid = (await writer_sessions(bb, REMEMBER_TENANT, ["w-single"]))["w-single"]
                texts, vecs = corpus.sample(cfg.warm_memories)
                _, last, _ = await write_batches(bb, REMEMBER_TENANT, rsid, texts, vecs, False)
                await wait_indexed(bb, last)
                small = await remember_phase(bb, corpus, REMEMBER_TENANT, rsid, cfg.remember_samples)
                remember_lat, remember_vec_lat = small["remember"], small["vector"]
                remember_p95 = ms(remember_lat, 0.95)
                row("remember(), one sentence", f"p95 {remember_p95:.2f} ms",
                    f"{lat_text(remember_lat, (0.5, 0.95, 0.99))}; target p95 <= 25 ms; embedding + "
                    f"usage append + dedupe search + append; scope (and table) holds "
                    f"{cfg.warm_memories}+ memories")
                report_remember(small, cfg.warm_memories)

                # ------------------------------------------------------------ 3. recall
                recall_p50: dict[str, float] = {}
                recall_p99: dict[str, float] = {}
                loads: dict[str, float] = {}
                users_total = max(cfg.sizes) // PER_USER
                sids = await create_sessions(bb, users_total, "r", TIER)
                loaded = 0
                # recall keeps the last 64 query vectors (an agent's turn recalls one text from
                # several scopes): every timed recall gets a text it has not seen, or it would time
                # the search without the embedding (measured separately, "query vector cached")
                query_texts, _ = corpus.sample(cfg.recall_samples + cfg.breakdown_samples + 10)
                cached_p50: dict[str, float] = {}
                recall_cpu: dict[str, str] = {}
                profiled = False
                sid0 = sids[0]
                for size in cfg.sizes:
                    n_new = size - loaded
                    texts, vecs = corpus.sample(n_new)
                    first_user = loaded // PER_USER
                    meter = CpuMeter(server.pid)
                    secs, last = await bulk_load(
                        bb, sids[first_user : size // PER_USER], texts, vecs, cfg.load_concurrency
                    )
                    cpu = meter.text()
                    lag = await wait_indexed(bb, last)
                    loaded = size
                    loads[str(size)] = n_new / secs
                    table: Any = memory.index.table(TENANT, model_id)
                    assert table is not None
                    rows_now = table.count_rows()
                    row(f"load {n_new:,} memories through the actors", f"{n_new / secs:,.0f} mem/s",
                        f"remember_many x{BATCH}, vectors=, dedupe off, {cfg.load_concurrency} user "
                        f"scopes at once; {secs:.1f} s + index lag {lag:.1f} s; {cpu}")
                    row("  table now", f"{rows_now:,} rows", fragments(table))
                    size_texts, _ = corpus.sample(cfg.recall_samples + 3)
                    qi = iter(range(len(size_texts)))

                    async def recall_one(qi: Any = qi, texts: list[str] = size_texts) -> None:
                        await memory.recall(texts[next(qi)], session_id=sid0, k=K)

                    profiler = None
                    if profile_path is not None and size == max(cfg.sizes):
                        profiler = cProfile.Profile()
                        profiler.enable()
                    meter = CpuMeter(server.pid)
                    lat = await timed(recall_one, cfg.recall_samples, warmup=3)
                    recall_cpu[str(size)] = meter.text()
                    if profiler is not None and profile_path is not None:
                        profiler.disable()
                        profiler.dump_stats(profile_path)
                        profiled = True
                    recall_p50[str(size)] = ms(lat, 0.5)
                    recall_p99[str(size)] = ms(lat, 0.99)
                    row(f"recall k={K} @ {size:,} memories", f"p50 {recall_p50[str(size)]:.2f} ms",
                        f"{lat_text(lat)}; {len(lat)} queries, each text new (embedded in the call); "
                        f"user scopes ~{PER_USER:,} rows; {recall_cpu[str(size)]}"
                        f"{', under cProfile' if profiler else ''}")
                    # the same texts again: their vectors are cached, so this is the call without
                    # the query's embedding (session, scopes, keyword and vector sides, ranking)
                    # (each text recalled once untimed right before: only the last 64 are kept)
                    again: list[float] = []
                    for text in size_texts[: cfg.recall_samples]:
                        await memory.recall(text, session_id=sid0, k=K)
                        t0 = time.perf_counter()
                        await memory.recall(text, session_id=sid0, k=K)
                        again.append(time.perf_counter() - t0)
                    cached_p50[str(size)] = ms(again, 0.5)
                    row("  same texts again (query vector cached)", f"p50 {cached_p50[str(size)]:.2f} ms",
                        f"{lat_text(again)}; the whole call minus the query's embedding")

                # ---------------------------------------------- recall at the largest size, more
                top = max(cfg.sizes)
                session = await bb.session_manager.get_session(sid0)
                assert session is not None
                scope_ids = sorted([f"session:{sid0}", f"user:{session.user_id}"])  # as recall's
                matched = table.count_rows(f"scope_id IN ({', '.join(quote(s) for s in scope_ids)})")
                pool = max(K * 4, 20)  # recall's candidate pool (no filters)

                # CALLERS at once, each recalling back to back (different queries, same session)
                conc_texts, _ = corpus.sample(CALLERS * cfg.concurrent_per_caller)
                conc_lat: list[float] = []

                async def caller(first: int) -> None:
                    for i in range(first, len(conc_texts), CALLERS):
                        t0 = time.perf_counter()
                        await memory.recall(conc_texts[i], session_id=sid0, k=K)
                        conc_lat.append(time.perf_counter() - t0)

                meter = CpuMeter(server.pid)
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    for c in range(CALLERS):
                        tg.start_soon(caller, c)
                conc_s = time.perf_counter() - t0
                concurrent = {"callers": CALLERS, "per_s": len(conc_lat) / conc_s,
                              "p50_ms": ms(conc_lat, 0.5), "p99_ms": ms(conc_lat, 0.99)}
                row(f"recall, {CALLERS} concurrent callers @ {top:,}", f"{concurrent['per_s']:,.0f} recalls/s",
                    f"per call {lat_text(conc_lat)}; {len(conc_lat)} recalls in {conc_s:.2f} s, each "
                    f"caller back to back (one caller: {1000 / recall_p50[str(top)]:,.0f}/s at its p50); "
                    f"{meter.text()}")

                # recall(as_of=...): current and superseded rows valid then, in memory
                as_of_texts, _ = corpus.sample(cfg.recall_samples + 2)
                ai = iter(range(len(as_of_texts)))
                meter = CpuMeter(server.pid)
                as_of_lat = await timed(
                    lambda: memory.recall(as_of_texts[next(ai)], session_id=sid0, k=K, as_of=time.time()),
                    cfg.recall_samples)
                as_of_cpu = meter.text()
                row(f"recall k={K}, as_of=now @ {top:,}", f"p50 {ms(as_of_lat, 0.5):.2f} ms",
                    f"{lat_text(as_of_lat)}; {len(as_of_lat)} queries, each text new; the scopes' rows "
                    f"valid then (current and superseded), pool {pool}; {as_of_cpu}")

                # where the time of one recall goes, step by step, each step timed alone
                bq = query_texts[-cfg.breakdown_samples :]
                qvecs = embedder.embed(bq)
                index = memory.index
                n_steps = cfg.breakdown_samples
                texts_cycle, vecs_cycle = itertools.cycle(bq), itertools.cycle(qvecs)
                steps: dict[str, list[float]] = {}
                steps["session lookup (get_session)"] = await timed(
                    lambda: bb.session_manager.get_session(sid0), n_steps)
                steps["embed query (1 sentence)"] = timed_sync(
                    lambda: embedder.embed([next(texts_cycle)]), n_steps)
                loop = asyncio.get_running_loop()
                steps["worker-thread hop (empty run_in_executor)"] = await timed(
                    lambda: loop.run_in_executor(None, lambda: None), n_steps)
                snapshot: list[Any] = []

                async def scopes_step() -> None:
                    snapshot[:] = await index.scopes(TENANT, model_id, scope_ids)

                steps["scopes snapshot in memory (index.scopes)"] = await timed(scopes_step, n_steps)
                scope_rows = sum(len(s) for s in snapshot)
                steps[f"keyword search in memory (BM25), limit {pool}"] = timed_sync(
                    lambda: index.keyword_search(snapshot, next(texts_cycle), pool),
                    n_steps)
                # the vector side as recall runs it: _Candidates.by_vector, one matrix
                # product per scope + argpartition (its by_text loads the scopes' snapshot)
                present = _Candidates(index, TENANT, model_id, scope_ids, time.time(), past=False)
                rank_text = await present.by_text(bq[0], pool)
                steps[f"vector product in memory, top {pool}"] = await timed(
                    lambda: present.by_vector(next(vecs_cycle), pool), n_steps)
                rank_vector = await present.by_vector(qvecs[0], pool)
                steps["rank (fuse, score, build Memory)"] = timed_sync(
                    lambda: _rank(rank_vector, rank_text, qvecs[0], {}, DEFAULT_WEIGHTS, time.time(), K),
                    n_steps)
                breakdown = {name: ms(v, 0.5) for name, v in steps.items()}
                lookup, _, _, scopes, keyword, vector, rank = breakdown.values()
                before = lookup + scopes + keyword  # done before the query is embedded
                critical = sum(breakdown.values())
                row(f"recall breakdown @ {top:,} (medians)", f"{critical:.2f} ms",
                    f"lookup + scopes + keyword = {before:.2f} ms, then embed + hop, then vector + "
                    f"rank, one after the other as recall runs them, vs recall p50 "
                    f"{recall_p50[str(top)]:.2f} ms; each step timed alone; the scopes hold "
                    f"{scope_rows:,} of {rows_now:,} rows; no LanceDB query")
                for name, value in breakdown.items():
                    row(f"  {name}", f"{value:.2f} ms", "")

                # the first stage as recall runs it (the lookup and the keyword side, then the
                # query embedded in a worker thread) and with the embedding beside them, which
                # recall does not do: on 2 cores ONNX Runtime's two threads, the loop and
                # nats-server slow each other down
                async def first_stage(overlapped: bool) -> None:
                    query = next(texts_cycle)
                    vector = loop.run_in_executor(None, embedder.embed, [query]) if overlapped else None
                    await bb.session_manager.get_session(sid0)
                    scopes = await index.scopes(TENANT, model_id, scope_ids)
                    index.keyword_search(scopes, query, pool)
                    await (vector or loop.run_in_executor(None, embedder.embed, [query]))

                serial: list[float] = []
                overlapped: list[float] = []
                for _ in range(3):  # alternated
                    serial += await timed(lambda: first_stage(False), n_steps)
                    overlapped += await timed(lambda: first_stage(True), n_steps)
                first = {"serial": ms(serial, 0.5), "overlapped": ms(overlapped, 0.5)}
                row("  first stage, as recall runs it", f"{first['serial']:.2f} ms",
                    f"lookup + keyword, then embed (hop included); + vector + rank = "
                    f"{first['serial'] + vector + rank:.2f} ms vs recall p50 {recall_p50[str(top)]:.2f} ms")
                row("  first stage, embedding beside", f"{first['overlapped']:.2f} ms",
                    f"the embedding handed to a worker thread first, lookup + keyword meanwhile "
                    f"(not what recall does); alternated with the line above, 3 x {n_steps}")

                # ------------------------------------------------------------ 4. raw LanceDB
                _, probe = corpus.sample(max(cfg.raw_samples, ANN_QUERIES) + 2)
                pi = iter(range(len(probe) * 10))

                def flat(tbl: Any) -> Callable[[], Any]:
                    return lambda: tbl.search(probe[next(pi) % len(probe)]).limit(K).to_list()

                raw_live = timed_sync(flat(table), cfg.raw_samples)
                row(f"raw LanceDB flat search @ {top:,}, live table", f"p50 {ms(raw_live, 0.5):.2f} ms",
                    f"{lat_text(raw_live)}; table.search(vec).limit({K}).to_list(), no filter; "
                    f"{fragments(table)}")
                raw_pref = timed_sync(
                    lambda: table.search(probe[next(pi) % len(probe)]).metric("cosine").where(
                        recall_where(scope_ids), prefilter=True).limit(K).to_list(), cfg.raw_samples)
                row("  same, with recall's scope prefilter", f"p50 {ms(raw_pref, 0.5):.2f} ms",
                    f"{lat_text(raw_pref)}; {matched:,} rows match")

                def searcher(tbl: Any, kind: str) -> Callable[[], None]:
                    """The vector or the full-text search recall(as_of=...) ran on LanceDB until
                    2026-11-26 (now answered in memory), over the breakdown queries."""
                    n = [0]

                    def run() -> None:
                        i = n[0] % len(bq)
                        n[0] += 1
                        if kind == "vector":
                            tbl.search(qvecs[i]).metric("cosine").where(
                                recall_where(scope_ids), prefilter=True).limit(pool).to_list()
                        else:
                            words = " ".join(re.findall(r"\w+", bq[i]))
                            tbl.search(words, query_type="fts").where(
                                recall_where(scope_ids), prefilter=True).limit(pool).to_list()

                    return run

                live_indices = ", ".join(
                    sorted(f"{i.index_type} on {'/'.join(i.columns)}" for i in table.list_indices())
                )
                vec_live = timed_sync(searcher(table, "vector"), cfg.breakdown_samples)
                fts_live = timed_sync(searcher(table, "fts"), cfg.breakdown_samples)
                as_of_live = {"vector": ms(vec_live, 0.5), "fts": ms(fts_live, 0.5)}
                row("  as_of's vector search, live table", f"p50 {as_of_live['vector']:.2f} ms",
                    f"{lat_text(vec_live)}; LanceDB, cosine, prefiltered to the scopes at an instant, "
                    f"limit {pool}: what recall(as_of=...) ran until 2026-11-26 (now in memory)")
                row("  as_of's full-text search, live table", f"p50 {as_of_live['fts']:.2f} ms",
                    f"{lat_text(fts_live)}; LanceDB FTS, same prefilter, limit {pool}; the live "
                    f"table's indices: {live_indices or 'none'}")
                arrow = table.to_arrow()
                ids = np.asarray(arrow["memory_id"].to_pylist())
                matrix = np.ascontiguousarray(
                    arrow["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(len(ids), -1),
                    dtype=np.float32)
                copy_dir = Path(tmp) / "lancedb-copy"
                copy: Any = lancedb.connect(str(copy_dir)).create_table("copy", data=arrow)
                raw_copy = timed_sync(flat(copy), cfg.raw_samples)
                row("  same, on a compacted copy", f"p50 {ms(raw_copy, 0.5):.2f} ms",
                    f"{lat_text(raw_copy)}; {fragments(copy)}")

                # recall(as_of)'s two searches on the copy, compacted and fully indexed: FTS over
                # every row and a BITMAP index on scope_id (compare with the live table's)
                from lancedb.index import FTS, Bitmap

                t0 = time.perf_counter()
                copy.create_index("text", config=FTS(), replace=True)
                copy.create_index("scope_id", config=Bitmap(), replace=True)
                idx_s = time.perf_counter() - t0
                vec_idx = timed_sync(searcher(copy, "vector"), cfg.breakdown_samples)
                fts_idx = timed_sync(searcher(copy, "fts"), cfg.breakdown_samples)
                indexed = {"vector": ms(vec_idx, 0.5), "fts": ms(fts_idx, 0.5)}
                row("  as_of's vector search, indexed copy", f"p50 {indexed['vector']:.2f} ms",
                    f"{lat_text(vec_idx)}; live table: {as_of_live['vector']:.2f} ms (FTS + BITMAP "
                    f"built on the copy in {idx_s:.1f} s)")
                row("  as_of's full-text search, indexed copy", f"p50 {indexed['fts']:.2f} ms",
                    f"{lat_text(fts_idx)}; live table: {as_of_live['fts']:.2f} ms")

                # like-for-like: recall of the present next to the least work it must do, on the
                # same rows with the same queries, alternated (recall, numpy, LanceDB, then the
                # reverse, ...): (1) embed the query + numpy over the in-scope rows' vectors;
                # (2) embed the query + LanceDB prefiltered to the same scopes on the compacted,
                # BITMAP-indexed copy
                copy.optimize()
                now = time.time()
                in_scope = (np.isin(np.asarray(arrow["scope_id"].to_pylist()), scope_ids)
                            & (arrow["valid_from"].to_numpy() <= now) & (arrow["valid_to"].to_numpy() > now))
                scope_matrix = np.ascontiguousarray(matrix[in_scope])
                current = copy.count_rows(recall_where(scope_ids))
                assert current == scope_matrix.shape[0], (current, scope_matrix.shape)
                # new texts for every run (recall caches query vectors), the same on every side
                pair_sets = [corpus.sample(cfg.pair_samples)[0] for _ in range(cfg.pair_reps)]
                pair_runs: dict[str, int] = {}
                pooled: dict[str, list[float]] = {"recall": [], "numpy": [], "lancedb": []}

                async def recall_query(text: str) -> None:
                    await memory.recall(text, session_id=sid0, k=K)

                async def numpy_query(text: str) -> None:
                    q = embedder.embed([text])[0]
                    scores = scope_matrix @ q
                    best = np.argpartition(scores, -K)[-K:]
                    best[np.argsort(-scores[best])]

                async def lancedb_query(text: str) -> None:
                    q = embedder.embed([text])[0]
                    copy.search(q).metric("cosine").where(
                        recall_where(scope_ids), prefilter=True).limit(K).to_list()

                def side(name: str, query: Callable[[str], Awaitable[None]]) -> Callable[[], Awaitable[float]]:
                    async def run() -> float:
                        lat: list[float] = []
                        run_no = pair_runs[name] = pair_runs.get(name, -1) + 1
                        for text in pair_sets[run_no]:
                            t0 = time.perf_counter()
                            await query(text)
                            lat.append(time.perf_counter() - t0)
                        pooled[name].extend(lat)
                        return ms(lat, 0.5)
                    return run

                queries_by_side = {"recall": recall_query, "numpy": numpy_query, "lancedb": lancedb_query}
                for query in queries_by_side.values():  # warm each side once
                    await query(query_texts[-1])
                meter = CpuMeter(server.pid)
                pairs = await alternate({n: side(n, f) for n, f in queries_by_side.items()}, cfg.pair_reps)
                pairs_cpu = meter.text()
                like = {n: median(v) for n, v in pairs.items()}
                row(f"like-for-like @ {top:,}: recall", f"p50 {like['recall']:.2f} ms",
                    f"{spread(pairs['recall'], '.2f')} (p50 of each run); {cfg.pair_samples} queries per "
                    f"run, {cfg.pair_reps} runs alternated with the two below; pooled {lat_text(pooled['recall'])}")
                row("  numpy, same rows + query embedding", f"p50 {like['numpy']:.2f} ms",
                    f"{spread(pairs['numpy'], '.2f')}; embed the query, then matrix @ q + argpartition "
                    f"over the {scope_matrix.shape[0]:,} in-scope rows (the recalling session's and "
                    f"user's scopes, current rows); pooled {lat_text(pooled['numpy'])}")
                row("  LanceDB prefiltered + query embedding", f"p50 {like['lancedb']:.2f} ms",
                    f"{spread(pairs['lancedb'], '.2f')}; embed the query, then search on the compacted "
                    f"copy ({fragments(copy)}), cosine, prefilter = the same scopes, current rows "
                    f"({matched:,} rows in the scopes); pooled {lat_text(pooled['lancedb'])}")
                ratio = like["numpy"] / like["recall"]
                ratio_lancedb = like["lancedb"] / like["recall"]
                row(f"ratio numpy-same-rows p50 / recall p50 @ {top:,}", f"{ratio:.3f}",
                    f"medians of alternated runs; 1.0: recall costs no more than the least work it must "
                    f"do; LanceDB prefiltered p50 / recall p50: {ratio_lancedb:.3f}; {pairs_cpu} "
                    f"(the three sides together)")

                def brute() -> np.ndarray:
                    q = probe[next(pi) % len(probe)]
                    scores = matrix @ q
                    top_k = np.argpartition(scores, -K)[-K:]
                    return top_k[np.argsort(-scores[top_k])]

                numpy_lat = timed_sync(brute, cfg.raw_samples)
                row(f"numpy brute force @ {top:,}", f"p50 {ms(numpy_lat, 0.5):.2f} ms",
                    f"{lat_text(numpy_lat)}; matrix @ q + argpartition, {matrix.shape[0]:,}x{matrix.shape[1]}")

                from lancedb.index import IvfPq

                partitions = max(16, top // 800)
                t0 = time.perf_counter()
                copy.create_index("vector", config=IvfPq(
                    distance_type="cosine", num_partitions=partitions, num_sub_vectors=cfg.ivf_sub_vectors,
                    max_iterations=10, sample_rate=64))
                build_s = time.perf_counter() - t0
                nprobes, refine = 20, 10

                def ann(q: np.ndarray) -> list[dict[str, Any]]:
                    return (copy.search(q).metric("cosine").nprobes(nprobes).refine_factor(refine)
                            .limit(K).to_list())

                ann_lat = timed_sync(lambda: ann(probe[next(pi) % len(probe)]), cfg.raw_samples)
                ivf_desc = (f"IVF_PQ {partitions} partitions x {cfg.ivf_sub_vectors} sub-vectors, "
                            f"nprobes {nprobes}, refine x{refine}")
                row(f"LanceDB IVF_PQ search @ {top:,} (copy)", f"p50 {ms(ann_lat, 0.5):.2f} ms",
                    f"{lat_text(ann_lat)}; {ivf_desc}; built in {build_s:.1f} s")

                # ------------------------------------------------------------ 5. recall@10
                queries = probe[:ANN_QUERIES]
                hits = flat_hits = 0
                for n, q in enumerate(queries):
                    scores = matrix @ q
                    exact = set(ids[np.argpartition(scores, -K)[-K:]])
                    hits += len(exact & {r["memory_id"] for r in ann(q)})
                    if n < cfg.flat_check_queries:
                        flat_hits += len(exact & {r["memory_id"] for r in table.search(q).limit(K).to_list()})
                recall_at_10 = hits / (K * len(queries))
                row(f"recall@{K}, IVF_PQ vs numpy exact", f"{recall_at_10:.3f}",
                    f"{len(queries)} held-out queries; target >= 0.95 (flat LanceDB on the live table "
                    f"vs numpy, {cfg.flat_check_queries} queries: {flat_hits / (K * cfg.flat_check_queries):.3f})")
                # recall's own vector side is exact (a matrix product over the scopes' rows, no
                # ANN index): its top K against numpy exact over the same rows, on the composed
                # (clustered) vectors and on random unit vectors written into a fresh user scope
                scope_ids_arr = ids[in_scope]
                exact_path: dict[str, float] = {}

                async def exact_hits(sids_: list[str], rows_ids: np.ndarray, rows_m: np.ndarray,
                                     qs: np.ndarray) -> float:
                    cand = _Candidates(index, TENANT, model_id, sids_, time.time(), past=False)
                    await cand.by_text("warm", pool)  # loads the scopes' snapshot
                    got = 0
                    for q in qs:
                        exact = set(rows_ids[np.argpartition(rows_m @ q, -K)[-K:]])
                        got += len(exact & {r["memory_id"] for r in await cand.by_vector(q, K)})
                    return got / (K * len(qs))

                exact_path["composed"] = await exact_hits(scope_ids, scope_ids_arr, scope_matrix, queries)
                rng = np.random.default_rng(7)

                def unit(n: int) -> np.ndarray:
                    v = rng.standard_normal((n, matrix.shape[1])).astype(np.float32)
                    return cast(np.ndarray, v / np.linalg.norm(v, axis=1, keepdims=True))

                (rsid,) = await create_sessions(bb, 1, "rand", TIER)
                rand_vecs = unit(PER_USER)
                rand_texts, _ = corpus.sample(PER_USER)
                rand_ids: list[str] = []
                for i in range(0, PER_USER, BATCH):
                    written = await memory.remember_many(
                        rand_texts[i : i + BATCH], session_id=rsid, tenant=TENANT,
                        vectors=cast(Any, rand_vecs[i : i + BATCH]), dedupe=False)
                    rand_ids += [m.memory_id for m in written]
                await wait_indexed(bb, max(m.sequence for m in written))
                rsession = await bb.session_manager.get_session(rsid)
                assert rsession is not None
                exact_path["random"] = await exact_hits(
                    sorted([f"session:{rsid}", f"user:{rsession.user_id}"]), np.asarray(rand_ids), rand_vecs,
                    unit(ANN_QUERIES))
                row(f"recall@{K}, recall's vector side vs numpy exact", f"{min(exact_path.values()):.3f}",
                    f"composed {exact_path['composed']:.3f}, random unit vectors {exact_path['random']:.3f} "
                    f"({ANN_QUERIES} queries each; recall uses no ANN index: an exact product over the "
                    f"scopes' rows)")
                # IVF_PQ (LanceDB, not used by recall) on non-clustered data: random unit vectors
                rand_table: Any = lancedb.connect(str(Path(tmp) / "lancedb-random")).create_table(
                    "random", data=[{"id": i, "vector": v} for i, v in enumerate(unit(top))])
                rand_matrix = np.stack(rand_table.to_arrow()["vector"].to_numpy(zero_copy_only=False)).astype(
                    np.float32)
                t0 = time.perf_counter()
                rand_table.create_index("vector", config=IvfPq(
                    distance_type="cosine", num_partitions=partitions, num_sub_vectors=cfg.ivf_sub_vectors,
                    max_iterations=10, sample_rate=64))
                rand_build_s = time.perf_counter() - t0
                rand_hits = 0
                for q in unit(ANN_QUERIES):
                    exact = set(np.argpartition(rand_matrix @ q, -K)[-K:].tolist())
                    found_ids = {r["id"] for r in rand_table.search(q).metric("cosine").nprobes(nprobes)
                                 .refine_factor(refine).limit(K).to_list()}
                    rand_hits += len(exact & found_ids)
                ivf_random = rand_hits / (K * ANN_QUERIES)
                row(f"recall@{K}, IVF_PQ on random vectors", f"{ivf_random:.3f}",
                    f"{top:,} random unit vectors, {ivf_desc}, built in {rand_build_s:.1f} s; LanceDB's "
                    f"figure: recall does not use it")
                # remember() again, now into the recall tenant (its table at the largest size)
                large = await remember_phase(bb, corpus, TENANT, sid0, cfg.remember_large_samples)
                row(f"remember(), table of {rows_now:,} rows", f"p95 {ms(large['remember'], 0.95):.2f} ms",
                    f"{lat_text(large['remember'], (0.5, 0.95, 0.99))}; the user scope holds "
                    f"~{PER_USER:,}; the tenant's table {rows_now:,} rows")
                report_remember(large, PER_USER)
                raw_p50 = ms(raw_live, 0.5)

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    if profiled:
        print(f"cProfile of the recall loop @ {top:,} written to {profile_path}")
    result.update(
        recall_at_10=round(recall_at_10, 4),
        recall_at_10_definition="IVF_PQ (LanceDB, on the composed vectors; not used by recall) vs numpy exact",
        recall_at_10_recall_vector_side={k: round(v, 4) for k, v in exact_path.items()},
        recall_at_10_ivf_pq_random=round(ivf_random, 4),
        ratio_vs_raw=round(ratio, 4),
        ratio_definition=("p50 of (embed the query + numpy matrix @ q + argpartition over the same "
                          "in-scope rows recall searches) / recall p50, largest size; medians over "
                          "alternated runs (recall, numpy, LanceDB, then reversed), same queries"),
        ratio_vs_lancedb_prefiltered=round(ratio_lancedb, 4),
        like_for_like_p50_ms={n: round(v, 3) for n, v in like.items()},
        like_for_like_runs_p50_ms={n: [round(x, 3) for x in v] for n, v in pairs.items()},
        like_for_like_scope_rows=int(scope_matrix.shape[0]),
        remember_p95_ms=round(remember_p95, 3),
        remember_p50_ms=round(ms(remember_lat, 0.5), 3),
        remember_vector_p95_ms=round(ms(remember_vec_lat, 0.95), 3),
        remember_no_dedupe_p50_ms=round(ms(small["durable"], 0.5), 3),
        index_lag_one_write_p50_ms=round(ms(small["index_lag"], 0.5), 3),
        remember_large_table={"rows": rows_now, "p50_ms": round(ms(large["remember"], 0.5), 3),
                              "p95_ms": round(ms(large["remember"], 0.95), 3),
                              "index_lag_p50_ms": round(ms(large["index_lag"], 0.5), 3)},
        recall_indexed_searches_p50_ms={k: round(v, 3) for k, v in indexed.items()},
        as_of_searches_live_p50_ms={k: round(v, 3) for k, v in as_of_live.items()},
        recall_as_of_p50_ms=round(ms(as_of_lat, 0.5), 3),
        recall_as_of_p99_ms=round(ms(as_of_lat, 0.99), 3),
        recall_concurrent={k: v if k == "callers" else round(v, 3) for k, v in concurrent.items()},
        recall_p50_ms={k: round(v, 3) for k, v in recall_p50.items()},
        recall_p99_ms={k: round(v, 3) for k, v in recall_p99.items()},
        recall_cached_vector_p50_ms={k: round(v, 3) for k, v in cached_p50.items()},
        recall_cpu=recall_cpu,
        recall_as_of_cpu=as_of_cpu,
        like_for_like_cpu=pairs_cpu,
        recall_breakdown_ms={k: round(v, 3) for k, v in breakdown.items()},
        recall_breakdown_critical_path_ms=round(critical, 3),
        recall_first_stage_p50_ms={k: round(v, 3) for k, v in first.items()},
        writes_per_s={**{k: round(v, 1) for k, v in writes.items()},
                      **{f"bulk_load_{k}": round(v, 1) for k, v in loads.items()}},
        embed_sentences_per_s=round(embed_per_s, 1),
        embed_single_p50_ms=round(ms(single, 0.5), 3),
        embed_numpy_engine={k: round(v, 3) for k, v in embed_numpy.items()},
        raw_flat_p50_ms=round(raw_p50, 3),
        raw_flat_prefilter_p50_ms=round(ms(raw_pref, 0.5), 3),
        raw_flat_copy_p50_ms=round(ms(raw_copy, 0.5), 3),
        ivf_pq_p50_ms=round(ms(ann_lat, 0.5), 3),
        ivf_pq_build_s=round(build_s, 2),
        numpy_p50_ms=round(ms(numpy_lat, 0.5), 3),
        sizes=list(cfg.sizes),
        sizes_note=None if max(cfg.sizes) >= 100_000 else
        f"--quick: largest size {max(cfg.sizes):,}, 100k does not load within a minute (run without --quick)",
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


def cli() -> None:
    run_cli(__doc__, "cProfile the recall loop at the largest size into FILE", make_config, main)


if __name__ == "__main__":
    cli()
