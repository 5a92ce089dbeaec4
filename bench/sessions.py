"""Benchmark: memory per active and per passivated (idle) session on one host.

Run as ``python bench/sessions.py [--quick] [--sessions N] [--frames N]``.

It starts its own nats-server (as ``bench/commands.py`` does), opens
``AsyncBlackbird(tenant="bench", passivate_after=inf)`` (passivation is then done by hand, at
the moments measured: :meth:`AsyncBlackbird.passivate_idle` on every actor host, as each host's
own loop does after ``passivate_after``) with its default followers (abuse detection, learner),
and measures the resident set size (RSS, ``VmRSS`` of /proc/self/status, after ``gc.collect()``
and glibc ``malloc_trim(0)``):

1. *base*: after a warm-up of 500 sessions created, touched and passivated;
2. *active*: after N sessions (200,000; 20,000 with ``--quick``) were created (each for its own
   user, 200 at a time) and touched once: (RSS - base) / N per active session;
3. *passivated*: every actor passivated: (RSS - base) / N is an upper bound (memory freed is
   not always given back to the OS);
4. *passivated, traced*: another N/4 sessions (10,000 at most) created, touched and passivated with
   ``tracemalloc`` on (it counts only what was allocated while tracing and is still alive):
   the bytes still allocated / (N/4) is what each idle session keeps in this process, and the
   biggest allocation sites of it are listed. (RSS cannot tell this: the second round reuses
   the memory the first one freed.) The traced bytes per active session are given beside it.

Sessions per GB = 10^9 / bytes per session: active (RSS), passivated (traced; and the RSS upper
bound). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())

if __package__ in (None, ""):  # run as ``python bench/sessions.py``: the repo's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench.commands import create_sessions, load_average, row, service_settings
from blackbird import AsyncBlackbird
from blackbird.server.embedded import EmbeddedServer

TENANT = "bench"
WARMUP = 500
TRACED = 10_000  # sessions of the traced round at most (tracemalloc makes creation ~10x slower)
GB = 1e9


def rss() -> int:
    """Resident set size of this process in bytes (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def settle() -> int:
    """Collect garbage, give freed heap back to the OS where glibc can; the RSS then."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss()


def traced() -> int:
    return tracemalloc.get_traced_memory()[0] if tracemalloc.is_tracing() else 0


async def round_of(bb: AsyncBlackbird, n: int, label: str) -> float:
    """Create ``n`` sessions and touch each once; returns the seconds it took."""
    t0 = time.perf_counter()
    ids = await create_sessions(bb, n, label)
    limiter = anyio.CapacityLimiter(200)
    touch = bb.session_manager.touch_session

    async def one(sid: str) -> None:
        async with limiter:
            await touch(sid)

    async with anyio.create_task_group() as tg:
        for sid in ids:
            tg.start_soon(one, sid)
    return time.perf_counter() - t0


async def passivate(bb: AsyncBlackbird) -> int:
    dropped = bb.passivate_idle(0)
    await anyio.sleep(0.5)  # snapshots being saved, followers catching up
    return dropped


async def main(n: int, quick: bool, frames: int) -> dict[str, Any]:
    load_start = load_average()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(tmp) as server:
            print(f"nats-server {server.url} (embedded); mode: {'quick' if quick else 'full'}; "
                  f"{os.cpu_count()} cpus; load average {load_start}; N = {n:,}")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)
            settings = service_settings(server)
            async with AsyncBlackbird(**settings, tenant=TENANT, passivate_after=float("inf")) as bb:
                await round_of(bb, WARMUP, "warm")
                await passivate(bb)
                base = settle()

                took = await round_of(bb, n, "a")
                host = bb.host
                assert host is not None and host.active_actors >= n
                active = settle()
                row("create + touch", f"{n / took:,.0f} sessions/s", f"{n:,} sessions in {took:.1f} s")
                per_active = (active - base) / n
                row("RSS per active session", f"{per_active:,.0f} B",
                    f"{GB / per_active:,.0f} active sessions per GB")

                dropped = await passivate(bb)
                assert host.active_actors == 0
                idle = settle()
                per_idle_upper = max(idle - base, 1) / n
                row("RSS per passivated session (upper bound)", f"{per_idle_upper:,.0f} B",
                    f"{GB / per_idle_upper:,.0f} per GB; {dropped:,} actors passivated; RSS only "
                    "shrinks as far as the allocator gives memory back")

                m = max(min(n // 4, TRACED), 1)
                gc.collect()
                tracemalloc.start(frames)
                took2 = await round_of(bb, m, "b")
                gc.collect()
                active_t = traced()
                await passivate(bb)
                gc.collect()
                per_idle = max(traced(), 1) / m
                sites = tracemalloc.take_snapshot().statistics("traceback")
                tracemalloc.stop()
                row("traced per active session", f"{active_t / m:,.0f} B",
                    f"{m:,} more sessions created and touched under tracemalloc ({took2:.1f} s)")
                row("traced per passivated session", f"{per_idle:,.0f} B",
                    f"{GB / per_idle:,.0f} passivated sessions per GB (target >= 200,000); "
                    "what those sessions left allocated once passivated")
                print()
                print(f"biggest allocation sites left per passivated session (of {m:,}):")
                for st in sites[:8]:
                    where = [f"{Path(f.filename).name}:{f.lineno}" for f in st.traceback][-3:]
                    print(f"  {st.size / m:8.1f} B  {' < '.join(reversed(where))}")
    load_end = load_average()
    row("total wall time", f"{time.perf_counter() - t_start:.1f} s", f"load average now {load_end}")
    return {
        "bench": "sessions",
        "sessions": n,
        "memory": "active: RSS (VmRSS after gc.collect and malloc_trim); passivated: tracemalloc",
        "bytes_per_active_session": round(per_active),
        "bytes_per_passivated_session": round(per_idle),
        "bytes_per_passivated_session_upper_bound": round(per_idle_upper),
        "active_sessions_per_gb": round(GB / per_active),
        "passivated_sessions_per_gb": round(GB / per_idle),
        "passivated_sessions_per_gb_upper_bound": round(GB / per_idle_upper),
        "target_passivated_sessions_per_gb": 200_000,
        "traced_bytes_per_active_session": round(active_t / m),
        "create_touch_per_s": round(n / took, 1),
        "quick": quick,
        "load_average": {"start": load_start, "end": load_end},
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 sessions instead of 200,000")
    parser.add_argument("--sessions", type=int, help="how many sessions (overrides --quick's and the full count)")
    parser.add_argument("--frames", type=int, default=4, help="frames per traced allocation site (default 4)")
    args = parser.parse_args()
    n = args.sessions or (20_000 if args.quick else 200_000)
    result = anyio.run(main, n, args.quick, args.frames)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    cli()
