"""Benchmark: durable rate-limit decisions through the actor host vs. raw JetStream publishing.

Run as ``python bench/ratelimit.py [--quick] [--profile FILE]``.

It starts its own nats-server (``blackbird.server.embedded.EmbeddedServer`` on a temporary data dir,
default fsync mode: JetStream's ``sync_interval`` of 2 minutes, acks after the write to the
page cache), writes a tier policy into the same temporary folder (tier ``bench``: every window
has a limit too high to be reached, so decisions are allowed; tier ``strict``: one request per
second, so nearly every decision is denied), connects
``AsyncBlackbird(nats_url=..., tenant="bench", policy_file=...)`` as the data folder's service
identity (``bench.commands.service_settings``; the raw clients connect as the same) and measures

1. ``enforce_rate_limit`` decisions/s and per-call latency (p50/p99) with 1, 100 and 1,000
   concurrent sessions of tier ``bench`` (allowed-heavy), then with 1,000 sessions of tier
   ``strict`` (denied-heavy), one worker per session. Every decision, allowed (``RateAllowed``)
   or denied (``RateDenied``, raised as ``RateLimitError``), is appended to JetStream before
   the call returns; allowed and denied calls are counted separately;
2. a raw baseline on the same server: nats-py ``js.publish_async`` of payloads the size of one
   stored rate-check commit, pipelined in batches of 1,000 (``bench.commands.raw_baseline``),
   without headers and with the two headers our appends carry (``Nats-Msg-Id``,
   ``Nats-Expected-Last-Subject-Sequence``). The 1,000-session allowed-heavy level and the two
   raw variants alternate (raw, raw + headers, ours, then ours, raw + headers, raw, ...:
   ``bench.commands.alternate_with_raw``), 3 runs each with ``--quick``, 5 without; the figures
   are the medians. ``ratio_vs_raw`` is median decisions/s at 1,000 sessions
   (allowed-heavy) ÷ median raw msgs/s *without* headers, the same definition as
   ``bench/commands.py``; ``ratio_vs_raw_with_headers`` divides by the header variant;
3. pure ``actors.session.decide`` on one core, no I/O: ``CheckRate`` decisions/s on a busy
   session (every window's log at its steady-state size, the costly case: ``pure_decide_per_s``)
   and on a freshly created one (empty logs); then decide+evolve/s (the state carried forward)
   and decide+apply/s (what the host does per command: events and the idempotency window).

A human-readable table goes to stdout; the very last line is one JSON object.
``--profile FILE`` runs cProfile over the first 1,000-session allowed-heavy run only and writes its
stats to FILE (the throughput of that phase is then distorted by the profiler).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/ratelimit.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import nats

from actors import ratelog
from actors.events import Applied, CheckRate, Commit, CreateSession, RateAllowed
from actors.policy import Policy, load_policy
from actors.session import SessionState, apply_commands, decide, evolve, initial_state
from bench.commands import (
    FSYNC,
    GC_MODE,
    PhaseResult,
    alternate_with_raw,
    create_sessions,
    load_average,
    median,
    row,
    run_cli,
    run_context,
    run_phase,
    service_settings,
    spread,
)
from blackbird import AsyncBlackbird, RateLimitError
from blackbird.server.embedded import EmbeddedServer

TENANT = "bench"
OPERATION = "api_call"
ALLOW_TIER = "bench"
DENY_TIER = "strict"
BIG = 1_000_000_000

_LONG_WINDOWS = f"per_minute = {BIG}, per_hour = {BIG}, per_day = {BIG}"
POLICY_TOML = f"""\
version = 1

[tiers.{ALLOW_TIER}]
idle_timeout = 86400
max_age = 31536000
max_sessions_per_user = 1000
rate_limits.default = {{ per_second = {BIG}, {_LONG_WINDOWS} }}

[tiers.{DENY_TIER}]
idle_timeout = 86400
max_age = 31536000
max_sessions_per_user = 1000
rate_limits.default = {{ per_second = 1, {_LONG_WINDOWS} }}
"""


@dataclass(frozen=True)
class Config:
    quick: bool
    concurrency: tuple[int, ...] = (1, 100, 1_000)
    denied_sessions: int = 1_000
    seconds: dict[int, float] = field(default_factory=dict)  # timed run per concurrency level
    denied_seconds: float = 3.0
    warmup: float = 0.5  # seconds of untimed load before each level
    raw_seconds: float = 3.0
    pure_seconds: float = 1.0  # per pure-logic loop
    repetitions: int = 3  # the 1,000-session allowed level and raw, alternated


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, seconds={1: 2.0, 100: 2.5, 1_000: 3.0}, denied_seconds=3.0,
                      raw_seconds=2.5, pure_seconds=1.0, repetitions=3)
    return Config(quick=False, seconds={1: 10.0, 100: 15.0, 1_000: 15.0}, denied_seconds=15.0,
                  raw_seconds=10.0, pure_seconds=5.0, repetitions=5)


@dataclass
class RatePhase(PhaseResult):
    allowed: int = 0
    denied: int = 0


# --------------------------------------------------------------------------- 1. decisions


async def run_rate_phase(
    bb: AsyncBlackbird, ids: list[str], warmup: float, seconds: float, server_pid: int,
    profile_to: str | None = None,
) -> RatePhase:
    """One worker per session, each asking for a rate decision in a loop; latencies (allowed
    and denied alike) and counts after warmup."""
    enforce = bb.session_manager.enforce_rate_limit

    async def call(sid: str) -> bool:
        try:
            await enforce(sid, OPERATION)
        except RateLimitError:
            return True
        return False

    phase, denied = await run_phase(ids, call, warmup, seconds, server_pid, profile_to)
    return RatePhase(**dataclasses.asdict(phase), allowed=phase.commands - denied, denied=denied)


async def stored_commit(
    url: str, stream: str, subject: str, *, auth: Mapping[str, Any]
) -> tuple[bytes, Commit]:
    """The stored bytes of the last commit on ``subject``, and the commit they decode to (read by
    a raw client connecting with ``auth``, nats-py connect options)."""
    nc = await nats.connect(url, name="bench-read", **auth)
    try:
        msg = await nc.jetstream().get_last_msg(stream, subject)
    finally:
        await nc.close()
    data = bytes(msg.data or b"")
    return data, msgspec.json.decode(data, type=Commit)


def rate_commit_size(principal: str) -> int:
    """Size of a hand-built single-decision RateAllowed commit (all four windows recorded)."""
    commit = Commit(
        at=time.time(),
        version=12_345,
        commands=(
            Applied(os.urandom(16).hex(), principal, (
                RateAllowed(at=time.time(), operation=OPERATION,
                            windows=("per_second", "per_minute", "per_hour", "per_day"),
                            policy_version=1),
            )),
        ),
    )
    return len(msgspec.json.encode(commit))


# --------------------------------------------------------------------------- 3. pure decide

T0 = 1_700_000_000.0
STEP = 0.001  # decide+evolve loops: one decision per millisecond of simulated time
# Warm-up that brings every window's log to its steady size (~64 entries, see actors.ratelog):
# (seconds between decisions, decisions), longest window first.
WARM_SCHEDULE = ((1_400.0, 70), (57.0, 70), (0.95, 70), (0.0157, 70), (STEP, 1_000))


def created_state(policy: Policy) -> SessionState:
    """A freshly created session: CreateSession decided, its events evolved."""
    state = initial_state(TENANT, "pure")
    d = decide(state, CreateSession(user_id="u1", tier=ALLOW_TIER), T0, policy)
    assert d.rejection is None, d.rejection
    for event in d.events:
        state = evolve(state, event)
    return state


def steady_state(policy: Policy) -> tuple[SessionState, float]:
    """A busy, long-lived session: allowed decisions spread so that the per-day, -hour,
    -minute and -second logs all hold their steady-state number of entries; and the instant
    of its last decision."""
    state = created_state(policy)
    command = CheckRate(operation=OPERATION)
    now = T0
    for gap, steps in WARM_SCHEDULE:
        for _ in range(steps):
            now += gap
            d = decide(state, command, now, policy)
            assert d.rejection is None, d.rejection
            for event in d.events:
                state = evolve(state, event)
    return state, now


def log_sizes(state: SessionState) -> str:
    return "/".join(str(len(ratelog.entries(log))) for log in state.rate_logs.values())


def timed_loop(seconds: float, chunk: int, body: Any) -> tuple[int, float]:
    """Call ``body(chunk)`` until ``seconds`` have passed; (iterations, elapsed)."""
    done = 0
    start = time.perf_counter()
    while True:
        body(chunk)
        done += chunk
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done, elapsed


def pure_decide(policy: Policy, seconds: float) -> dict[str, Any]:
    """Decisions/s of the pure session logic on one core (no I/O, no event loop)."""
    command = CheckRate(operation=OPERATION)
    fresh = created_state(policy)
    steady, t_steady = steady_state(policy)
    results: dict[str, Any] = {"log_entries": log_sizes(steady)}

    # (a) decide only, ``now`` advancing 1 µs a call (wrapping every 0.1 s so that the logs
    # under test keep their size throughout); on the steady-state session, and on a fresh one
    # (empty logs: the check is skipped for a window nothing was admitted in yet)
    def decide_only(state: SessionState, now0: float) -> Any:
        def body(n: int) -> None:
            for i in range(n):
                d = decide(state, command, now0 + (i % 100_000) * 1e-6, policy)
            assert d.rejection is None

        return body

    n, s = timed_loop(seconds, 20_000, decide_only(steady, t_steady))
    results["decide"] = n / s
    n, s = timed_loop(seconds, 20_000, decide_only(fresh, T0 + 1.0))
    results["decide_fresh"] = n / s

    # (b) decide, then evolve the state by its events; ``now`` advancing 1 ms a step
    carried: list[Any] = [steady, t_steady]

    def decide_evolve(n: int) -> None:
        state, now = carried
        for _ in range(n):
            now += STEP
            d = decide(state, command, now, policy)
            for event in d.events:
                state = evolve(state, event)
        carried[:] = [state, now]

    n, s = timed_loop(seconds, 20_000, decide_evolve)
    results["decide_evolve"] = n / s

    # (c) what the host does per command besides I/O: decide, then fold the events *and* the
    # command id into the idempotency window (apply_commands), as in ActorHost._handle
    carried[:] = [steady, t_steady]
    ids = [os.urandom(16).hex() for _ in range(4096)]

    def decide_apply(n: int) -> None:
        state, now = carried
        for i in range(n):
            now += STEP
            d = decide(state, command, now, policy)
            state = apply_commands(state, (Applied(ids[i & 4095], "bench", d.events),))
        carried[:] = [state, now]

    n, s = timed_loop(seconds, 20_000, decide_apply)
    results["decide_apply"] = n / s
    return results


# --------------------------------------------------------------------------- main





def phase_row(label: str, res: RatePhase, profiled: bool = False) -> None:
    row(label, f"{res.per_s:,.0f} dec/s",
        f"p50 {res.p50_ms:.2f} ms  p99 {res.p99_ms:.2f} ms  "
        f"({res.allowed:,} allowed + {res.denied:,} denied in {res.seconds:.1f} s; {res.cpu}"
        f"{', under cProfile' if profiled else ''})")


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "ratelimit"}
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        policy_file = Path(tmp) / "tiers.toml"
        policy_file.write_text(POLICY_TOML)
        policy = load_policy(POLICY_TOML)
        async with EmbeddedServer(tmp) as server:
            url = server.url
            auth = server.service_auth()  # the raw clients' identity; ours: service_settings()
            print(f"nats-server {url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; policy {policy_file.name}: tier {ALLOW_TIER!r} "
                  f"(limits {BIG:,} in every window), tier {DENY_TIER!r} (1 per second); "
                  f"load average {load_start} (other processes skew every figure); "
                  f"gc: {GC_MODE[0]} (as `blackbird serve`, for raw and host alike)"
                  if GC_MODE[0] == "serve" else f"load average {load_start}; gc: CPython default")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)

            # ---------------------------------------------------------------- 1. decisions
            # 1 and 100 sessions once; 1,000 alternated with the raw baseline (2.); then denied
            phases: dict[int, RatePhase] = {}
            top = max(cfg.concurrency)
            async with AsyncBlackbird(
                **service_settings(server), tenant=TENANT, policy_file=str(policy_file)
            ) as bb:
                ids = {
                    n: await create_sessions(bb, n, f"s{n}", ALLOW_TIER) for n in cfg.concurrency
                }
                denied_ids = await create_sessions(bb, cfg.denied_sessions, "d", DENY_TIER)
                for n in cfg.concurrency[:-1]:
                    res = await run_rate_phase(bb, ids[n], cfg.warmup, cfg.seconds[n], server.pid)
                    phases[n] = res
                    phase_row(f"enforce_rate_limit, {n} session(s), allowed", res)
                settings = bb.settings
                subject_allowed = bb.journal.subjects.session(TENANT, ids[1][0])
                subject_denied = bb.journal.subjects.session(TENANT, denied_ids[0])
                payload, commit = await stored_commit(url, settings.stream, subject_allowed, auth=auth)
                events = [e for a in commit.commands for e in a.events]
                assert [type(e) for e in events] == [RateAllowed], events
                row("commit payload (RateAllowed, stored)", f"{len(payload)} B",
                    f"hand-built: {rate_commit_size(settings.principal)} B")

                # ------------------------------------------------------------ 2. raw baseline
                to_profile = [profile_path]  # the first run at the top level only

                async def ours() -> PhaseResult:
                    profile_to, to_profile[0] = to_profile[0], None
                    return await run_rate_phase(
                        bb, ids[top], cfg.warmup, cfg.seconds[top], server.pid, profile_to)

                top_res, raw_rate, rawh_rate, runs = await alternate_with_raw(
                    ours, url, payload, cfg.raw_seconds, server.pid, cfg.repetitions, auth=auth)
                assert isinstance(top_res, RatePhase)
                phases[top] = top_res
                phase_row(f"enforce_rate_limit, {top} session(s), allowed", top_res, profile_path is not None)
                row("  runs, alternated with raw", f"{median(runs['ours']):,.0f} dec/s",
                    f"{spread(runs['ours'])}; the row above is the median run")
                denied = await run_rate_phase(
                    bb, denied_ids, cfg.warmup, cfg.denied_seconds, server.pid
                )
                phase_row(f"enforce_rate_limit, {cfg.denied_sessions} sessions, 1/s", denied)
            denied_payload, denied_commit = await stored_commit(
                url, settings.stream, subject_denied, auth=auth
            )
            last_kind = "+".join(type(e).__name__ for a in denied_commit.commands for e in a.events)
            row("  commit payload, last of a 1/s session", f"{len(denied_payload)} B", last_kind)
            ratio = median(runs["ours"]) / raw_rate
            ratio_h = median(runs["ours"]) / rawh_rate
            ratio_denied = denied.per_s / raw_rate
            row(f"ratio decisions/s @{top} ÷ raw msgs/s", f"{ratio:.3f}",
                f"target >= 0.6 (issue 15; raw without headers, as bench/commands.py); ratio of the medians "
                f"of {cfg.repetitions} alternated runs (ABBA)")
            row("  ÷ raw msgs/s with the 2 headers", f"{ratio_h:.3f}", "")
            row("  denied-heavy decisions/s ÷ raw msgs/s", f"{ratio_denied:.3f}",
                "one denied-heavy run (not alternated) ÷ the raw median")

        # -------------------------------------------------------------------- 3. pure decide
        pure = pure_decide(policy, cfg.pure_seconds)
        row("pure decide(), one core, no I/O", f"{pure['decide']:,.0f} dec/s",
            f"CheckRate({OPERATION!r}), 4 windows, busy session (log entries per window "
            f"s/m/h/d {pure['log_entries']}), {cfg.pure_seconds:.0f} s loop; target >= 200,000/s")
        row("  same, freshly created session", f"{pure['decide_fresh']:,.0f} dec/s",
            "empty rate logs: no window has anything to count yet")
        row("pure decide() + evolve()", f"{pure['decide_evolve']:,.0f} dec/s",
            "busy session, state carried forward, now +1 ms a step")
        row("pure decide() + apply_commands()", f"{pure['decide_apply']:,.0f} dec/s",
            "as the host folds a command: events + idempotency window")

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    all_phases = {**{str(n): p for n, p in phases.items()}, f"{cfg.denied_sessions}_denied": denied}
    result.update(
        ratio_vs_raw=round(ratio, 4),
        ratio_vs_raw_with_headers=round(ratio_h, 4),
        ratio_definition=(f"median enforce_rate_limit decisions/s at {top} allowed-heavy sessions / median "
                          f"raw js.publish_async msgs/s (no headers) of the same payload, "
                          f"{cfg.repetitions} runs each, alternated (ABBA)"),
        runs_per_s={k: [round(x, 1) for x in v] for k, v in runs.items()},
        decisions_per_s={k: round(p.per_s, 1) for k, p in all_phases.items()},
        allowed={k: p.allowed for k, p in all_phases.items()},
        denied={k: p.denied for k, p in all_phases.items()},
        raw_msgs_per_s=round(raw_rate, 1),
        raw_with_headers_msgs_per_s=round(rawh_rate, 1),
        pure_decide_per_s=round(pure["decide"], 1),
        pure_decide_fresh_per_s=round(pure["decide_fresh"], 1),
        pure_decide_evolve_per_s=round(pure["decide_evolve"], 1),
        pure_decide_apply_per_s=round(pure["decide_apply"], 1),
        p50_ms={k: round(p.p50_ms, 3) for k, p in all_phases.items()},
        p99_ms={k: round(p.p99_ms, 3) for k, p in all_phases.items()},
        payload_bytes=len(payload),
        denied_payload_bytes=len(denied_payload),
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


def cli() -> None:
    run_cli(__doc__, "cProfile the 1,000-session allowed phase into FILE", make_config, main)


if __name__ == "__main__":
    cli()
