"""Benchmark: the knowledge graph on bb.memory vs. raw JetStream, an in-process BFS and LanceDB.

Run as ``python bench/graph.py [--quick] [--profile FILE] [--default-gc]``
(``--quick``: a 10,000-relation graph, under ~2 minutes on 2 cores; full: 100,000 relations).

It starts its own nats-server (``EmbeddedServer`` on a temporary data dir, default fsync mode),
connects ``AsyncBlackbird(**service_settings(server), tenant="bench", embedder=HashEmbedder(),
extractor=RuleExtractor())`` (every figure uses the deterministic 64-d ``tests.embedders.HashEmbedder``:
no model is loaded, so embedding costs ~20 us a name and the figures are the library's own cost)
and measures

1. ``memory.relate()`` writes/s and per-call p50/p99 with 1 and 32 concurrent callers into a
   fresh user scope (names drawn from a vocabulary of 500, so most mentions resolve to a known
   node and some create one; ``lives_in``/``works_at`` are functional, so some end an older fact),
   alternated with the raw baseline: nats-py ``js.publish`` of a payload the size of one stored
   Relate commit, awaiting each ack, with 1 and 32 concurrent publishers (``ratio_vs_raw``);
   ``--profile FILE`` writes cProfile stats of the first 1-caller relate() run to FILE (and of
   the hub depth-2 neighbors() calls to FILE.neighbors) and prints their top functions (those
   runs' figures are then distorted by the profiler);
2. a generated graph (quick: 10,000 relations over 2,000 entities; full: 100,000 over 15,000):
   persons, organizations, places and things; predicates knows, likes, works_at, lives_in,
   located_in, part_of; objects and subjects drawn with power-law (Zipf) weights, so hubs have
   thousands of edges and depth-2 neighbourhoods are large; functional predicates stated twice for
   a subject end the older fact (the contradictions are counted). It is bulk-loaded through the
   scope's actor: one ``Relate`` command a fact, names sealed and fingerprinted exactly as
   ``relate()`` seals them, 64 commands in flight, but without relate()'s per-call embedding,
   entity resolution and storage-quota append (relate() one by one would take many minutes at
   100k: see 1). The graph projection sees the same events relate() writes. Then relate()
   latency, one caller, into that loaded scope: a hub subject with a known object and with a new
   one (new nodes make relate() search the scope's names and vectors);
3. ``memory.neighbors`` p50/p99 at depth 1 (limit 100) and depth 2 (limit 1,000) from hubs and
   from random entities, with the neighbourhood sizes, against the floor: a BFS with the same
   limit over a plain in-process dict of the same edges (``ratio_vs_dict_bfs``), and the
   projection's own BFS (``projections.graph.neighbors``, no names opened) to show where the
   time goes; ``facts_about`` p50/p99 of the same entities;
4. recall over the graph user's memories (one memory per fact of the first ``memories``
   facts, each fact's source): ``recall(q, k=5)`` (graph links on, the default), with
   ``expand=1`` (when the installed library accepts it), with ``weights={"graph": 0}`` (no graph),
   and raw LanceDB: embedding the query + ``table.search(vec).where(scope).limit(5)`` on the
   same table, alternated;
5. extraction's time-until-queryable: "I live in <new city>" posted to a fresh session's chat by
   its user; ms until ``bb.learning.caught_up(seq)`` returns, and until
   ``facts_about(user, predicates=["lives_in"])`` shows the city (first read after caught_up;
   polled on the projection only if it does not yet).

A human-readable table goes to stdout; the very last line is one JSON object with every figure.
"""

from __future__ import annotations

import base64
import collections
import cProfile
import inspect
import io
import os
import pstats
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/graph.py``: the repo's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import msgspec
import nats
from nats.js.api import StorageType, StreamConfig

from actors.events import EntitySpec, Relate
from actors.graph import normalise
from actors.ports import AggregateKey
from bench.commands import (
    FSYNC,
    GC_MODE,
    alternate,
    commit_payload,
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
from blackbird.agents.learning import RuleExtractor
from blackbird.config import Settings
from blackbird.ids import new_id
from blackbird.memory.graph import SealedFact, SealedName
from blackbird.server.embedded import EmbeddedServer
from projections import graph as model
from projections.graph import When
from tests.embedders import HashEmbedder

TENANT = "bench"
TIER = "enterprise"
GRAPH_USER = "graph-owner"
EMBEDDER = "tests.embedders.HashEmbedder (deterministic, 64-d, no model)"
FUNCTIONAL = ("lives_in", "works_at", "located_in")
#: predicate -> (weight, subject type, object type)
PREDICATES: dict[str, tuple[float, str, str]] = {
    "knows": (0.35, "person", "person"),
    "likes": (0.20, "person", "thing"),
    "works_at": (0.12, "person", "organization"),
    "lives_in": (0.13, "person", "place"),
    "located_in": (0.08, "organization", "place"),
    "part_of": (0.12, "organization", "organization"),
}
TYPE_SHARE = {"person": 0.6, "organization": 0.15, "place": 0.1, "thing": 0.15}
SYLLABLES = ("ka", "lo", "mi", "ren", "to", "sa", "vel", "dor", "an", "is", "ul", "bre", "cor", "fen", "gar", "hal")
BULK_IN_FLIGHT = 64
K = 5


@dataclass(frozen=True)
class Config:
    quick: bool
    relations: int
    entities: int
    relate_calls: dict[int, int]  # concurrency -> calls a run
    repetitions: int
    samples: int  # neighbour / facts_about queries per kind
    memories: int  # memories (sources of the first facts) for recall
    recall_samples: int
    extractions: int
    big_relates: int  # relate() calls into the loaded graph's scope, per kind


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, relations=10_000, entities=2_000, relate_calls={1: 150, 32: 600}, repetitions=3,
                      samples=100, memories=500, recall_samples=40, extractions=5,
                      big_relates=30)
    return Config(quick=False, relations=100_000, entities=15_000, relate_calls={1: 500, 32: 3_000},
                  repetitions=5, samples=500, memories=5_000, recall_samples=200, extractions=20,
                  big_relates=100)


def ms_stats(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {"p50": round(1000 * percentile(s, 0.5), 3), "p99": round(1000 * percentile(s, 0.99), 3)}


def lat(values: list[float]) -> str:
    st = ms_stats(values)
    return f"p50 {st['p50']:.3f} ms p99 {st['p99']:.3f} ms"


# --------------------------------------------------------------------------- the generated graph


@dataclass
class GenGraph:
    names: list[str]
    types: list[str]
    facts: list[tuple[int, str, int]]  # subject index, predicate, object index
    by_type: dict[str, list[int]]


def zipf_cum(n: int, alpha: float) -> list[float]:
    out, total = [], 0.0
    for rank in range(n):
        total += 1.0 / (rank + 1) ** alpha
        out.append(total)
    return out


def generate(entities: int, relations: int, seed: int = 14) -> GenGraph:
    rng = random.Random(seed)
    names: list[str] = []
    types: list[str] = []
    by_type: dict[str, list[int]] = {t: [] for t in TYPE_SHARE}
    for t, share in TYPE_SHARE.items():
        for _ in range(max(2, round(entities * share))):
            i = len(names)
            word = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()
            names.append(f"{word} {t[:3]}{i}")
            types.append(t)
            by_type[t].append(i)
    cums = {t: (zipf_cum(len(ids), 0.8), zipf_cum(len(ids), 1.0)) for t, ids in by_type.items()}
    preds = list(PREDICATES)
    pred_cum: list[float] = []
    acc = 0.0
    for p in preds:
        acc += PREDICATES[p][0]
        pred_cum.append(acc)
    facts: list[tuple[int, str, int]] = []
    seen: set[tuple[int, str, int]] = set()
    while len(facts) < relations:
        (p,) = rng.choices(preds, cum_weights=pred_cum)
        _, st, ot = PREDICATES[p]
        (s,) = rng.choices(by_type[st], cum_weights=cums[st][0])
        (o,) = rng.choices(by_type[ot], cum_weights=cums[ot][1])
        if s == o or (s, p, o) in seen:
            continue
        seen.add((s, p, o))
        facts.append((s, p, o))
    return GenGraph(names, types, facts, by_type)


def contradictions(g: GenGraph) -> int:
    """Facts of a functional predicate a later one of the same subject ends."""
    count = collections.Counter((s, p) for s, p, _ in g.facts if p in FUNCTIONAL)
    return sum(n - 1 for n in count.values())


def dict_bfs(adj: dict[int, list[tuple[int, int]]], start: int, depth: int, limit: int) -> list[tuple[int, int, int]]:
    """The floor: breadth first over a plain dict of the same edges, same limit."""
    seen = {start}
    frontier = [start]
    out: list[tuple[int, int, int]] = []
    for hop in range(1, depth + 1):
        following: list[int] = []
        for node in frontier:
            for other, rid in adj.get(node, ()):
                if other in seen:
                    continue
                seen.add(other)
                following.append(other)
                out.append((other, hop, rid))
                if len(out) >= limit:
                    return out
        frontier = following
    return out


# --------------------------------------------------------------------------- bulk load


class Loader:
    """Relate commands straight to the scope's actor, sealed as relate() seals them."""

    def __init__(self, bb: AsyncBlackbird, session: Any, sid: str, g: GenGraph) -> None:
        self.bb, self.session, self.sid, self.g = bb, session, sid, g
        self.specs: dict[int, EntitySpec] = {}
        self.source: dict[int, str] = {}  # fact index -> memory id

    async def prepare(self) -> None:
        memory: Any = self.bb.memory
        keys, tenant, user = memory._keys, self.session.tenant, self.session.user_id
        vectors = HashEmbedder().embed(self.g.names)
        for i, name in enumerate(self.g.names):
            sealed = await keys.encrypt(tenant, user, msgspec.msgpack.encode(
                SealedName(name=name, vector=vectors[i].astype("<f4").tobytes())), aad=self.sid.encode())
            mac = await keys.mac(tenant, user, b"entity\x00" + self.sid.encode() + b"\x00" + normalise(name).encode())
            self.specs[i] = EntitySpec(entity_id=new_id(12), entity_type=self.g.types[i], name_mac=mac, sealed=sealed)

    async def command(self, i: int) -> Relate:
        memory: Any = self.bb.memory
        s, p, o = self.g.facts[i]
        evidence = f"{self.g.names[s]} {p.replace('_', ' ')} {self.g.names[o]}"
        fact = msgspec.msgpack.encode(SealedFact(evidence=evidence))
        sealed = await memory._keys.encrypt(self.session.tenant, self.session.user_id, fact, aad=self.sid.encode())
        return Relate(
            relation_id=new_id(12), author=self.session.user_id, model_id=memory.embedder.model_id,
            subject=self.specs[s], predicate=p, object=self.specs[o], valid_from=time.time(), valid_to=None,
            functional=p in FUNCTIONAL, sealed=sealed, source=self.source.get(i),
        )

    async def load(self, start: int, stop: int) -> float:
        memory: Any = self.bb.memory
        queue = iter(range(start, stop))
        t0 = time.perf_counter()

        async def worker() -> None:
            for i in queue:
                await memory._ask(self.session.tenant, self.sid, await self.command(i))

        async with anyio.create_task_group() as tg:
            for _ in range(BULK_IN_FLIGHT):
                tg.start_soon(worker)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------- phases


async def timed_calls(call: Callable[[int], Awaitable[Any]], n: int, concurrency: int) -> tuple[float, list[float]]:
    """``n`` calls by ``concurrency`` tasks; (calls/s, latencies)."""
    clock = time.perf_counter
    latencies: list[float] = []
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            t0 = clock()
            await call(i)
            latencies.append(clock() - t0)

    t0 = clock()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(worker)
    return n / (clock() - t0), latencies


async def raw_publish(nc: Any, payload: bytes, n: int, concurrency: int) -> tuple[float, list[float]]:
    """nats-py ``js.publish`` of ``payload`` awaiting each ack, ``concurrency`` publishers."""
    js = nc.jetstream(timeout=30)
    subject_of = [f"rawgraph.{i}" for i in range(concurrency)]

    async def call(i: int) -> None:
        await js.publish(subject_of[i % concurrency], payload)

    return await timed_calls(call, n, concurrency)


def profile_top(profiler: cProfile.Profile, lines: int = 14) -> str:
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("cumulative").print_stats(lines)
    return out.getvalue()


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "graph", "embedder": EMBEDDER}
    g = generate(cfg.entities, cfg.relations)
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            print(f"nats-server {server.url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; load average {load_start}; gc: {GC_MODE[0]}; embedder: {EMBEDDER}")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)
            settings = service_settings(server)
            auth = server.service_auth()
            async with AsyncBlackbird(**settings, tenant=TENANT, embedder=HashEmbedder(), extractor=RuleExtractor(),
                                      memory_dir=str(Path(tmp) / "memory"),
                                      functional_predicates=[*Settings().functional_predicates, "located_in"]) as bb:
                # ------------------------------------------------------------ 1. relate()
                relate_result = await relate_phase(bb, cfg, server, auth, profile_path)
                result["relate"] = relate_result

                # ------------------------------------------------------------ 2. the graph
                session = await bb.session_manager.create_session(GRAPH_USER, TIER)
                sid_graph = session.session_id
                memory: Any = bb.memory
                scope = await memory._scope("user", session, write=False)
                loader = Loader(bb, session, scope, g)
                t0 = time.perf_counter()
                await loader.prepare()
                prep_s = time.perf_counter() - t0
                # memories: one a fact of the first ``memories`` facts, each its fact's source
                texts = [f"{g.names[s]} {p.replace('_', ' ')} {g.names[o]}" for s, p, o in g.facts[: cfg.memories]]
                vecs = HashEmbedder().embed(texts)
                t0 = time.perf_counter()
                for start in range(0, len(texts), 64):
                    written = await bb.memory.remember_many(
                        texts[start:start + 64], session_id=sid_graph, vectors=vecs[start:start + 64].tolist(),
                        dedupe=False)
                    for j, m in enumerate(written):
                        loader.source[start + j] = m.memory_id
                mem_s = time.perf_counter() - t0
                load_s = await loader.load(0, len(g.facts))
                t0 = time.perf_counter()
                tg_graph = await memory._graph(TENANT)
                catch_s = time.perf_counter() - t0
                stored = sum(1 for r in tg_graph.relations.values() if r.scope_id == scope)
                open_now = sum(1 for r in tg_graph.relations.values()
                               if r.scope_id == scope and model.holds(r, When.of(time.time(), None, None)))
                nodes = sum(1 for e in tg_graph.entities.values() if e.scope_id == scope)
                degree: collections.Counter[int] = collections.Counter()
                for s, _, o in g.facts:
                    degree[s] += 1
                    degree[o] += 1
                top_deg = degree.most_common(1)[0][1]
                row("graph loaded (bulk, via the scope actor)", f"{len(g.facts) / load_s:,.0f} rel/s",
                    f"{len(g.facts):,} Relate commands in {load_s:.1f} s, {BULK_IN_FLIGHT} in flight "
                    f"(names sealed in {prep_s:.1f} s; {cfg.memories:,} memories in {mem_s:.1f} s); "
                    f"projection caught up {catch_s * 1000:.0f} ms after")
                row("graph shape", f"{nodes:,} nodes",
                    f"{stored:,} facts stored, {open_now:,} holding now, {contradictions(g):,} ended by a "
                    f"functional contradiction; max degree {top_deg:,}, median degree "
                    f"{median(list(degree.values())):.0f}")
                result["graph"] = {
                    "relations": len(g.facts), "stored": stored, "holding": open_now, "entities": nodes,
                    "contradictions": contradictions(g), "max_degree": top_deg,
                    "median_degree": median(list(degree.values())), "load_route": (
                        f"bulk Relate commands to the scope actor, {BULK_IN_FLIGHT} in flight, no per-call "
                        "embedding/resolution/quota"),
                    "bulk_relations_per_s": round(len(g.facts) / load_s, 1), "bulk_load_s": round(load_s, 2),
                }

                # relate() into the loaded scope: a known subject, a known or a new object
                big = await relate_big_scope(bb, g, sid_graph, cfg.big_relates)
                result["graph"]["relate_into_loaded_scope"] = big

                # ------------------------------------------------------------ 3. neighbors
                result["neighbors"] = await neighbors_phase(
                    bb, cfg, g, loader, tg_graph, scope, sid_graph, degree, profile_path)

                # ------------------------------------------------------------ 4. recall
                result["recall"] = await recall_phase(bb, cfg, g, sid_graph, scope, degree)

                # ------------------------------------------------------------ 5. extraction
                result["extraction"] = await extraction_phase(bb, cfg)

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    result["wall_s"] = round(total, 1)
    result.update(run_context(cfg.quick, load_start, load_end))
    return result


async def relate_big_scope(bb: AsyncBlackbird, g: GenGraph, sid: str, n: int) -> dict[str, Any]:
    """relate() latency, one caller, into the scope holding the generated graph: a hub subject
    with a known object (its name resolves exactly), and with a new object (a new node: the
    resolution searches the scope's names and vectors)."""
    rng = random.Random(11)
    persons, things = g.by_type["person"], g.by_type["thing"]
    out: dict[str, Any] = {}
    for kind in ("known", "new"):
        lats: list[float] = []
        for j in range(n):
            s = g.names[persons[j % 20]]
            o = g.names[rng.choice(things)] if kind == "known" else f"Novel thing {uuid.uuid4().hex[:8]}"
            t0 = time.perf_counter()
            await bb.memory.relate(s, "likes", o, session_id=sid, subject_type="person", object_type="thing")
            lats.append(time.perf_counter() - t0)
        row(f"relate() into the loaded scope, {kind} object", f"p50 {1000 * median(lats):.2f} ms",
            f"{lat(lats)}; {n} calls, 1 caller, {len(g.names):,}-node scope")
        out[kind] = ms_stats(lats)
    return out


async def relate_phase(
    bb: AsyncBlackbird, cfg: Config, server: Any, auth: dict[str, Any], profile_path: str | None,
) -> dict[str, Any]:
    vocab = generate(500, 1, seed=7)
    rng = random.Random(3)
    preds = list(PREDICATES)
    sessions = {c: (await bb.session_manager.create_session(f"relate-{c}-{uuid.uuid4().hex[:6]}", TIER)).session_id
                for c in cfg.relate_calls}

    def fact() -> tuple[str, str, str, str, str]:
        p = rng.choice(preds)
        _, st, ot = PREDICATES[p]
        s = rng.choice(vocab.by_type[st][:60])
        o = rng.choice(vocab.by_type[ot])
        while o == s:
            o = rng.choice(vocab.by_type[ot])
        return vocab.names[s], p, vocab.names[o], st, ot

    async def relate_into(sid: str, i: int) -> Any:
        s, p, o, st, ot = fact()
        return await bb.memory.relate(s, p, o, session_id=sid, subject_type=st, object_type=ot,
                                      evidence=f"{s} {p} {o}")

    warm = await relate_into(sessions[1], 0)
    # the raw payload: one stored Relate commit of that scope
    subject = bb.journal.subjects.aggregate(AggregateKey(TENANT, "memory", f"user:{warm.owner}"))
    payload, _ = await commit_payload(server.url, bb.settings.stream, subject, bb.settings.principal, auth=auth)
    nc = await nats.connect(server.url, name="bench-raw", **auth)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="RAWGRAPH", subjects=["rawgraph.>"], storage=StorageType.FILE))
    out: dict[str, Any] = {"payload_bytes": len(payload)}
    profiler = cProfile.Profile() if profile_path else None
    try:
        first = [True]

        async def level(conc: int, n: int) -> None:
            lats: dict[str, list[float]] = {"relate": [], "raw": []}
            sid = sessions[conc]

            async def ours() -> float:
                profiling = profiler is not None and conc == 1 and first[0]
                if profiler is not None and profiling:
                    profiler.enable()
                rate, ls = await timed_calls(lambda i: relate_into(sid, i), n, conc)
                if profiler is not None and profiling:
                    profiler.disable()
                    first[0] = False
                lats["relate"] += ls
                return rate

            async def raw() -> float:
                rate, ls = await raw_publish(nc, payload, max(n, 2_000), conc)
                lats["raw"] += ls
                return rate

            runs = await alternate({"relate": ours, "raw": raw}, cfg.repetitions)
            ratio = median(runs["relate"]) / median(runs["raw"])
            row(f"relate(), {conc} caller{'s' if conc > 1 else ''}", f"{median(runs['relate']):,.0f} rel/s",
                f"{spread(runs['relate'])}; {n} calls a run; {lat(lats['relate'])}")
            row(f"  raw js.publish + ack, {conc} publisher{'s' if conc > 1 else ''}",
                f"{median(runs['raw']):,.0f} msg/s",
                f"{len(payload)} B (a stored Relate commit); {spread(runs['raw'])}; {lat(lats['raw'])}; "
                f"relate/raw {ratio:.4f}")
            out[str(conc)] = {"per_s": round(median(runs["relate"]), 1), **ms_stats(lats["relate"]),
                              "raw_per_s": round(median(runs["raw"]), 1), "raw": ms_stats(lats["raw"]),
                              "ratio_vs_raw": round(ratio, 5), "runs": [round(x, 1) for x in runs["relate"]],
                              "raw_runs": [round(x, 1) for x in runs["raw"]]}

        for conc, n in cfg.relate_calls.items():
            await level(conc, n)
    finally:
        await nc.close()
    if profiler and profile_path:
        profiler.dump_stats(profile_path)
        print(profile_top(profiler))
    out["ratio_definition"] = ("median relate() calls/s / median raw js.publish (awaiting each ack) msgs/s of a "
                               "payload the size of a stored Relate commit, same concurrency, alternated")
    return out


async def neighbors_phase(
    bb: AsyncBlackbird, cfg: Config, g: GenGraph, loader: Loader, tg_graph: Any, scope: str, sid: str,
    degree: collections.Counter[int], profile_path: str | None = None,
) -> dict[str, Any]:
    rng = random.Random(5)
    # the dict of the same edges (holding now), by generated index
    id_of = {i: spec.entity_id for i, spec in loader.specs.items()}
    index_of = {v: k for k, v in id_of.items()}
    when = When.of(time.time(), None, None)
    adj: dict[int, list[tuple[int, int]]] = {}
    for rid, r in tg_graph.relations.items():
        if r.scope_id != scope or not model.holds(r, when):
            continue
        s, o = index_of.get(r.subject), index_of.get(r.object)
        if s is None or o is None:
            continue
        adj.setdefault(s, []).append((o, hash(rid)))
        adj.setdefault(o, []).append((s, hash(rid)))
    hubs = [i for i, _ in degree.most_common(20)]
    randoms = rng.sample(list(degree), min(cfg.samples, len(degree)))
    out: dict[str, Any] = {}
    for label, starts in (("hub", hubs), ("random", randoms)):
        picks = [starts[i % len(starts)] for i in range(cfg.samples)]
        for depth, limit in ((1, 100), (2, 1000)):
            sizes: list[int] = []
            ours: list[float] = []
            proj: list[float] = []
            floor: list[float] = []
            clock = time.perf_counter
            profiler = cProfile.Profile() if profile_path and label == "hub" and depth == 2 else None
            for i in picks:
                if profiler:
                    profiler.enable()
                t0 = clock()
                found = await bb.memory.neighbors(id_of[i], session_id=sid, depth=depth, limit=limit)
                ours.append(clock() - t0)
                if profiler:
                    profiler.disable()
                sizes.append(len(found))
                t0 = clock()
                model.neighbors(tg_graph, [id_of[i]], depth, {scope}, When.of(time.time(), None, None), None, limit)
                proj.append(clock() - t0)
                t0 = clock()
                dict_bfs(adj, i, depth, limit)
                floor.append(clock() - t0)
            if profiler and profile_path:
                profiler.dump_stats(f"{profile_path}.neighbors")
                print(profile_top(profiler, 18))
            ratio = median(floor) / median(ours)
            row(f"neighbors depth {depth} (limit {limit}), {label}", f"p50 {1000 * median(ours):.2f} ms",
                f"{lat(ours)}; sizes median {median([float(s) for s in sizes]):.0f} max {max(sizes)}; "
                f"{len(picks)} calls")
            row("  projection BFS (no names) / dict BFS", f"{1000 * median(proj):.3f} ms",
                f"projection {lat(proj)}; dict BFS {lat(floor)}; dict/ours p50 {ratio:.4f}")
            out[f"{label}_d{depth}"] = {
                **ms_stats(ours), "limit": limit, "size_p50": median([float(s) for s in sizes]),
                "size_max": max(sizes), "projection_bfs": ms_stats(proj), "dict_bfs": ms_stats(floor),
                "ratio_vs_dict_bfs": round(ratio, 5),
            }
        facts_lat: list[float] = []
        facts_n: list[int] = []
        for i in picks[: cfg.samples]:
            t0 = time.perf_counter()
            facts = await bb.memory.facts_about(id_of[i], session_id=sid)
            facts_lat.append(time.perf_counter() - t0)
            facts_n.append(len(facts))
        row(f"facts_about, {label}", f"p50 {1000 * median(facts_lat):.2f} ms",
            f"{lat(facts_lat)}; facts median {median([float(x) for x in facts_n]):.0f} max {max(facts_n)}")
        out[f"{label}_facts_about"] = {**ms_stats(facts_lat), "facts_p50": median([float(x) for x in facts_n]),
                                       "facts_max": max(facts_n)}
    out["ratio_definition"] = ("dict BFS p50 / neighbors() p50: a plain in-process dict of the same holding "
                               "edges, same depth and limit (1.0 = no overhead over the floor)")
    return out


async def recall_phase(
    bb: AsyncBlackbird, cfg: Config, g: GenGraph, sid: str, scope: str, degree: collections.Counter[int],
) -> dict[str, Any]:
    memory: Any = bb.memory
    has_expand = "expand" in inspect.signature(bb.memory.recall).parameters
    rng = random.Random(9)
    sources = {i for f in g.facts[: cfg.memories] for i in (f[0], f[2])}
    named = [i for i, _ in degree.most_common() if i in sources][:200]
    queries = [f"what about {g.names[rng.choice(named)]}" for _ in range(cfg.recall_samples)]
    embedder = HashEmbedder()
    tables: list[Any] = []
    where = f"scope_id = '{scope}'"
    facts_seen: list[int] = []

    def side(fn: Callable[[str], Awaitable[Any]], lats: list[float]) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            batch = []
            for q in queries:
                t0 = time.perf_counter()
                await fn(q)
                batch.append(time.perf_counter() - t0)
            lats.extend(batch)
            return 1000 * median(batch)
        return run

    async def plain(q: str) -> Any:
        return await bb.memory.recall(q, session_id=sid, k=K)

    async def no_graph(q: str) -> Any:
        return await bb.memory.recall(q, session_id=sid, k=K, weights={"graph": 0.0})

    async def expanded(q: str) -> Any:
        found = await memory.recall(q, session_id=sid, k=K, expand=1)
        facts_seen.append(sum(len(m.facts) for m in found))
        return found

    async def lance(q: str) -> Any:
        vec = embedder.embed([q])[0]
        table = tables[0]
        return await anyio.to_thread.run_sync(lambda: table.search(vec).where(where, prefilter=True).limit(K).to_list())

    lats: dict[str, list[float]] = {"recall": [], "no_graph": [], "expand": [], "lancedb": []}
    sides = {"recall": side(plain, lats["recall"]), "no_graph": side(no_graph, lats["no_graph"]),
             "lancedb": side(lance, lats["lancedb"])}
    if has_expand:
        sides["expand"] = side(expanded, lats["expand"])
    for q in queries[:3]:  # warm
        await plain(q)
    tables.append(memory.index.table(TENANT, embedder.model_id))  # made by the indexer on first write
    runs = await alternate(sides, cfg.repetitions)
    out: dict[str, Any] = {"expand_supported": has_expand, "k": K, "queries": len(queries),
                           "memories_in_scope": cfg.memories}
    base = median(runs["lancedb"])
    for name, label in (("recall", "recall (graph links on, default)"), ("expand", "recall expand=1"),
                        ("no_graph", "recall weights graph=0 (no graph)"),
                        ("lancedb", "raw LanceDB: embed + prefiltered search")):
        if name not in runs:
            row(label, "n/a", "recall() does not accept expand= in this checkout")
            continue
        extra = f"; facts attached per recall median {median([float(x) for x in facts_seen]):.0f}" \
            if name == "expand" and facts_seen else ""
        row(label, f"p50 {median(runs[name]):.2f} ms",
            f"{spread(runs[name], '.2f')} (run p50s); pooled {lat(lats[name])}; "
            f"lancedb/this {base / median(runs[name]):.3f}{extra}")
        out[name] = {**ms_stats(lats[name]), "run_p50s": [round(x, 3) for x in runs[name]],
                     "ratio_lancedb_over_this": round(base / median(runs[name]), 4)}
    if has_expand:
        out["expand_over_recall_p50"] = round(median(runs["expand"]) / median(runs["recall"]), 4)
        out["expand_facts_per_recall_p50"] = median([float(x) for x in facts_seen]) if facts_seen else 0
    out["recall_over_no_graph_p50"] = round(median(runs["recall"]) / median(runs["no_graph"]), 4)
    return out


async def extraction_phase(bb: AsyncBlackbird, cfg: Config) -> dict[str, Any]:
    caught: list[float] = []
    queryable: list[float] = []
    polls: list[int] = []
    missed = 0
    for i in range(cfg.extractions + 1):
        city = "Zor" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])
        user = f"learner-{i}-{uuid.uuid4().hex[:6]}"
        session = await bb.session_manager.create_session(user, TIER)
        clock = time.perf_counter
        t0 = clock()
        posted = await bb.session_manager.send_message(
            f"I live in {city}", session_id=session.session_id, channel="chat", author=user)
        await bb.learning.caught_up(posted["sequence"], 30.0)
        t_caught = clock() - t0
        n = 0
        ok = False
        deadline = t0 + 10.0
        while clock() < deadline:
            n += 1
            facts = await bb.memory.facts_about(user, session_id=session.session_id, predicates=["lives_in"])
            if any(city.lower() == f.object.lower() for f in facts):
                ok = True
                break
            await anyio.sleep(0.002)
        t_query = clock() - t0
        if i == 0:
            continue  # warm-up
        if not ok:
            missed += 1
            continue
        caught.append(t_caught)
        queryable.append(t_query)
        polls.append(n)
    if queryable:
        row("extraction: learner caught up", f"{1000 * median(caught):.1f} ms",
            f"median of {len(caught)}; max {1000 * max(caught):.1f} ms (posted 'I live in <city>')")
        row("extraction: relation queryable", f"{1000 * median(queryable):.1f} ms",
            f"median of {len(queryable)}; max {1000 * max(queryable):.1f} ms (posted -> facts_about(user, "
            f"lives_in) shows it); reads needed median {median([float(p) for p in polls]):.0f}; missed {missed}")
    else:
        row("extraction: relation queryable", "n/a", f"facts_about never showed the city ({missed} tries)")
    return {
        "samples": len(queryable), "missed": missed,
        "caught_up_ms": {"p50": round(1000 * median(caught), 1), "max": round(1000 * max(caught), 1)}
        if caught else None,
        "queryable_ms": {"p50": round(1000 * median(queryable), 1), "max": round(1000 * max(queryable), 1)}
        if queryable else None,
        "reads_needed_p50": median([float(p) for p in polls]) if polls else None,
        "embedder": EMBEDDER,
    }


if __name__ == "__main__":
    run_cli(__doc__ or "", "cProfile the 1-caller relate() run into FILE (and print its top)", make_config, main)
