"""Shared fixtures: a real nats-server (JetStream on) per test, on a free port, with its own
temporary store; a real 3-node JetStream cluster for the failover tests. Nothing here mocks NATS,
JetStream or LanceDB."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import pytest
from nats.aio.client import Client as NATS

from blackbird import AsyncBlackbird
from blackbird.http.app import http_app, http_server
from blackbird.server.embedded import _free_port, find_nats_server_binary

from .nats_cluster import NatsCluster, running_cluster, stop_process

os.environ.setdefault("BLACKBIRD_LOG_LEVEL", "warning")
#: The master key (blackbird.memory.master_key) of every client on the tests' external servers.
TEST_MASTER_KEY = "YmxhY2tiaXJkLXRlc3QtbWFzdGVyLWtleS0zMmJ5dGU="
os.environ.setdefault("BLACKBIRD_MASTER_KEY", TEST_MASTER_KEY)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class NatsServer:
    url: str
    port: int
    store: Path
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL the server (no graceful shutdown) and wait for it to die."""
        self.process.kill()
        self.process.wait(timeout=10)

    def start(self) -> None:
        """(Re)start the server on the same port and store."""
        self.process = _spawn(self.port, self.store)

    def pause(self) -> None:
        """SIGSTOP the server and return once it is stopped (it keeps its sockets, answers nothing)."""
        stop_process(self.process.pid)


def _spawn(port: int, store: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [find_nats_server_binary(), "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # The server prints "Server is ready" once it accepts clients: wait for that line, not a delay.
    assert proc.stderr is not None
    deadline = time.monotonic() + 15
    for raw in proc.stderr:
        if b"Server is ready" in raw:
            break
        if time.monotonic() > deadline:
            break
    else:
        raise RuntimeError(f"nats-server on port {port} exited with {proc.wait()}")
    # keep draining stderr so the server never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # type: ignore[union-attr]
    return proc


def start_nats(store: Path) -> NatsServer:
    store.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    return NatsServer(f"nats://127.0.0.1:{port}", port, store, _spawn(port, store))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream for one test."""
    server = start_nats(tmp_path / "js")
    try:
        yield server
    finally:
        server.process.kill()
        server.process.wait()


@pytest.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[NatsCluster]:
    """A fresh 3-node JetStream cluster on loopback (nodes ``node-0`` .. ``node-2``, each with its
    own ports and store), ready to place replicated streams; every node is killed afterwards.
    See :class:`tests.nats_cluster.NatsCluster` for the fault handles (kill, pause, restart, ...)."""
    async with running_cluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
async def bb(nats_server: NatsServer) -> AsyncIterator[AsyncBlackbird]:
    """An AsyncBlackbird hosting actors in this process, on the test's nats-server."""
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as client:
        yield client


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NATS]:
    """A plain nats-py connection to the test's nats-server (what any client of it can send)."""
    conn = await nats.connect(nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def serving_http(
    bb: AsyncBlackbird, tokens: Mapping[str, str], *, cors_origins: Sequence[str] = (), keys: Any = None
) -> AsyncIterator[str]:
    """``bb`` over HTTP (``http_app`` with ``tokens``, ``cors_origins`` and ``keys`` (a key verifier;
    default bb's API keys), heartbeats every 0.2 s) on a real uvicorn server on a free loopback
    port; yields its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # listening before the server runs: no request can arrive too early
    app = http_app(bb, tokens, cors_origins=cors_origins, heartbeat=0.2, keys=keys)
    server = http_server(app, "127.0.0.1", 0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: server.serve(sockets=[sock]))
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True


def new_id() -> str:
    return uuid.uuid4().hex
