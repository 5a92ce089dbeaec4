"""Benchmark: durable session commands through the actor host vs. raw JetStream publishing.

Run as ``python bench/commands.py [--quick] [--profile FILE]``.

It starts its own nats-server (``blackbird.server.embedded.EmbeddedServer`` on a temporary data dir,
default fsync mode: JetStream's ``sync_interval`` of 2 minutes, acks after the write to the
page cache), connects ``AsyncBlackbird(**service_settings(server), tenant="bench")`` (the
server is secured: every client, ours and the raw baselines', connects as the data folder's
service identity, ``server.service_auth()``) and measures

1. ``touch_session`` commands/s and per-command latency (p50/p99) with 1, 100, 1,000 and
   10,000 concurrent sessions, one worker per session; every call returns after the JetStream
   ack. The 100- and 10,000-session levels alternate (ABBA, 3 runs each with ``--quick`` and 5
   without): ``scaling`` = median commands/s at 10,000 ÷ median at 100 (target >= 0.8);
2. a raw baseline on the same server: nats-py ``js.publish_async`` of payloads the size of one
   of our commits, pipelined in batches of 1,000, into a separate stream ("RAW"); a second
   variant carries the same headers our appends carry (``Nats-Msg-Id`` and
   ``Nats-Expected-Last-Subject-Sequence``) so the server-side cost of those is visible.
   The 1,000-session level and the two raw variants alternate (raw, raw + headers, ours, then
   ours, raw + headers, raw, ...: ``alternate``), 3 runs each with ``--quick``, 5 without;
   the figures are the medians, ``ratio_vs_raw`` = median commands/s at 1,000 sessions ÷
   median raw msgs/s (no headers);
3. activation time of a session with 10,000 events, without and with a snapshot.

A human-readable table goes to stdout; the very last line is one JSON object.
``--profile FILE`` runs cProfile over the first 1,000-session run only and writes its stats to FILE
(the throughput of that phase is then distorted by the profiler).
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/commands.py``: the repo's packages first,
    # before this folder (whose projections.py would shadow the ``projections`` package)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import msgspec
import nats
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig
from nats.js.errors import NotFoundError

from actors.events import Applied, Commit, SessionTouched
from actors.ports import AggregateKey
from blackbird import AsyncBlackbird, BlackbirdError
from blackbird.server.embedded import EmbeddedServer

FSYNC = "default (JetStream sync_interval 2m)"
TENANT = "bench"
ACTIVATION_EVENTS = 10_000
RAW_BATCH = 1_000
RAW_SUBJECTS = 1_000  # raw messages go round-robin to raw.0 .. raw.999, like 1,000 sessions


@dataclass(frozen=True)
class Config:
    quick: bool
    concurrency: tuple[int, ...] = (1, 100, 1_000, 10_000)
    ratio_level: int = 1_000  # the level alternated with the raw baseline (ratio_vs_raw)
    scale_levels: tuple[int, int] = (100, 10_000)  # alternated with each other: the scaling ratio
    seconds: dict[int, float] = field(default_factory=dict)  # timed run per concurrency level
    warmup: float = 0.5  # seconds of untimed load before each level (at least; see warmup_for)
    raw_seconds: float = 3.0
    activation_repeats: int = 5
    repetitions: int = 3  # the top level and raw, alternated

    def warmup_for(self, sessions: int) -> float:
        """Untimed load before a level: at least long enough for every worker's first command to
        have come back twice at ~4,000 cmd/s (all of them start at once, and only the commands
        started after the warm-up are timed: at 10,000 sessions, 0.5 s measured the first burst)."""
        return max(self.warmup, sessions / 2_000)


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, seconds={1: 3.0, 100: 3.0, 1_000: 3.0, 10_000: 3.0}, raw_seconds=2.5,
                      activation_repeats=5, repetitions=3)
    return Config(quick=False, seconds={1: 10.0, 100: 15.0, 1_000: 15.0, 10_000: 15.0}, raw_seconds=10.0,
                  activation_repeats=11, repetitions=5)


# --------------------------------------------------------------------------- helpers


def service_settings(server: EmbeddedServer) -> dict[str, Any]:
    """``AsyncBlackbird`` settings for ``server``: its url and the data folder's service identity,
    the one the raw clients connect as (``nats.connect(url, **server.service_auth())``), so that
    a raw baseline and ours talk to the same server with the same auth."""
    auth = server.service_auth()
    return {"nats_url": server.url, "nats_user": auth["user"], "nats_password": auth["password"]}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (q in 0..1)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def load_average() -> str:
    """The 1/5/15-minute load averages ("n/a" where the OS has none)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def run_context(quick: bool, load_start: str, load_end: str) -> dict[str, Any]:
    """What every benchmark's JSON line says about how it ran."""
    from blackbird._runtime import loop_options

    loop = "uvloop" if loop_options() else "asyncio"
    return {"fsync": FSYNC, "gc": GC_MODE[0], "loop": loop, "quick": quick,
            "load_average": {"start": load_start, "end": load_end}}


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float], fmt: str = ",.0f") -> str:
    """``median of N: a, b, c`` for a figure measured in N alternated repetitions."""
    return f"median of {len(values)}: {', '.join(format(v, fmt) for v in values)}"


async def alternate(sides: dict[str, Callable[[], Awaitable[float]]], reps: int) -> dict[str, list[float]]:
    """Run every side once per repetition, ``reps`` times, the order reversed on every other
    repetition (two sides: A B, B A, A B, ... = ABBA), so neither the raw baseline nor ours
    always runs first (on colder caches) or last (on a warmer machine); returns each side's
    figures in run order. Report the medians and the ratio of the medians."""
    names = list(sides)
    out: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            out[name].append(await sides[name]())
    return out


def row(name: str, value: str, detail: str = "") -> None:
    print(f"{name:<44} {value:>16}  {detail}", flush=True)


def server_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (Linux); NaN elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


class CpuMeter:
    """Share of one core used by this process and by nats-server over a window."""

    def __init__(self, server_pid: int) -> None:
        self._pid = server_pid
        self._wall = time.perf_counter()
        self._client = time.process_time()
        self._server = server_cpu_seconds(server_pid)

    def text(self) -> str:
        wall = time.perf_counter() - self._wall
        client = (time.process_time() - self._client) / wall * 100
        server = (server_cpu_seconds(self._pid) - self._server) / wall * 100
        return f"cpu: client {client:.0f}% server {server:.0f}%"


@dataclass
class PhaseResult:
    sessions: int
    commands: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu: str = ""
    failed: int = 0  # measured commands that raised (not counted in ``commands``; in p50/p99)

    @property
    def per_s(self) -> float:
        return self.commands / self.seconds


# --------------------------------------------------------------------------- 1. commands


async def create_sessions(bb: AsyncBlackbird, n: int, label: str, tier: str = "enterprise") -> list[str]:
    sm = bb.session_manager
    ids = [f"{label}-{i}-{uuid.uuid4().hex[:8]}" for i in range(n)]
    limiter = anyio.CapacityLimiter(200)

    async def one(sid: str) -> None:
        async with limiter:
            await sm.create_session(f"user-{sid}", tier=tier, session_id=sid)

    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(one, sid)
    return ids


async def run_phase(
    ids: list[str], call: Callable[[str], Awaitable[bool]], warmup: float, seconds: float,
    server_pid: int, profile_to: str | None = None,
) -> tuple[PhaseResult, int]:
    """One worker per session, each awaiting ``call(session_id)`` in a loop (it returns True
    when the call was refused); latencies after warmup. Returns the phase and how many of its
    measured calls were refused. ``profile_to``: cProfile the phase into that file."""
    clock = time.perf_counter
    latencies: list[list[float]] = [[] for _ in ids]
    refused_counts = [0] * len(ids)
    begin = clock()
    measure_from = begin + warmup
    deadline = measure_from + seconds
    finished: list[float] = []
    meter: list[CpuMeter] = []

    async def start_meter() -> None:
        await anyio.sleep(max(0.0, measure_from - clock()))
        meter.append(CpuMeter(server_pid))

    async def worker(i: int, sid: str, lat: list[float]) -> None:
        refused = 0
        while True:
            t0 = clock()
            if t0 >= deadline:
                break
            was_refused = await call(sid)
            t1 = clock()
            if t0 >= measure_from:
                lat.append(t1 - t0)
                refused += was_refused
        refused_counts[i] = refused
        finished.append(clock())

    profiler = cProfile.Profile() if profile_to is not None else None
    if profiler is not None:
        profiler.enable()
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(start_meter)
            for i, sid in enumerate(ids):
                tg.start_soon(worker, i, sid, latencies[i])
    finally:
        if profiler is not None and profile_to is not None:
            profiler.disable()
            profiler.dump_stats(profile_to)
    # Calls started in [measure_from, deadline); the window ends when the last one returns.
    end = max(finished)
    cpu = meter[0].text() if meter else ""
    flat = sorted(x for lat in latencies for x in lat)
    phase = PhaseResult(
        sessions=len(ids),
        commands=len(flat),
        seconds=end - measure_from,
        p50_ms=percentile(flat, 0.50) * 1000,
        p99_ms=percentile(flat, 0.99) * 1000,
        cpu=cpu,
    )
    return phase, sum(refused_counts)


async def run_touch_phase(
    bb: AsyncBlackbird, ids: list[str], warmup: float, seconds: float, server_pid: int,
    profile_to: str | None = None,
) -> PhaseResult:
    """One worker per session, each touching its session in a loop; latencies after warmup. A
    command that fails (not acknowledged within ``command_timeout``: at 10,000 sessions on a
    loaded machine the queue in the process alone can take that long) is counted in ``failed``,
    not in the commands done, and its latency (the timeout) is in p50/p99; the worker goes on."""
    touch = bb.session_manager.touch_session

    async def call(sid: str) -> bool:
        try:
            await touch(sid)
        except BlackbirdError:
            return True
        return False

    phase, failed = await run_phase(ids, call, warmup, seconds, server_pid, profile_to)
    phase.failed = failed
    phase.commands -= failed
    return phase


def failures(res: PhaseResult) -> str:
    return f"; {res.failed:,} FAILED (timed out)" if res.failed else ""


async def commit_payload(
    url: str, stream: str, subject: str, principal: str, *, auth: Mapping[str, Any]
) -> tuple[bytes, int]:
    """The stored bytes of a real TouchSession commit, and the size of one built by hand
    (read by a raw client connecting with ``auth``: nats-py connect options, ``{}`` for none)."""
    nc = await nats.connect(url, name="bench-read", **auth)
    try:
        msg = await nc.jetstream().get_last_msg(stream, subject)
    finally:
        await nc.close()
    commit = Commit(
        at=time.time(),
        version=12_345,
        commands=(
            Applied(uuid.uuid4().hex, principal, (SessionTouched(at=time.time(), operation="activity"),)),
        ),
    )
    return bytes(msg.data or b""), len(msgspec.json.encode(commit))


# --------------------------------------------------------------------------- 2. raw baseline


async def publish_raw(
    js: JetStreamContext,
    stream: str,
    payload: bytes,
    seconds: float,
    *,
    with_headers: bool,
    replicas: int = 1,
    server_pid: int | None = None,
) -> tuple[int, float, str]:
    """Pipelined ``js.publish_async`` of ``payload`` into a new stream ``stream`` with ``replicas``
    replicas, in batches of RAW_BATCH round-robin over RAW_SUBJECTS subjects (``<stream in lower
    case>.<i>``), for ``seconds`` after one warm-up batch; ``with_headers``: each message carries
    the two headers our appends carry (``Nats-Msg-Id`` and ``Nats-Expected-Last-Subject-Sequence``),
    so what the server does for them is counted. Returns (messages, seconds, cpu use of this
    process and of the server ``server_pid`` over the timed batches; "" without a pid)."""
    prefix = stream.lower()
    try:  # a fresh stream each run (a repeated run's expected-sequence headers start from 0)
        await js.delete_stream(stream)
    except NotFoundError:
        pass
    await js.add_stream(
        StreamConfig(name=stream, subjects=[f"{prefix}.>"], storage=StorageType.FILE,
                     num_replicas=replicas, duplicate_window=120.0)
    )
    subjects = [f"{prefix}.{i}" for i in range(RAW_SUBJECTS)]
    last_seq = [0] * RAW_SUBJECTS
    sent = 0

    async def batch() -> None:
        nonlocal sent
        futures = []
        for j in range(RAW_BATCH):
            k = (sent + j) % RAW_SUBJECTS
            headers = None
            if with_headers:
                headers = {
                    "Nats-Expected-Last-Subject-Sequence": str(last_seq[k]),
                    "Nats-Msg-Id": uuid.uuid4().hex,
                }
            futures.append((k, await js.publish_async(subjects[k], payload, headers=headers)))
        for k, fut in futures:
            ack = await fut
            last_seq[k] = ack.seq
        sent += RAW_BATCH

    await batch()  # warm-up (stream files, subject index)
    sent_before = sent
    meter = CpuMeter(server_pid) if server_pid is not None else None
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        await batch()
    elapsed = time.perf_counter() - start
    return sent - sent_before, elapsed, meter.text() if meter else ""


async def raw_baseline(
    url: str, payload: bytes, seconds: float, server_pid: int, *, with_headers: bool,
    auth: Mapping[str, Any],
) -> tuple[int, float, str]:
    """Pipelined js.publish_async into stream RAW (RAWH with headers; see :func:`publish_raw`)
    by a client connecting with ``auth`` (nats-py connect options); returns (messages, seconds,
    cpu use)."""
    nc = await nats.connect(url, name="bench-raw", **auth)
    try:
        return await publish_raw(
            nc.jetstream(timeout=30), "RAWH" if with_headers else "RAW", payload, seconds,
            with_headers=with_headers, server_pid=server_pid,
        )
    finally:
        await nc.close()


# --------------------------------------------------------------------------- 3. activation


async def fill(bb: AsyncBlackbird, sid: str, events: int) -> None:
    """Create ``sid`` and touch it until it has ``events`` events (sequential, durable)."""
    sm = bb.session_manager
    await sm.create_session(f"user-{sid}", tier="enterprise", session_id=sid)
    for _ in range(events - 1):
        await sm.touch_session(sid)


async def time_activation(bb: AsyncBlackbird, sid: str, repeats: int) -> list[float]:
    host = bb.host
    assert host is not None
    times = []
    for _ in range(repeats):
        host.passivate_idle(0)
        assert host.active_actors == 0
        t0 = time.perf_counter()
        session = await bb.session_manager.get_session(sid)
        times.append((time.perf_counter() - t0) * 1000)
        assert session is not None and session.version == ACTIVATION_EVENTS, session
    return times


async def time_call(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


# --------------------------------------------------------------------------- main


async def alternate_with_raw(
    ours: Callable[[], Awaitable[PhaseResult]], url: str, payload: bytes, seconds: float,
    server_pid: int, reps: int, *, auth: Mapping[str, Any],
) -> tuple[PhaseResult, float, float, dict[str, list[float]]]:
    """``ours`` alternated with raw ``js.publish_async`` of ``payload``, without and with the two
    headers our appends carry (raw, raw + headers, ours, then ours, raw + headers, raw, ...),
    ``reps`` times each, the raw client connecting with ``auth`` (the identity ours uses, for
    like-for-like figures); prints the raw rows. Returns our median run (by rate), the median raw
    rates and every run's rate per side ("raw", "raw_headers", "ours")."""
    notes: dict[bool, str] = {}
    phases: list[PhaseResult] = []

    def raw_side(with_headers: bool) -> Callable[[], Awaitable[float]]:
        async def run() -> float:
            n, s, cpu = await raw_baseline(
                url, payload, seconds, server_pid, with_headers=with_headers, auth=auth)
            notes[with_headers] = f"last run {n:,} msgs in {s:.1f} s, {cpu}"
            return n / s
        return run

    async def ours_side() -> float:
        phases.append(await ours())
        return phases[-1].per_s

    runs = await alternate({"raw": raw_side(False), "raw_headers": raw_side(True), "ours": ours_side}, reps)
    raw_rate, rawh_rate = median(runs["raw"]), median(runs["raw_headers"])
    row("raw js.publish_async (no headers)", f"{raw_rate:,.0f} msg/s",
        f"{len(payload)} B, batches of {RAW_BATCH}, {RAW_SUBJECTS} subjects, {seconds:.1f} s a run; "
        f"{spread(runs['raw'])}; {notes[False]}")
    row("raw js.publish_async (+msg-id, expected-seq)", f"{rawh_rate:,.0f} msg/s",
        f"same, with the 2 headers our appends carry; {spread(runs['raw_headers'])}; {notes[True]}")
    middle = sorted(phases, key=lambda p: p.per_s)[len(phases) // 2]
    return middle, raw_rate, rawh_rate, runs


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "commands"}
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            url = server.url
            auth = server.service_auth()  # the raw clients' identity; ours: service_settings()
            print(f"nats-server {url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; load average {load_start} (other processes skew every "
                  f"figure); gc: {GC_MODE[0]}")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)

            # ---------------------------------------------------------------- 1. commands
            # 1 session once; 100 and 10,000 alternated with each other (the scaling ratio); the
            # ratio level (1,000) alternated with the raw baseline (2.)
            phases: dict[int, PhaseResult] = {}
            top = cfg.ratio_level
            low, high = cfg.scale_levels
            async with AsyncBlackbird(**service_settings(server), tenant=TENANT) as bb:
                t0 = time.perf_counter()
                ids = {n: await create_sessions(bb, n, f"s{n}") for n in cfg.concurrency}
                made = sum(cfg.concurrency)
                row("create the sessions", f"{made / (time.perf_counter() - t0):,.0f} /s",
                    f"{made:,} sessions, 200 at a time, {time.perf_counter() - t0:.1f} s")
                for n in cfg.concurrency:
                    if n in (top, low, high):
                        continue
                    res = await run_touch_phase(bb, ids[n], cfg.warmup_for(n), cfg.seconds[n], server.pid)
                    phases[n] = res
                    row(f"touch_session, {n} concurrent session(s)", f"{res.per_s:,.0f} cmd/s",
                        f"p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  "
                        f"({res.commands:,} cmds in {res.seconds:.1f} s; {res.cpu}{failures(res)})")
                scale_phases: dict[int, list[PhaseResult]] = {low: [], high: []}

                def scale_side(n: int) -> Callable[[], Awaitable[float]]:
                    async def run() -> float:
                        res = await run_touch_phase(bb, ids[n], cfg.warmup_for(n), cfg.seconds[n], server.pid)
                        scale_phases[n].append(res)
                        return res.per_s
                    return run

                scale_runs = await alternate({str(low): scale_side(low), str(high): scale_side(high)},
                                             cfg.repetitions)
                for n in (low, high):
                    res = sorted(scale_phases[n], key=lambda p: p.per_s)[len(scale_phases[n]) // 2]
                    phases[n] = res
                    row(f"touch_session, {n:,} concurrent session(s)", f"{median(scale_runs[str(n)]):,.0f} cmd/s",
                        f"{spread(scale_runs[str(n)])}, alternated {low} / {high:,}; the median run: "
                        f"p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  ({res.commands:,} cmds in "
                        f"{res.seconds:.1f} s; {res.cpu}{failures(res)})")
                scaling = median(scale_runs[str(high)]) / median(scale_runs[str(low)])
                row(f"scaling cmds/s @{high:,} ÷ @{low}", f"{scaling:.3f}",
                    f"target >= 0.8; ratio of the medians of {cfg.repetitions} alternated runs (ABBA)")
                settings = bb.settings
                subject = bb.journal.subjects.session(TENANT, ids[1][0])
                payload, built_size = await commit_payload(
                    url, settings.stream, subject, settings.principal, auth=auth
                )
                row("commit payload (TouchSession, stored)", f"{len(payload)} B",
                    f"msgspec.json of a hand-built commit: {built_size} B; "
                    f"snapshot_every={settings.snapshot_every} (default)")

                # ------------------------------------------------------------ 2. raw baseline
                to_profile = [profile_path]  # the first run at the top level only

                async def ours() -> PhaseResult:
                    profile_to, to_profile[0] = to_profile[0], None
                    return await run_touch_phase(
                        bb, ids[top], cfg.warmup_for(top), cfg.seconds[top], server.pid, profile_to)

                res, raw_rate, rawh_rate, runs = await alternate_with_raw(
                    ours, url, payload, cfg.raw_seconds, server.pid, cfg.repetitions, auth=auth)
                phases[top] = res
                row(f"touch_session, {top:,} concurrent session(s)", f"{median(runs['ours']):,.0f} cmd/s",
                    f"{spread(runs['ours'])}, alternated with raw; the median run: p50 {res.p50_ms:.2f} ms  "
                    f"p99 {res.p99_ms:.2f} ms  ({res.commands:,} cmds in {res.seconds:.1f} s; {res.cpu}{failures(res)}"
                    f"{', first run under cProfile' if profile_path else ''})")
            ratio = median(runs["ours"]) / raw_rate
            row(f"ratio cmds/s @{top} ÷ raw msgs/s", f"{ratio:.3f}",
                f"target >= 0.6 (issue 15); ratio of the medians of {cfg.repetitions} alternated runs (ABBA)")

            # ---------------------------------------------------------------- 3. activation
            async with AsyncBlackbird(**service_settings(server), tenant=TENANT, snapshot_every=10**9) as bb:
                host = bb.host
                assert host is not None
                sid_plain = f"act-plain-{uuid.uuid4().hex[:8]}"
                sid_snap = f"act-snap-{uuid.uuid4().hex[:8]}"
                t0 = time.perf_counter()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(fill, bb, sid_plain, ACTIVATION_EVENTS)
                    tg.start_soon(fill, bb, sid_snap, ACTIVATION_EVENTS)
                fill_s = time.perf_counter() - t0
                row("write 2 x 10,000 events (sequential/session)",
                    f"{2 * ACTIVATION_EVENTS / fill_s:,.0f} cmd/s", f"{fill_s:.1f} s")

                plain = await time_activation(bb, sid_plain, cfg.activation_repeats)
                row("activation, 10,000 events, no snapshot", f"{statistics.median(plain):.1f} ms",
                    f"median of {len(plain)} (min {min(plain):.1f}, max {max(plain):.1f})")

                # snapshot the second session only: activate it alone, then snapshot_all()
                host.passivate_idle(0)
                await bb.session_manager.get_session(sid_snap)
                await host.snapshot_all()
                key = AggregateKey(TENANT, "session", sid_snap)
                raw_snapshot = await bb.journal.load(key)
                assert raw_snapshot is not None, "snapshot was not written"
                snap = await time_activation(bb, sid_snap, cfg.activation_repeats)
                row("activation, 10,000 events, with snapshot", f"{statistics.median(snap):.2f} ms",
                    f"median of {len(snap)} (min {min(snap):.2f}, max {max(snap):.2f}); "
                    f"snapshot {len(raw_snapshot)} B; target <= 20 ms")
                kv_ms = await time_call(lambda: bb.journal.load(key), cfg.activation_repeats)
                last_ms = await time_call(lambda: bb.journal.last_seq(key), cfg.activation_repeats)
                row("  of which: snapshot KV get", f"{kv_ms:.2f} ms", "median, Journal.load")
                row("  of which: last_seq lookup", f"{last_ms:.2f} ms", "median, Journal.last_seq")

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    result.update(
        ratio_vs_raw=round(ratio, 4),
        ratio_definition=(f"median touch_session cmds/s at {top} sessions / median raw js.publish_async "
                          f"msgs/s of the same payload, {cfg.repetitions} runs each, alternated (ABBA)"),
        raw_msgs_per_s=round(raw_rate, 1),
        raw_with_headers_msgs_per_s=round(rawh_rate, 1),
        runs_per_s={k: [round(x, 1) for x in v] for k, v in runs.items()},
        cmds_per_s={**{str(n): round(p.per_s, 1) for n, p in sorted(phases.items())},
                    str(top): round(median(runs["ours"]), 1),
                    **{k: round(median(v), 1) for k, v in scale_runs.items()}},
        p50_ms={str(n): round(p.p50_ms, 3) for n, p in sorted(phases.items())},
        p99_ms={str(n): round(p.p99_ms, 3) for n, p in sorted(phases.items())},
        failed={str(n): p.failed for n, p in sorted(phases.items())},
        scaling={
            f"ratio_{high}_vs_{low}": round(scaling, 4),
            "definition": f"median touch_session cmds/s at {high} sessions / median at {low}, "
                          f"{cfg.repetitions} runs each, alternated (ABBA); target >= 0.8",
            "runs_per_s": {k: [round(x, 1) for x in v] for k, v in scale_runs.items()},
        },
        payload_bytes=len(payload),
        activation_ms={
            "no_snapshot": round(statistics.median(plain), 3),
            "snapshot": round(statistics.median(snap), 3),
        },
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


#: What the running benchmark does with the garbage collector ("serve" or "default").
GC_MODE = ["serve"]


def run_cli(doc: str, profile_help: str, make_config: Any, main: Any) -> None:
    """The command line the other benchmarks share: ``--quick``, ``--profile FILE``,
    ``--default-gc`` (else the process is tuned as `blackbird serve` tunes its own, for the raw
    baseline and the host alike); prints the result as the last line, one JSON object."""
    from blackbird._runtime import loop_options, tune_gc_for_serving

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under 60 s")
    parser.add_argument("--profile", metavar="FILE", help=profile_help)
    parser.add_argument(
        "--default-gc", action="store_true",
        help="keep CPython's default GC thresholds (by default the process is tuned as "
        "`blackbird serve` tunes its own, for the raw baseline and the host alike)",
    )
    args = parser.parse_args()
    GC_MODE[0] = "default" if args.default_gc else "serve"
    if not args.default_gc:
        tune_gc_for_serving()
    result = anyio.run(main, make_config(args.quick), args.profile, backend_options=loop_options())
    print(json.dumps(result), flush=True)


def cli() -> None:
    run_cli(__doc__ or "", "cProfile the first 1,000-session run into FILE", make_config, main)


if __name__ == "__main__":
    cli()
