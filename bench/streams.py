"""Benchmark: session streams (replay, live delivery, SSE) vs. raw nats-py on the same subject.

Run as ``python bench/streams.py [--quick] [--profile FILE] [--default-gc]``.

It starts its own nats-server (``blackbird.server.embedded.EmbeddedServer`` on a temporary data dir,
default fsync mode; our client and the raw one both connect as the data folder's service
identity: ``bench.commands.service_settings``), posts N chat messages to one session with
``send_message`` (one durable commit each, one after the other: ``--quick`` 5,000, else 30,000),
and measures

1. replay: ``bb.streams.subscribe(session_id)`` from the start until all N messages came out
   (decoded commits, ``StreamEvent`` each), next to a raw nats-py ordered consumer reading the
   same subject in the same run (a callback per message, counting; the payload not decoded).
   The two alternate, raw, ours, ours, raw, ... (``bench.commands.alternate``), for
   ``repetitions`` runs each (9: one replay takes a fraction of a second, so a single run is
   mostly noise on a shared machine); ``ratio_vs_raw`` = median of
   our messages/s ÷ median of raw messages/s;
2. resume: a subscription ``after`` the id of the message in the middle, until the last one:
   time to the first message and messages/s;
3. live latency: ``send_message`` called -> the subscriber holding the message (the durable
   append included), one at a time, p50/p99, and how long after the append's acknowledgement;
4. SSE: the same replay over HTTP (``blackbird.http.app`` on uvicorn, read with httpx, SSE parsed),
   messages/s;
5. SSE fan-out: 1, 10, 100 and 1,000 SSE clients of one session. The server (uvicorn + the
   client hosting the actors) runs in this process; the clients run in a second process (this file
   with ``fanout-client``: httpx streams, SSE parsed), because at 1,000 connections parsing on the
   client side would otherwise compete with the server in one event loop and its memory would
   count as the server's. Every client resumes from the log's end, so a warm-up message tells when
   all are following live; then ``send_message`` posts the level's messages one after the other.
   Reported: messages delivered per second (clients x messages / first post -> last delivery),
   p50/p99 delivery latency from ``send_message`` called (the durable append included) to a
   client holding the parsed event (wall clocks of two processes on one machine), and memory per
   idle connection (this process's RSS with every client connected and caught up, minus before,
   / clients: the subscription, its JetStream ordered consumer's state here, the ASGI connection).

A human-readable table goes to stdout; the very last line is one JSON object.
"""

from __future__ import annotations

import base64
import cProfile
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/streams.py``: make ``bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

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
from blackbird.server.embedded import EmbeddedServer

TENANT = "bench"
TOKEN = "bench-stream-token-0001"


@dataclass(frozen=True)
class Config:
    quick: bool
    messages: int
    live: int
    repetitions: int
    fanout: tuple[tuple[int, int], ...] = ()  # (clients, messages) per level


def make_config(quick: bool) -> Config:
    if quick:
        return Config(quick=True, messages=5_000, live=200, repetitions=9,
                      fanout=((1, 200), (10, 200), (100, 50), (1_000, 10)))
    return Config(quick=False, messages=30_000, live=1_000, repetitions=9,
                  fanout=((1, 1_000), (10, 1_000), (100, 300), (1_000, 50)))




async def raw_replay(url: str, stream: str, subject: str, n: int, *, auth: Mapping[str, Any]) -> float:
    """Seconds for a raw nats-py ordered consumer, connecting with ``auth`` (nats-py connect
    options), to receive ``n`` messages of ``subject``."""
    nc = await nats.connect(url, name="bench-raw", **auth)
    try:
        js = nc.jetstream()
        done = anyio.Event()
        count = 0

        async def cb(msg: Any) -> None:
            nonlocal count
            count += 1
            if count >= n:
                done.set()

        started = time.perf_counter()
        sub = await js.subscribe(
            subject, stream=stream, cb=cb, ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        await done.wait()
        elapsed = time.perf_counter() - started
        await sub.unsubscribe()
        return elapsed
    finally:
        await nc.close()


async def sse_replay(bb: AsyncBlackbird, session_id: str, n: int) -> float:
    """Seconds to read ``n`` messages of the session over SSE (uvicorn + httpx)."""
    import httpx

    from blackbird.http.app import http_server, sse_app

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    server = http_server(sse_app(bb, {TOKEN: TENANT}), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1/sessions/{session_id}/events"
    got = 0
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                started = time.perf_counter()
                async with http.stream("GET", url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
                    async for line in response.aiter_lines():
                        got += line.startswith("data: ")
                        if got == n:
                            break
                elapsed = time.perf_counter() - started
        finally:
            server.should_exit = True
    if got != n:
        raise RuntimeError(f"the SSE stream ended after {got} of {n} events")
    return elapsed


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


async def fanout_client(url: str, clients: int, messages: int) -> None:
    """The client side of the fan-out (run in its own process): ``clients`` SSE streams of
    ``url``; prints "ready" once every one has the warm-up event, then, once every one has
    ``messages`` more, one JSON line: the last delivery's wall-clock time and a latency sample."""
    import json

    import httpx

    ready = 0
    failed = 0  # streams the server ended before the warm-up (e.g. out of JetStream consumers)
    last = 0.0
    latencies: list[float] = []
    headers = {"Authorization": f"Bearer {TOKEN}"}

    def counted() -> None:
        if ready + failed == clients:
            print("ready", flush=True)

    async def client(http: httpx.AsyncClient, index: int) -> None:
        nonlocal ready, failed, last
        got = -1  # the warm-up first
        try:
            async with http.stream("GET", url, headers=headers) as response:
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    got += 1
                    if got == 0:
                        ready += 1
                        counted()
                        continue
                    now = time.time()
                    text = json.loads(line[6:])["text"]
                    if index < 100:  # a sample: 100 clients' every message is plenty
                        latencies.append(now - float(text.split()[-1]))
                    if got == messages:
                        last = max(last, now)
                        return
        except httpx.HTTPError:
            pass
        if got < 0:
            failed += 1
            counted()

    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=60), limits=limits) as http:
        async with anyio.create_task_group() as tg:
            for i in range(clients):
                tg.start_soon(client, http, i)
    print(json.dumps({"last": last, "latencies": latencies, "failed": failed}), flush=True)


async def fanout_level(
    bb: AsyncBlackbird, sid: str, base_url: str, clients: int, messages: int
) -> dict[str, float]:
    """One fan-out level: start the client process, wait until its clients follow live, post,
    collect (see the module's docstring, item 5)."""
    import json
    import subprocess

    last_seq = await bb.journal.last_seq_of(bb.journal.subjects.session(TENANT, sid))
    url = f"{base_url}/v1/sessions/{sid}/events?after={last_seq}"
    before = rss_bytes()
    proc = await anyio.open_process(
        [sys.executable, __file__, "fanout-client", url, str(clients), str(messages)],
        stdout=subprocess.PIPE, stderr=None,
    )
    assert proc.stdout is not None
    lines = proc.stdout
    buffer = b""

    async def next_line() -> str:
        nonlocal buffer
        while b"\n" not in buffer:
            chunk = await lines.receive()
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        return line.decode()

    try:
        with anyio.fail_after(300):
            # the clients resume after last_seq: each gets the warm-up, however late it connects
            await bb.session_manager.send_message("warm-up 0", session_id=sid)
            assert await next_line() == "ready"
            connected = rss_bytes()
            started = time.time()
            for i in range(messages):
                await bb.session_manager.send_message(f"fan {i} {time.time():.6f}", session_id=sid)
            posted = time.time()
            result = json.loads(await next_line())
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
    latencies = sorted(result["latencies"])
    elapsed = result["last"] - started
    served = clients - result["failed"]
    return {
        "clients": clients,
        "clients_refused": result["failed"],
        "messages": messages,
        "delivered_msgs_per_s": round(served * messages / elapsed, 1) if served else 0.0,
        "post_msgs_per_s": round(messages / (posted - started), 1),
        "latency_p50_ms": round(percentile(latencies, 0.5) * 1000, 2),
        "latency_p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
        "rss_per_idle_connection_kb": round((connected - before) / max(served, 1) / 1024, 1),
    }


async def fanout(bb: AsyncBlackbird, sid: str, levels: tuple[tuple[int, int], ...]) -> list[dict[str, float]]:
    """Every fan-out level against one uvicorn server in this process."""
    from blackbird.http.app import http_app, http_server

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)  # 1,000 clients connect at once
    server = http_server(http_app(bb, {TOKEN: TENANT}), "127.0.0.1", 0)
    out = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        try:
            for clients, messages in levels:
                out.append(await fanout_level(bb, sid, f"http://127.0.0.1:{sock.getsockname()[1]}", clients, messages))
        finally:
            server.should_exit = True
    return out


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    load_start = load_average()
    result: dict[str, Any] = {"bench": "streams"}
    with tempfile.TemporaryDirectory(prefix="bb-bench-") as tmp:
        async with EmbeddedServer(Path(tmp)) as server:
            url = server.url
            auth = server.service_auth()  # the raw clients' identity; ours: service_settings()
            print(f"nats-server {url} (embedded), fsync: {FSYNC}")
            print(f"mode: {'quick' if cfg.quick else 'full'}; python {sys.version.split()[0]}; "
                  f"{os.cpu_count()} cpus; load average {load_start} (other processes skew every "
                  f"figure); gc: {GC_MODE[0]}")
            print()
            row("measurement", "value", "detail")
            row("-" * 44, "-" * 16, "-" * 40)
            async with AsyncBlackbird(**service_settings(server), tenant=TENANT) as bb:
                s = await bb.session_manager.create_session("bench-user", tier="enterprise")
                sid = s.session_id
                started = time.perf_counter()
                for i in range(cfg.messages):
                    await bb.session_manager.send_message(f"message number {i} of the benchmark", session_id=sid)
                post_s = time.perf_counter() - started
                row(f"post {cfg.messages:,} messages", f"{cfg.messages / post_s:,.0f} msg/s",
                    "send_message one after the other: a durable commit each")
                subject = bb.journal.subjects.session(TENANT, sid)

                # 1. replay vs raw, alternated (raw, ours, ours, raw, ...)
                async def raw_side() -> float:
                    n = cfg.messages + 1
                    return n / await raw_replay(url, bb.journal.stream, subject, n, auth=auth)

                async def ours_side() -> float:
                    started = time.perf_counter()
                    async with bb.streams.subscribe(sid, coalesce=()) as stream:
                        for _ in range(cfg.messages):
                            await stream.__anext__()
                    return cfg.messages / (time.perf_counter() - started)

                runs = await alternate({"raw": raw_side, "ours": ours_side}, cfg.repetitions)
                raw_rate, replay_rate = median(runs["raw"]), median(runs["ours"])
                ratio = replay_rate / raw_rate
                row("raw nats-py ordered consumer", f"{raw_rate:,.0f} msg/s",
                    f"{cfg.messages + 1:,} messages of the session's subject, a callback each, not "
                    f"decoded; {spread(runs['raw'])}")
                row("streams.subscribe replay", f"{replay_rate:,.0f} msg/s",
                    f"{cfg.messages:,} StreamEvents from the start (commits decoded); {spread(runs['ours'])}")
                row("ratio replay msg/s ÷ raw msg/s", f"{ratio:.3f}",
                    f"ratio of the medians, {cfg.repetitions} runs each alternated with raw (ABBA)")
                if profile_path:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await ours_side()
                    profiler.disable()
                    profiler.dump_stats(profile_path)

                # 2. resume from the middle
                async with bb.streams.subscribe(sid, coalesce=()) as stream:
                    middle = None
                    for _ in range(cfg.messages // 2):
                        middle = await stream.__anext__()
                assert middle is not None
                started = time.perf_counter()
                async with bb.streams.subscribe(sid, after=middle.resume, coalesce=()) as stream:
                    await stream.__anext__()
                    first_s = time.perf_counter() - started
                    for _ in range(cfg.messages - cfg.messages // 2 - 1):
                        await stream.__anext__()
                resume_s = time.perf_counter() - started
                resumed = cfg.messages - cfg.messages // 2
                row("resume after the middle id", f"{first_s * 1000:.2f} ms",
                    f"to the first message; then {resumed / resume_s:,.0f} msg/s for {resumed:,} messages")

                # 3. live latency
                latencies: list[float] = []
                after_ack: list[float] = []
                async with bb.streams.subscribe(sid, after=f"{await bb.journal.last_seq_of(subject)}-0") as stream:
                    for i in range(cfg.live):
                        sent = time.perf_counter()
                        await bb.session_manager.send_message(f"live {i}", session_id=sid)
                        acked = time.perf_counter()
                        await stream.__anext__()
                        received = time.perf_counter()
                        latencies.append(received - sent)
                        after_ack.append(received - acked)
                latencies.sort()
                live_p50, live_p99 = percentile(latencies, 0.5) * 1000, percentile(latencies, 0.99) * 1000
                ack_p50 = statistics.median(after_ack) * 1000
                row("live: send_message called -> received", f"p50 {live_p50:.2f} ms",
                    f"p99 {live_p99:.2f} ms (the durable append included); {cfg.live} messages one at "
                    f"a time; after the append's ack the subscriber had it within {ack_p50:.2f} ms (p50)")

                # 4. SSE replay
                sse_s = await sse_replay(bb, sid, cfg.messages)
                sse_rate = cfg.messages / sse_s
                row("SSE replay over HTTP (uvicorn, httpx)", f"{sse_rate:,.0f} msg/s",
                    f"{cfg.messages:,} events from the start, parsed by the client")

                # 5. SSE fan-out (clients in a second process)
                fan = await fanout(bb, sid, cfg.fanout)
                for level in fan:
                    row(f"SSE fan-out to {level['clients']:,} clients", f"{level['delivered_msgs_per_s']:,.0f} msg/s",
                        f"delivered ({level['messages']} posted at {level['post_msgs_per_s']:,.0f}/s); latency p50 "
                        f"{level['latency_p50_ms']:.1f} ms, p99 {level['latency_p99_ms']:.1f} ms; "
                        f"{level['rss_per_idle_connection_kb']:.0f} KiB RSS per idle connection"
                        + (f"; {level['clients_refused']} streams ended at once" if level["clients_refused"] else ""))
    total = time.perf_counter() - t_start
    load_end = load_average()
    row("total wall time", f"{total:.1f} s", f"load average now {load_end}")
    result.update(
        ratio_vs_raw=round(ratio, 4),
        ratio_definition="median streams.subscribe replay msg/s / median raw nats-py ordered consumer msg/s, "
        "same subject, same run, the two alternated (ABBA)",
        messages=cfg.messages,
        post_msgs_per_s=round(cfg.messages / post_s, 1),
        raw_msgs_per_s=round(raw_rate, 1),
        replay_msgs_per_s=round(replay_rate, 1),
        repetitions=cfg.repetitions,
        raw_runs_msgs_per_s=[round(v, 1) for v in runs["raw"]],
        replay_runs_msgs_per_s=[round(v, 1) for v in runs["ours"]],
        resume_first_ms=round(first_s * 1000, 3),
        live_p50_ms=round(live_p50, 3),
        live_p99_ms=round(live_p99, 3),
        sse_msgs_per_s=round(sse_rate, 1),
        live_after_ack_p50_ms=round(ack_p50, 3),
        fanout=fan,
        fanout_definition="SSE clients of one session in a second process; delivered msg/s = clients x "
        "messages / (first post -> last delivery); latency from send_message called to the client holding "
        "the parsed event; RSS per idle connection = server process RSS delta / clients",
        **run_context(cfg.quick, load_start, load_end),
    )
    return result


def cli() -> None:
    run_cli(__doc__, "cProfile the replay into FILE", make_config, main)


if __name__ == "__main__":
    if sys.argv[1:2] == ["fanout-client"]:
        anyio.run(fanout_client, sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        cli()
