"""Benchmark: rebuilding the activity read model from the log vs. a raw nats-py replay.

Run as ``python bench/projections.py [--quick] [--profile FILE] [--default-gc]``.

It starts its own nats-server (``blackbird.server.embedded.EmbeddedServer`` on a temporary data dir,
default fsync mode: JetStream's ``sync_interval`` of 2 minutes), connects one raw nats-py client
as the data folder's service identity (``nats.connect(url, **server.service_auth())``: the fill,
the raw baseline and the rebuild share it), opens the log with
``Journal.open(nc, build_settings(nats_url=url))`` (stream "BLACKBIRD") and

1. fills it without the actors: real ``actors.events.Commit`` envelopes, encoded exactly as the
   journal stores them (``msgspec.json``), for 1,000 sessions of 200 users in 10 tenants: a
   ``SessionCreated`` commit per session on ``bb.<tenant>.session.<sid>`` and a
   ``UserSessionOpened`` commit on the user's subject, then a mix (see ``MIX``) of usage,
   rate and quota decisions, touches and tier changes, some commits carrying several commands
   as an actor's group commit does. Every message carries the two headers the journal's
   appends carry (``Nats-Msg-Id``, ``Nats-Expected-Last-Subject-Sequence``), published with
   ``js.publish_async`` in pipelined batches of 1,000. 100,000 commits with ``--quick``,
   300,000 without; the fill rate is reported;
2. a raw baseline on the same stream: a nats-py ordered consumer over ``bb.>`` with the
   subscribe options ``Journal._subscribe_ordered`` uses, that (a) only counts the messages,
   (b) also reads each message's JetStream metadata (its stream sequence), (c) also decodes
   each payload as a ``Commit``; messages/s, subscribe to unsubscribe;
3. ``ProjectionRunner(ActivityProjection(), journal, MemoryCheckpoints(), "bb.>").rebuild()``
   over the whole stream: commits/s and events/s (a rebuild folds the log and stores one
   checkpoint; the in-memory store's share, i.e. encoding the model, is shown apart);
4. the checkpoint in NATS (``NatsCheckpoints``: KV pointer + object store): its size, save
   and restore times; and a restart: the generator's next commits are appended (so that the
   checkpoint now covers 90% of the stream), then restore + catch up the last 10%.

Steps 2 and 3 run ``repetitions`` times (3 with ``--quick``, 5 without), alternated: raw
(its four variants), rebuild, then rebuild, raw, and so on (``bench.commands.alternate``), so
neither side always runs first on colder caches; every figure reported is the median over
the repetitions (the ratio is the ratio of the medians), as are the
checkpoint and restart times. ``ratio_vs_raw`` = rebuild commits/s ÷ raw ordered-consumer
msgs/s of variant (a), the one that does nothing per message; target >= 0.5.

The garbage collector is tuned as ``blackbird serve`` tunes its own (``--default-gc`` keeps
CPython's thresholds), for the raw baseline and the rebuild alike.

A human-readable table goes to stdout; the very last line is one JSON object.
``--profile FILE`` runs cProfile over one extra rebuild and writes its stats to FILE.
"""

from __future__ import annotations

import cProfile
import gc
import os
import random
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")

if __package__ in (None, ""):  # run as ``python bench/projections.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import msgspec
import nats
import nats.aio.client
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from actors.events import (
    Applied,
    Commit,
    QuotaDenied,
    RateAllowed,
    RateDenied,
    Rejection,
    SessionCreated,
    SessionTouched,
    TierChanged,
    UsageTracked,
    UserSessionOpened,
)
from bench.commands import (
    FSYNC,
    GC_MODE,
    CpuMeter,
    alternate,
    load_average,
    median,
    row,
    run_cli,
    run_context,
    spread,
)
from blackbird._projections import MemoryCheckpoints, NatsCheckpoints
from blackbird.config import build_settings
from blackbird.journal import Journal
from blackbird.server.embedded import EmbeddedServer
from projections.activity import ActivityProjection
from projections.runner import ProjectionRunner

TENANTS = 10
USERS = 200  # 20 per tenant
SESSIONS = 1_000  # 100 per tenant
FILL_BATCH = 1_000
PRINCIPAL = "sdk"
T0 = 1_700_000_000.0
STEP = 0.004  # simulated seconds between two commits
DAY = 86_400.0
TIERS = ("free", "basic", "pro", "enterprise")
TIER_TIMEOUTS = {"free": (900.0, 86_400.0), "basic": (1_800.0, 86_400.0),
                 "pro": (3_600.0, 604_800.0), "enterprise": (7_200.0, 2_592_000.0)}
OPERATIONS = ("chat.completion", "embedding", "tool_call", "search")
MODELS = ("gpt-4o-mini", "claude-3-haiku", "llama-3-8b", "bge-small")
WINDOWS = ("per_second", "per_minute", "per_hour", "per_day")
# share of the steady-state commits of each kind (after the creations)
MIX = (
    ("usage", 0.55),  # one TrackUsage: UsageTracked
    ("admit", 0.12),  # one Admit: RateAllowed + UsageTracked(tokens) + UsageTracked(api_calls)
    ("rate", 0.12),  # one CheckRate: RateAllowed
    ("rate_denied", 0.05),  # RateDenied with its rejection
    ("quota_denied", 0.03),  # QuotaDenied with its rejection
    ("touch", 0.08),  # SessionTouched
    ("batch", 0.045),  # group commit: 2-4 commands (usage or rate) in one commit
    ("tier", 0.005),  # TierChanged
)


@dataclass(frozen=True)
class Config:
    quick: bool
    commits: int  # at least; the creations are part of it
    repetitions: int
    restart_share: float = 0.10  # the part of the stream a restart catches up


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, commits=100_000, repetitions=3)
    return Config(quick=False, commits=300_000, repetitions=5)


# --------------------------------------------------------------------------- 1. the log


@dataclass
class Fill:
    subjects: list[str]
    payloads: list[bytes]
    headers: list[dict[str, str]]
    kinds: list[str]  # the kind of each commit (see ``MIX``)
    events: list[int]  # events in commits [0, i] (cumulative)
    session_events: list[int]  # the same, on session subjects only (what the fold counts)

    def kind_counts(self, n: int) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind in self.kinds[:n]:
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def generate(commits: int, seed: int = 20_240_601) -> Fill:
    """Commits for ``SESSIONS`` sessions, encoded as the journal stores them, in log order,
    with the headers the journal's appends carry (expected sequences computed from the order:
    one connection, published in order, so message i gets stream sequence i + 1)."""
    rnd = random.Random(seed)
    encode = msgspec.json.Encoder().encode
    subjects: list[str] = []
    payloads: list[bytes] = []
    headers: list[dict[str, str]] = []
    versions: dict[str, int] = {}
    last_seq: dict[str, int] = {}
    kinds: list[str] = []
    events: list[int] = []
    session_events: list[int] = []

    def command_id() -> str:
        return rnd.getrandbits(128).to_bytes(16, "big").hex()

    def append(subject: str, at: float, applied: tuple[Applied, ...], kind: str) -> None:
        version = versions.get(subject, 0) + 1
        versions[subject] = version
        commit = Commit(at=at, version=version, commands=applied)
        n_events = sum(len(a.events) for a in applied)
        events.append((events[-1] if events else 0) + n_events)
        session_events.append((session_events[-1] if session_events else 0)
                              + (n_events if ".session." in subject else 0))
        kinds.append(kind)
        msg_id = applied[0].command_id if len(applied) == 1 else command_id()
        headers.append({
            "Nats-Expected-Last-Subject-Sequence": str(last_seq.get(subject, 0)),
            "Nats-Msg-Id": msg_id,
        })
        subjects.append(subject)
        payloads.append(encode(commit))
        last_seq[subject] = len(subjects)  # this message's stream sequence

    tenants = [f"tenant{j:02d}" for j in range(TENANTS)]
    users = [(tenants[k % TENANTS], f"user-{k:03d}") for k in range(USERS)]
    sessions: list[tuple[str, str, str, str]] = []  # tenant, user, sid, tier
    for i in range(SESSIONS):
        tenant, user = users[i % USERS]
        sessions.append((tenant, user, f"s{i:04d}-{rnd.getrandbits(48):012x}", rnd.choice(TIERS)))
    tier_of = {sid: tier for _, _, sid, tier in sessions}

    now = T0
    for tenant, user, sid, tier in sessions:
        now += STEP
        idle, max_age = TIER_TIMEOUTS[tier]
        created = SessionCreated(
            at=now, session_id=sid, user_id=user, tier=tier,
            metadata={"client": rnd.choice(("web", "ios", "android", "cli")), "region": "eu-west-1"},
            idle_timeout=idle, max_age=max_age, policy_version=1,
        )
        opened = UserSessionOpened(at=now, session_id=sid, tier=tier, policy_version=1)
        append(f"bb.{tenant}.user.{user}", now,
               (Applied(command_id(), PRINCIPAL, (opened,)),), "user_opened")
        append(f"bb.{tenant}.session.{sid}", now,
               (Applied(command_id(), PRINCIPAL, (created,)),), "created")

    def usage(at: float, resource: str = "tokens") -> UsageTracked:
        amount = float(rnd.randint(20, 4_000)) if resource == "tokens" else 1.0
        return UsageTracked(
            at=at, operation=rnd.choice(OPERATIONS), resource_type=resource, amount=amount,
            metadata={"model": rnd.choice(MODELS), "request_id": f"req_{rnd.getrandbits(48):012x}"},
            window_start=at - at % DAY, policy_version=1,
        )

    def allowed(at: float) -> RateAllowed:
        return RateAllowed(at=at, operation=rnd.choice(OPERATIONS), windows=WINDOWS, policy_version=1)

    # a few busy sessions, many quiet ones (weights ~ 1 / rank)
    weights = [1.0 / (r + 20) for r in range(SESSIONS)]
    kinds_list = [k for k, _ in MIX]
    shares = [s for _, s in MIX]
    remaining = commits - len(subjects)
    picks = rnd.choices(range(SESSIONS), weights=weights, k=remaining)
    kinds_picked = rnd.choices(kinds_list, weights=shares, k=remaining)
    for idx, kind in zip(picks, kinds_picked, strict=True):
        tenant, user, sid, _ = sessions[idx]
        now += STEP
        subject = f"bb.{tenant}.session.{sid}"
        if kind == "usage":
            applied: tuple[Applied, ...] = (Applied(command_id(), PRINCIPAL, (usage(now),)),)
        elif kind == "admit":
            applied = (Applied(command_id(), PRINCIPAL,
                               (allowed(now), usage(now), usage(now, "api_calls"))),)
        elif kind == "rate":
            applied = (Applied(command_id(), PRINCIPAL, (allowed(now),)),)
        elif kind == "rate_denied":
            wait = round(rnd.uniform(0.01, 0.99), 3)
            op = rnd.choice(OPERATIONS)
            applied = (Applied(command_id(), PRINCIPAL, (
                RateDenied(at=now, operation=op, limit_type="per_second", limit=10,
                           retry_after=wait, policy_version=1),
            ), Rejection("rate_limited",
                         f"rate limit for {op!r} reached: 10 per_second; retry after {wait:.3f}s",
                         {"retry_after": wait, "limit_type": "per_second", "limit": 10,
                          "operation": op})),)
        elif kind == "quota_denied":
            op = rnd.choice(OPERATIONS)
            resets = now - now % DAY + DAY
            applied = (Applied(command_id(), PRINCIPAL, (
                QuotaDenied(at=now, operation=op, resource_type="tokens", amount=2_000.0,
                            used=99_500.0, limit=100_000.0, resets_at=resets, policy_version=1),
            ), Rejection("quota_exceeded",
                         f"tokens quota exceeded: 99500 used + 2000 requested > limit 100000; "
                         f"resets at {resets:.0f}",
                         {"used": 99_500.0, "limit": 100_000.0, "quota_type": "tokens",
                          "resets_at": resets, "requested": 2_000.0, "operation": op})),)
        elif kind == "touch":
            applied = (Applied(command_id(), PRINCIPAL,
                               (SessionTouched(at=now, operation="activity"),)),)
        elif kind == "batch":
            applied = tuple(
                Applied(command_id(), PRINCIPAL,
                        (usage(now) if rnd.random() < 0.7 else allowed(now),))
                for _ in range(rnd.randint(2, 4))
            )
        else:  # tier
            old = tier_of[sid]
            new = rnd.choice([t for t in TIERS if t != old])
            tier_of[sid] = new
            idle, max_age = TIER_TIMEOUTS[new]
            applied = (Applied(command_id(), PRINCIPAL, (
                TierChanged(at=now, old_tier=old, new_tier=new, idle_timeout=idle,
                            max_age=max_age, policy_version=1),
            )),)
        append(subject, now, applied, kind)
    return Fill(subjects, payloads, headers, kinds, events, session_events)


async def publish(js: Any, fill: Fill, begin: int, end: int) -> float:
    """Commits ``begin`` .. ``end - 1`` (the stream holds the ones before): pipelined
    ``js.publish_async`` in batches of ``FILL_BATCH``; returns the seconds taken."""
    start = time.perf_counter()
    for first in range(begin, end, FILL_BATCH):
        futures = [
            await js.publish_async(fill.subjects[i], fill.payloads[i], headers=fill.headers[i])
            for i in range(first, min(end, first + FILL_BATCH))
        ]
        # nats-py never completes the future of an API-error ack: fail instead of hanging
        with anyio.fail_after(30):
            for i, fut in enumerate(futures, start=first):
                ack = await fut
                if ack.seq != i + 1 or ack.duplicate:
                    raise RuntimeError(f"message {i} stored as {ack.seq} (duplicate={ack.duplicate})")
    return time.perf_counter() - start


# --------------------------------------------------------------------------- 2. raw replay


async def raw_replay(js: Any, stream: str, last_seq: int, mode: str) -> float:
    """Seconds for a nats-py ordered consumer to deliver sequences 1..``last_seq`` of ``bb.>``
    (subscribe to unsubscribe), with the subscribe options ``Journal._subscribe_ordered`` uses.
    ``mode``: "count" (nothing per message), "meta" (+ the stream sequence from the
    metadata), "decode" (+ ``msgspec.json`` decode of the payload as a Commit); "nofilter" is
    "count" with the consumer's filter ``>`` instead of ``bb.>`` (the same messages: the
    stream holds only ``bb.`` subjects), to show what the server's filtered read costs."""
    done = anyio.Event()
    count = 0
    decode = msgspec.json.Decoder(Commit).decode
    seen: list[Commit] = []

    if mode in ("count", "nofilter"):
        async def deliver(msg: Msg) -> None:
            nonlocal count
            count += 1
            if count >= last_seq:
                done.set()
    elif mode == "meta":
        async def deliver(msg: Msg) -> None:
            if msg.metadata.sequence.stream >= last_seq:
                done.set()
    else:
        async def deliver(msg: Msg) -> None:
            commit = decode(msg.data)
            if msg.metadata.sequence.stream >= last_seq:
                seen.append(commit)
                done.set()

    start = time.perf_counter()
    sub = await js.subscribe(
        ">" if mode == "nofilter" else "bb.>", stream=stream, cb=deliver, ordered_consumer=True,
        config=ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1),
        pending_msgs_limit=-1, pending_bytes_limit=-1,
    )
    try:
        with anyio.fail_after(120):
            await done.wait()
    finally:
        await sub.unsubscribe()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- 3. rebuild


def check_model(model: Any, fill: Fill, seq: int) -> str:
    """Sanity check of a rebuilt model against what was written; a short description."""
    tenants = model.tenants
    sessions = sum(len(t.sessions) for t in tenants.values())
    users = sum(len(t.users) for t in tenants.values())
    counted = sum(t.counters.events for t in tenants.values())
    history = sum(len(u.history) for t in tenants.values() for u in t.users.values())
    wrote = fill.session_events[seq - 1]
    if (sessions, users, counted) != (SESSIONS, USERS, wrote):
        raise AssertionError(
            f"rebuilt model: {sessions} sessions, {users} users, {counted} session events; "
            f"wrote {SESSIONS}, {USERS}, {wrote}"
        )
    return (
        f"{len(tenants)} tenants, {users} users, {sessions} sessions, {counted:,} events counted, "
        f"{history:,} usage rows"
    )


async def timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = await fn()
    return time.perf_counter() - start, result


# --------------------------------------------------------------------------- main


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    result: dict[str, Any] = {"bench": "projections"}
    load_start = load_average()
    n = cfg.commits  # the stream the rebuild reads
    tail = round(n * cfg.restart_share / (1 - cfg.restart_share))  # appended before the restart
    t0 = time.perf_counter()
    fill = generate(n + tail)
    gen_s = time.perf_counter() - t0
    events = fill.events[n - 1]
    sizes = sorted(len(p) for p in fill.payloads[:n])
    usage_size = len(fill.payloads[next(i for i, kind in enumerate(fill.kinds) if kind == "usage")])
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            url = server.url
            print(f"nats-server {url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; gc: {GC_MODE[0]}; load average "
                  f"{load_start}; every figure below is the "
                  f"median of {cfg.repetitions} repetitions, raw and ours alternated (ABBA)")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)
            settings = build_settings(nats_url=url)
            nc = await nats.connect(url, name="bench-projections", **server.service_auth())
            try:
                async with Journal.open(nc, settings) as journal:
                    js = nc.jetstream(timeout=30)
                    stream = settings.stream
                    row("versions", f"nats-server {nc.connected_server_version}",
                        f"nats-py {nats.aio.client.__version__}, msgspec {msgspec.__version__}")

                    # ------------------------------------------------------ 1. fill
                    kinds = ", ".join(f"{k} {v:,}" for k, v in sorted(
                        fill.kind_counts(n).items(), key=lambda kv: -kv[1]))
                    row("generate + encode commits", f"{(n + tail) / gen_s:,.0f} commit/s",
                        f"{n + tail:,} in {gen_s:.1f} s; the first {n:,} ({events:,} events: "
                        f"{kinds}) fill the stream, {tail:,} more are appended before the restart")
                    meter = CpuMeter(server.pid)
                    fill_s = await publish(js, fill, 0, n)
                    fill_rate = n / fill_s
                    row("fill: js.publish_async, pipelined", f"{fill_rate:,.0f} msg/s",
                        f"{n:,} msgs in {fill_s:.1f} s, batches of {FILL_BATCH}, with Nats-Msg-Id "
                        f"+ expected-last-subject-seq headers; {meter.text()}")
                    row("commit payload", f"{sum(sizes) / n:,.0f} B avg",
                        f"min {sizes[0]}, median {sizes[n // 2]}, max {sizes[-1]}; one "
                        f"UsageTracked: {usage_size} B; {sum(sizes) / 1e6:,.1f} MB in all")
                    last_seq = await journal.stream_last_seq()
                    assert last_seq == n, (last_seq, n)
                    gc.collect()

                    # ------------------------------------------------------ 2+3. repetitions
                    # raw and the rebuild alternate (raw, rebuild, rebuild, raw, ...): neither side
                    # always runs first on colder caches
                    cpu: dict[str, str] = {}
                    store_ms: list[float] = []
                    runner: ProjectionRunner[Any] | None = None

                    def raw_side(mode: str) -> Callable[[], Awaitable[float]]:
                        async def run() -> float:
                            gc.collect()
                            meter = CpuMeter(server.pid)
                            seconds = await raw_replay(js, stream, last_seq, mode)
                            cpu[mode] = meter.text()
                            return seconds
                        return run

                    async def rebuild_side() -> float:
                        nonlocal runner
                        runner = None
                        gc.collect()
                        runner = ProjectionRunner(ActivityProjection(), journal, MemoryCheckpoints(), "bb.>")
                        meter = CpuMeter(server.pid)
                        seconds, seq = await timed(runner.rebuild)
                        cpu["rebuild"] = meter.text()
                        assert seq == last_seq, (seq, last_seq)
                        # what the rebuild's checkpoint into memory costs (encoding the model)
                        runner._saved_seq = 0
                        store_ms.append((await timed(runner.checkpoint))[0] * 1000)
                        return seconds

                    modes = ("count", "meta", "decode", "nofilter")
                    runs = await alternate(
                        {**{mode: raw_side(mode) for mode in modes}, "rebuild": rebuild_side}, cfg.repetitions)
                    raw = {mode: runs[mode] for mode in modes}
                    rebuild_s = runs["rebuild"]
                    assert runner is not None
                    model_text = check_model(runner.model, fill, last_seq)

                    raw_rates = {m: [last_seq / s for s in v] for m, v in raw.items()}
                    raw_rate = median(raw_rates["count"])
                    meta_rate = median(raw_rates["meta"])
                    decode_rate = median(raw_rates["decode"])
                    row("raw ordered consumer, count only", f"{raw_rate:,.0f} msg/s",
                        f"{spread(raw_rates['count'])}; {cpu['count']}")
                    row("  + stream sequence from metadata", f"{meta_rate:,.0f} msg/s",
                        f"{spread(raw_rates['meta'])}; {cpu['meta']}")
                    row("  + msgspec decode as Commit", f"{decode_rate:,.0f} msg/s",
                        f"{spread(raw_rates['decode'])}; {cpu['decode']}")
                    nofilter_rate = median(raw_rates["nofilter"])
                    row("  count only, consumer filter '>'", f"{nofilter_rate:,.0f} msg/s",
                        f"not 'bb.>' (same messages; the server's unfiltered read); "
                        f"{spread(raw_rates['nofilter'])}; {cpu['nofilter']}")
                    rebuild_rates = [last_seq / s for s in rebuild_s]
                    rebuild_rate = median(rebuild_rates)
                    rebuild_events = events / median(rebuild_s)
                    store = median(store_ms)
                    fold_rate = last_seq / (median(rebuild_s) - store / 1000)
                    row("rebuild (ActivityProjection)", f"{rebuild_rate:,.0f} commit/s",
                        f"{spread(rebuild_rates)}; {median(rebuild_s):.2f} s; {cpu['rebuild']}")
                    row("  events/s", f"{rebuild_events:,.0f} event/s",
                        f"{events:,} events in {last_seq:,} commits")
                    row("  of which: checkpoint into memory", f"{store:,.0f} ms",
                        f"encoding the model (msgpack); catch-up alone {fold_rate:,.0f} commit/s")
                    row("  rebuilt model", "ok", model_text)
                    ratio = rebuild_rate / raw_rate
                    row("ratio rebuild commits/s ÷ raw msgs/s", f"{ratio:.3f}",
                        "target >= 0.5 (raw: count only)")
                    row("  ÷ raw + metadata + decode", f"{rebuild_rate / decode_rate:.3f}", "")

                    if profile_path is not None:
                        runner = None
                        gc.collect()
                        runner = ProjectionRunner(ActivityProjection(), journal, MemoryCheckpoints(), "bb.>")
                        profiler = cProfile.Profile()
                        profiler.enable()
                        try:
                            seconds, _ = await timed(runner.rebuild)
                        finally:
                            profiler.disable()
                        profiler.dump_stats(profile_path)
                        row("rebuild under cProfile", f"{last_seq / seconds:,.0f} commit/s",
                            f"stats in {profile_path}")

                    # ------------------------------------------------------ 4. checkpoints
                    checkpoints = await NatsCheckpoints.open(journal, settings.replicas, create=True)
                    assert checkpoints is not None
                    saver = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>")
                    saver.model, saver.seq = runner.model, runner.seq
                    runner = None
                    snapshot = _snapshot_bytes(saver)  # what checkpoint() stores
                    save_ms: list[float] = []
                    for _ in range(cfg.repetitions):
                        saver._saved_seq = 0
                        seconds, saved = await timed(saver.checkpoint)
                        assert saved, "checkpoint not stored"
                        save_ms.append(seconds * 1000)
                    del saver
                    restore_ms: list[float] = []
                    decode_ms: list[float] = []
                    for _ in range(cfg.repetitions):
                        gc.collect()
                        reader = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>")
                        seconds, _ = await timed(reader.restore)
                        assert reader.seq == last_seq, (reader.seq, last_seq)
                        restore_ms.append(seconds * 1000)
                        # its decoding part, on the same bytes
                        t0 = time.perf_counter()
                        reader._decode(snapshot)
                        decode_ms.append((time.perf_counter() - t0) * 1000)
                        del reader
                    restore = median(restore_ms)
                    decode = median(decode_ms)
                    row("checkpoint size (msgpack model)", f"{len(snapshot):,} B",
                        f"at sequence {last_seq:,}")
                    row("checkpoint save (NatsCheckpoints)", f"{median(save_ms):,.0f} ms",
                        f"encode + object store put + KV update; {spread(save_ms, ',.1f')}")
                    row("checkpoint restore", f"{restore:,.0f} ms",
                        f"KV get + object store get + decode; {spread(restore_ms, ',.1f')}")
                    row("  of which: msgpack decode of the model", f"{decode:,.0f} ms",
                        f"{spread(decode_ms, ',.1f')}; the rest, ~{restore - decode:,.0f} ms, is "
                        f"fetching the bytes (nats-py object store get)")

                    # ------------------------------------------------------ 4b. restart
                    # new traffic after the checkpoint: the last 10% of the stream
                    await publish(js, fill, n, n + tail)
                    fill = Fill([], [], [], fill.kinds, fill.events, fill.session_events)
                    end = await journal.stream_last_seq()
                    assert end == n + tail, (end, n + tail)
                    restart_ms: list[float] = []
                    restart_restore_ms: list[float] = []
                    restarted: ProjectionRunner[Any] | None = None
                    for _ in range(cfg.repetitions):
                        gc.collect()
                        restarted = ProjectionRunner(ActivityProjection(), journal, checkpoints, "bb.>")
                        t0 = time.perf_counter()
                        await restarted.restore()
                        t1 = time.perf_counter()
                        await restarted.catch_up()
                        t2 = time.perf_counter()
                        assert restarted.seq == end, (restarted.seq, end)
                        restart_ms.append((t2 - t0) * 1000)
                        restart_restore_ms.append((t1 - t0) * 1000)
                    assert restarted is not None
                    check_model(restarted.model, fill, end)
                    restarted = None
                    restart = median(restart_ms)
                    row("restart: restore + catch up last 10%", f"{restart:,.0f} ms",
                        f"checkpoint at {n:,}, {tail:,} commits appended since ({tail / end:.0%} "
                        f"of {end:,}); restore {median(restart_restore_ms):,.0f} ms, catch-up "
                        f"{restart - median(restart_restore_ms):,.0f} ms; {spread(restart_ms, ',.1f')}")
            finally:
                await nc.close()

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    result.update(
        ratio_vs_raw=round(ratio, 4),
        ratio_vs_raw_decode=round(rebuild_rate / decode_rate, 4),
        events=events,
        commits=last_seq,
        rebuild_commits_per_s=round(rebuild_rate, 1),
        rebuild_events_per_s=round(rebuild_events, 1),
        rebuild_s=round(median(rebuild_s), 4),
        catch_up_commits_per_s=round(fold_rate, 1),
        raw_msgs_per_s=round(raw_rate, 1),
        raw_meta_msgs_per_s=round(meta_rate, 1),
        raw_decode_msgs_per_s=round(decode_rate, 1),
        raw_nofilter_msgs_per_s=round(nofilter_rate, 1),
        fill_msgs_per_s=round(fill_rate, 1),
        payload_bytes_avg=round(sum(sizes) / n, 1),
        checkpoint_bytes=len(snapshot),
        checkpoint_save_ms=round(median(save_ms), 2),
        restore_ms=round(restore, 2),
        restore_decode_ms=round(decode, 2),
        restart_ms=round(restart, 2),
        restart_tail_commits=tail,
        repetitions=cfg.repetitions,
        statistic="median",
        alternated="raw and rebuild, ABBA",
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


def _snapshot_bytes(runner: ProjectionRunner[Any]) -> bytes:
    """The bytes ``runner.checkpoint()`` stores: its model and sequence, as the runner encodes."""
    from projections.runner import _Snapshot

    return runner._encode(_Snapshot(seq=runner.seq, model=runner.model))


def cli() -> None:
    run_cli(__doc__, "cProfile one extra rebuild into FILE", make_config, main)


if __name__ == "__main__":
    cli()
