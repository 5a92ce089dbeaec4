"""Benchmark: send_message's own overhead around an agent, and the learner's time-until-recallable.

Run as ``python bench/agents.py [--quick] [--profile FILE] [--default-gc]``.

It starts its own nats-server (``EmbeddedServer`` on a temporary data dir, default fsync mode),
connects ``AsyncBlackbird(**service_settings(server), tenant="bench")`` with a zero-latency agent
(an Agent whose ``respond`` yields one fixed chunk, with usage, at once) and measures

1. the agent called directly: ``async for chunk in agent.respond(context)`` on a prepared
   context, p50/p99 (the floor: what the agent itself costs);
2. ``bb.send_message(text, session_id, agent=...)`` with 1 session (one call after the other) and
   100 concurrent sessions (one worker each): messages/s and per-call p50/p99; the added latency
   is send_message's p50/p99 minus the direct call's (target p50 <= 5 ms). Every send_message is
   a full exchange: one admission (rate limit, concurrency slot, token reservation), the user's
   message and the reply persisted, the reservation settled, all durable appends; the context
   recall (memories of the user, tenant and agent scopes) runs too. The 1-session level
   alternates with the raw baseline of one durable append per call
   (``session_manager.send_message``, a channel message: the least a persisted exchange costs),
   ``alternate``: 3 runs each with ``--quick``, 5 without; medians reported;
3. extraction's time-until-recallable: a user message stating a fact ("My name is ... and I live
   in ...") is posted by the session's user to a fresh session's chat; the time until
   ``bb.learning.caught_up(sequence)`` returns and until ``memory.recall`` finds the fact (the
   learner runs off the reply path, as a projection of the conversation, with the real local
   embedding model).

Rate limits and concurrency of the sessions' tier are lifted by a tenant policy (they are what
is measured elsewhere, bench/ratelimit.py), so every call is admitted. A human-readable table
goes to stdout; the very last line is one JSON object.
"""

from __future__ import annotations

import base64
import cProfile
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/agents.py``: the repo's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench.commands import (
    FSYNC,
    GC_MODE,
    alternate,
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
from blackbird.agents.base import AgentChunk, AgentContext, Usage
from blackbird.server.embedded import EmbeddedServer

TENANT = "bench"
TIER = "enterprise"
REPLY = "ok"
AGENT_ID = "instant"
UNLIMITED = 10**9
#: the tenant policy lifting the tier's rate limits and concurrency (admission is still decided)
OPEN_POLICY = {
    "tiers": {
        TIER: {
            "rate_limits": {"default": {"per_second": UNLIMITED, "per_minute": UNLIMITED,
                                        "per_hour": UNLIMITED, "per_day": UNLIMITED}},
            "concurrency": {"total": 10_000, "default": 10_000},
        }
    }
}


class InstantAgent:
    """A zero-latency agent: yields one fixed chunk, with the usage a model would report, at once."""

    agent_id = AGENT_ID

    async def respond(self, context: AgentContext) -> AsyncIterator[AgentChunk]:
        yield AgentChunk(text=REPLY, usage=Usage(prompt_tokens=1, completion_tokens=1))


@dataclass(frozen=True)
class Config:
    quick: bool
    seconds: float  # timed run of one level
    warmup: float
    repetitions: int  # of the 1-session level, alternated with the raw append
    direct_calls: int
    facts: int  # extraction samples


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, seconds=3.0, warmup=0.5, repetitions=3, direct_calls=20_000, facts=10)
    return Config(quick=False, seconds=10.0, warmup=1.0, repetitions=5, direct_calls=100_000, facts=30)


@dataclass
class Phase:
    per_s: float
    p50_ms: float
    p99_ms: float
    calls: int


async def run_phase(ids: list[str], call: Callable[[str], Awaitable[Any]], warmup: float, seconds: float) -> Phase:
    """One worker per session, each awaiting ``call(session_id)`` in a loop; latencies after warmup."""
    clock = time.perf_counter
    latencies: list[float] = []
    start = clock()
    measure_from = start + warmup
    end = measure_from + seconds

    async def worker(sid: str) -> None:
        while True:
            t0 = clock()
            if t0 >= end:
                return
            await call(sid)
            t1 = clock()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(worker, sid)
    latencies.sort()
    return Phase(per_s=len(latencies) / seconds, p50_ms=1000 * percentile(latencies, 0.5),
                 p99_ms=1000 * percentile(latencies, 0.99), calls=len(latencies))


async def direct_latencies(agent: InstantAgent, calls: int) -> list[float]:
    context = AgentContext(tenant=TENANT, session_id="direct", user_id="u", tier=TIER, agent_id=AGENT_ID,
                           message="hello")
    clock = time.perf_counter
    out: list[float] = []
    for _ in range(calls):
        t0 = clock()
        async for _chunk in agent.respond(context):
            pass
        out.append(clock() - t0)
    out.sort()
    return out


async def create_sessions(bb: AsyncBlackbird, n: int, label: str) -> list[str]:
    ids = [f"{label}-{i}-{uuid.uuid4().hex[:6]}" for i in range(n)]
    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(lambda s: bb.session_manager.create_session(f"user-{s}", TIER, session_id=s), sid)
    return ids


async def time_until_recallable(bb: AsyncBlackbird, i: int, timeout: float = 30.0) -> tuple[float, float]:
    """Post a fact to a fresh session's chat; ms until the learner caught up, and until recall finds it."""
    city = "Zor" + "".join(chr(ord("a") + int(c, 16)) for c in uuid.uuid4().hex[:8])  # a new word each time
    user = f"learner-{i}-{uuid.uuid4().hex[:6]}"
    session = await bb.session_manager.create_session(user, TIER)
    clock = time.perf_counter
    t0 = clock()
    posted = await bb.session_manager.send_message(
        f"My name is Person{i} and I live in {city}", session_id=session.session_id, channel="chat", author=user
    )
    await bb.learning.caught_up(posted["sequence"], timeout)
    caught_up = clock() - t0
    with anyio.fail_after(timeout):
        while True:
            found = await bb.memory.recall(f"where do I live {city}", session_id=session.session_id, k=5)
            if any(city in m.text for m in found):
                break
            await anyio.sleep(0.005)
    return 1000 * caught_up, 1000 * (clock() - t0)


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "agents"}
    agent = InstantAgent()
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            print(f"nats-server {server.url} (embedded, store {server.store_dir}), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; load average {load_start}; gc: {GC_MODE[0]}")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)

            direct = await direct_latencies(agent, cfg.direct_calls)
            direct_p50, direct_p99 = 1000 * percentile(direct, 0.5), 1000 * percentile(direct, 0.99)
            row("agent called directly", f"{direct_p50 * 1000:.1f} us",
                f"p50; p99 {direct_p99 * 1000:.1f} us ({cfg.direct_calls:,} calls)")

            async with AsyncBlackbird(**service_settings(server), tenant=TENANT) as bb:
                bb.agents.register(agent)
                await bb.session_manager.set_tenant_policy(OPEN_POLICY)
                ids = {n: await create_sessions(bb, n, f"s{n}") for n in (1, 100)}

                async def exchange(sid: str) -> Any:
                    return await bb.send_message("hello", sid, agent=AGENT_ID)

                async def append(sid: str) -> Any:
                    return await bb.session_manager.send_message("hello", session_id=sid, channel="chat")

                ones: list[Phase] = []

                async def ours() -> float:
                    phase = await run_phase(ids[1], exchange, cfg.warmup, cfg.seconds)
                    ones.append(phase)
                    return phase.per_s

                async def raw() -> float:
                    return (await run_phase(ids[1], append, cfg.warmup, cfg.seconds)).per_s

                runs = await alternate({"send_message": ours, "append": raw}, cfg.repetitions)
                one = sorted(ones, key=lambda p: p.per_s)[len(ones) // 2]
                row("send_message, 1 session", f"{median(runs['send_message']):,.0f} msg/s",
                    f"{spread(runs['send_message'])}; median run p50 {one.p50_ms:.2f} ms p99 {one.p99_ms:.2f} ms")
                row("raw: one durable append, 1 session", f"{median(runs['append']):,.0f} msg/s",
                    f"session_manager.send_message; {spread(runs['append'])}")

                profiler = cProfile.Profile() if profile_path else None
                if profiler:
                    profiler.enable()
                hundred = await run_phase(ids[100], exchange, cfg.warmup, cfg.seconds)
                if profiler:
                    profiler.disable()
                    profiler.dump_stats(profile_path)
                row("send_message, 100 sessions", f"{hundred.per_s:,.0f} msg/s",
                    f"p50 {hundred.p50_ms:.2f} ms p99 {hundred.p99_ms:.2f} ms ({hundred.calls:,} calls)")
                added_p50, added_p99 = one.p50_ms - direct_p50, one.p99_ms - direct_p99
                row("added latency (1 session)", f"{added_p50:.2f} ms",
                    f"p50 (target <= 5 ms); p99 {added_p99:.2f} ms")

                await time_until_recallable(bb, -1)  # loads the embedding model: not timed
                samples = [await time_until_recallable(bb, i) for i in range(cfg.facts)]
                caught = sorted(s[0] for s in samples)
                recallable = sorted(s[1] for s in samples)
                row("extraction: learner caught up", f"{median(caught):.1f} ms",
                    f"median of {len(caught)}; max {caught[-1]:.1f} ms")
                row("extraction: recallable", f"{median(recallable):.1f} ms",
                    f"median of {len(recallable)}; max {recallable[-1]:.1f} ms "
                    "(posted -> recall finds the fact)")

    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    result.update(
        direct_p50_ms=round(direct_p50, 4), direct_p99_ms=round(direct_p99, 4),
        added_p50_ms=round(added_p50, 3), added_p99_ms=round(added_p99, 3),
        msgs_per_s={"1": round(median(runs["send_message"]), 1), "100": round(hundred.per_s, 1)},
        p50_ms={"1": round(one.p50_ms, 3), "100": round(hundred.p50_ms, 3)},
        p99_ms={"1": round(one.p99_ms, 3), "100": round(hundred.p99_ms, 3)},
        raw_append_msgs_per_s=round(median(runs["append"]), 1),
        ratio_vs_raw=round(median(runs["send_message"]) / median(runs["append"]), 4),
        ratio_definition=("median send_message msgs/s at 1 session / median durable-append msgs/s "
                          f"(session_manager.send_message) at 1 session, {cfg.repetitions} runs each, alternated"),
        runs_per_s={k: [round(x, 1) for x in v] for k, v in runs.items()},
        extraction_caught_up_ms={"p50": round(median(caught), 1), "max": round(caught[-1], 1)},
        extraction_recallable_ms={"p50": round(median(recallable), 1), "max": round(recallable[-1], 1),
                                  "samples": len(recallable)},
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


if __name__ == "__main__":
    run_cli(__doc__ or "", "cProfile the 100-session phase into FILE", make_config, main)
