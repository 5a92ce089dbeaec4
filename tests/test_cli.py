"""The `blackbird` command line, end to end: `serve` runs as a real subprocess on a real
nats-server; `session ...` commands run as subprocesses too, so exit codes, stdout and stderr
are exactly what a shell sees. Synchronisation is by reading `serve`'s stdout up to its ready
line, never by sleeping."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from blackbird._cli import main
from blackbird.server.embedded import _free_port, _nats_running

from .conftest import TEST_MASTER_KEY

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "blackbird._cli"]
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
READY = re.compile(r"^blackbird ready nats_url=(nats://\S+)")


def _env() -> dict[str, str]:
    """This environment without BLACKBIRD_* settings a developer may have exported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKBIRD_")}
    env["BLACKBIRD_LOG_LEVEL"] = "warning"
    env["BLACKBIRD_MASTER_KEY"] = TEST_MASTER_KEY  # `serve --nats-url` hosts memory actors
    return env


class Serve:
    """A `blackbird serve` subprocess; stdout is read line by line in a thread."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.log_file = cwd / f"serve-{uuid.uuid4().hex[:8]}.log"
        self._stderr = open(self.log_file, "wb")  # a file: the server never blocks on a full pipe
        self.proc = subprocess.Popen(
            [*CLI, "serve", *args],
            cwd=cwd,
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)  # EOF: the process exited

    @property
    def stderr(self) -> str:
        return self.log_file.read_text(errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> str:
        """Read stdout until the ready line; return the NATS url it names."""
        while True:
            try:
                line = self._queue.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(
                    f"no ready line within {timeout}s; stdout={self.lines} stderr={self.stderr}"
                )
            if line is None:
                pytest.fail(
                    f"serve exited ({self.proc.wait()}) before ready; "
                    f"stdout={self.lines} stderr={self.stderr}"
                )
            self.lines.append(line)
            match = READY.match(line)
            if match:
                return match.group(1)

    def terminate(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM, then the exit code (fails the test if it takes longer than ``timeout``)."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve did not exit within {timeout}s of SIGTERM; stderr={self.stderr}")

    def close(self) -> None:
        """Stop it if it still runs: SIGTERM first, so that as the last user of its data folder
        it stops the embedded nats-server too (SIGKILL left that server running after the test),
        then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


@pytest.fixture
def serve_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Serve] = []

    def start(*args: str) -> Serve:
        proc = Serve(list(args), tmp_path)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


@pytest.fixture
def serve(serve_factory: Any, nats_server: Any) -> Serve:
    """`blackbird serve --nats-url <test server>`, ready."""
    proc = serve_factory("--nats-url", nats_server.url, "--log-level", "info")
    assert proc.wait_ready() == nats_server.url
    return proc


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=60
    )


def session_json(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert isinstance(data, dict)
    return data


def extract_snippet() -> str:
    text = (REPO_ROOT / "docs" / "cli.md").read_text()
    marker = text.index("<!-- raw-request-snippet -->")
    block = re.search(r"```python\n(.*?)```", text[marker:], re.DOTALL)
    assert block is not None, "docs/cli.md: no python block after the snippet marker"
    return block.group(1)


# --------------------------------------------------------------------------- serve + session


def test_serve_answers_session_commands_and_stops_on_sigterm(
    serve: Serve, nats_server: Any, tmp_path: Path
) -> None:
    url = nats_server.url
    out = "\n".join(serve.lines)
    assert "bbcmd.<tenant>.<session_id>" in out
    assert "bb.*.session.*" in out
    assert f"blackbird session create --user-id u1 --nats-url {url}" in out

    created = session_json(cli("session", "create", "--user-id", "u1", "--tier", "pro",
                               "--metadata", '{"team": "search"}', "--nats-url", url, cwd=tmp_path))
    assert created["user_id"] == "u1"
    assert created["tier"] == "pro"
    assert created["status"] == "active"
    assert created["metadata"] == {"team": "search"}
    assert created["is_active"] is True
    session_id = created["session_id"]

    got = session_json(cli("session", "get", session_id, "--nats-url", url, cwd=tmp_path))
    assert got["session_id"] == session_id
    assert got["user_id"] == "u1"

    bad = cli("session", "create", "--user-id", "a b", "--nats-url", url, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: user_id:")
    assert "Traceback" not in bad.stderr
    assert bad.stdout == ""

    bad_tier = cli("session", "create", "--user-id", "u1", "--tier", "gold", "--nats-url", url,
                   cwd=tmp_path)
    assert bad_tier.returncode == 2
    assert "tier" in bad_tier.stderr

    unknown = cli("session", "get", "unknown", "--nats-url", url, cwd=tmp_path)
    assert unknown.returncode == 1
    assert "unknown" in unknown.stderr and "not found" in unknown.stderr
    assert unknown.stdout == ""

    ended = session_json(cli("session", "terminate", session_id, "--reason", "done",
                             "--nats-url", url, cwd=tmp_path))
    assert ended["status"] == "terminated"
    again = cli("session", "terminate", session_id, "--nats-url", url, cwd=tmp_path)
    assert again.returncode == 1
    assert again.stderr.startswith("error: ") and "Traceback" not in again.stderr

    assert serve.terminate() == 0
    assert "serve_stopping" in serve.stderr
    assert "Traceback" not in serve.stderr


def test_session_create_is_idempotent_by_command_id(
    serve: Serve, nats_server: Any, tmp_path: Path
) -> None:
    args = ["session", "create", "--user-id", "u2", "--session-id", "s-idem",
            "--command-id", "c-1", "--nats-url", nats_server.url]
    first = session_json(cli(*args, cwd=tmp_path))
    second = session_json(cli(*args, cwd=tmp_path))  # a retry: same session, nothing appended
    assert second["session_id"] == first["session_id"] == "s-idem"
    assert second["version"] == first["version"] == 1
    other = cli("session", "create", "--user-id", "u2", "--session-id", "s-idem",
                "--nats-url", nats_server.url, cwd=tmp_path)
    assert other.returncode == 1
    assert "already exists" in other.stderr


# --------------------------------------------------------------------------- raw NATS (docs)


def test_raw_request_snippet_from_docs(serve: Serve, nats_server: Any, tmp_path: Path) -> None:
    namespace: dict[str, Any] = {"__name__": "docs_snippet"}
    exec(compile(extract_snippet(), "docs/cli.md", "exec"), namespace)
    session = asyncio.run(namespace["create_session"](nats_server.url))
    assert session["user_id"] == "u1"
    assert session["tier"] == "pro"
    assert session["status"] == "active"
    assert session["tenant"] == "default"

    # the session the raw request created is the one the CLI reads
    got = session_json(cli("session", "get", session["session_id"], "--nats-url", nats_server.url,
                           cwd=tmp_path))
    assert got["session_id"] == session["session_id"]


def test_raw_requests_retry_and_rejection(serve: Serve, nats_server: Any) -> None:
    async def scenario() -> None:
        nc = await nats.connect(nats_server.url)
        try:
            async def ask(subject: str, body: dict[str, Any]) -> dict[str, Any]:
                msg = await nc.request(subject, json.dumps(body).encode(), timeout=10)
                return json.loads(msg.data)

            request = {"command": {"type": "CreateSession", "user_id": "u1", "tier": "pro"},
                       "command_id": "raw-1"}
            first = await ask("bbcmd.acme.raw-s1", request)
            assert first["rejection"] is None and first["duplicate"] is False
            assert first["session"]["tenant"] == "acme"
            retry = await ask("bbcmd.acme.raw-s1", request)
            assert retry["duplicate"] is True
            assert retry["session"]["version"] == first["session"]["version"]

            bad = await ask("bbcmd.acme.raw-s2",
                            {"command": {"type": "CreateSession", "user_id": "a b"}})
            assert bad["session"] is None
            assert bad["rejection"]["code"] == "validation_error"
            assert bad["rejection"]["fields"]["field"] == "user_id"  # as the SDK names it

            missing = await ask("bbcmd.acme.raw-none", {"command": {"type": "GetSession"}})
            assert missing["rejection"]["code"] == "session_not_found"
        finally:
            await nc.drain()

    asyncio.run(scenario())


# --------------------------------------------------------------------------- embedded server


def test_serve_with_data_dir_runs_and_stops_its_embedded_server(
    serve_factory: Any, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    serve = serve_factory("--data-dir", str(data))
    url = serve.wait_ready()
    assert re.fullmatch(r"nats://127\.0\.0\.1:\d+", url)
    assert any(str(data) in line for line in serve.lines)
    state = json.loads((data / "nats" / "server.json").read_text())
    assert state["url"] == url
    pid = state["pid"]
    assert _nats_running(pid)

    # without --nats-url, the session commands find the server through the data folder
    created = session_json(cli("session", "create", "--user-id", "u1", "--data-dir", str(data),
                               cwd=tmp_path))
    assert created["status"] == "active"

    assert serve.terminate() == 0
    assert not (data / "nats" / "server.json").exists()
    assert not _nats_running(pid)

    gone = cli("session", "get", created["session_id"], "--data-dir", str(data), cwd=tmp_path)
    assert gone.returncode == 1
    assert "no running `blackbird serve` for data folder" in gone.stderr
    assert "Traceback" not in gone.stderr


def test_readme_quickstart_defaults_to_blackbird_data_in_cwd(
    serve_factory: Any, tmp_path: Path
) -> None:
    """`blackbird serve` then `blackbird session create ...` with no options, in one folder."""
    serve = serve_factory()
    serve.wait_ready()
    assert (tmp_path / "blackbird-data" / "nats" / "server.json").exists()
    created = session_json(cli("session", "create", "--user-id", "user123", "--tier", "pro",
                               cwd=tmp_path))
    got = session_json(cli("session", "get", created["session_id"], cwd=tmp_path))
    assert got["tier"] == "pro"
    assert serve.terminate() == 0
    assert not (tmp_path / "blackbird-data" / "nats" / "server.json").exists()


# --------------------------------------------------------------------------- errors, no server


def test_session_command_without_server_is_a_clear_error(tmp_path: Path) -> None:
    result = cli("session", "get", "s1", "--data-dir", str(tmp_path / "empty"), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: no running `blackbird serve` for data folder {tmp_path / 'empty'}; "
        "start it or pass --nats-url"
    )


def test_unreachable_nats_url_gives_up(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{_free_port()}"  # nothing listens there
    result = cli("session", "get", "s1", "--nats-url", url, "--connect-timeout", "1", cwd=tmp_path)
    assert result.returncode == 1
    assert f"error: could not reach NATS at {url}" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_serve_on_the_nats_server(nats_server: Any, tmp_path: Path) -> None:
    result = cli("session", "get", "s1", "--nats-url", nats_server.url, cwd=tmp_path)
    assert result.returncode == 1
    assert "blackbird serve" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_metadata_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["session", "create", "--user-id", "u1", "--metadata", "[1]",
                 "--nats-url", "nats://127.0.0.1:1"]) == 2
    assert capsys.readouterr().err.startswith("error: metadata: expected a JSON object")
    assert main(["session", "create", "--user-id", "u1", "--metadata", "{",
                 "--nats-url", "nats://127.0.0.1:1"]) == 2


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["session", "create"]) == 2  # --user-id is required
    assert "--user-id" in capsys.readouterr().err
    assert main(["session", "get", "s1", "--nats-url", "nats://x:1", "--data-dir", "d"]) == 2
    assert main(["--help"]) == 0


def test_serve_http_refuses_to_start_with_bad_tokens(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BLACKBIRD_HTTP_TOKENS", raising=False)
    args = ["serve", "--nats-url", "nats://127.0.0.1:1", "--http", "127.0.0.1:8080"]
    short = tmp_path / "tokens.json"
    short.write_text('{"short": "acme"}')
    assert main([*args, "--http-tokens", str(short)]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    monkeypatch.setenv("BLACKBIRD_HTTP_TOKENS", "not json")
    assert main(args) == 2
    assert "BLACKBIRD_HTTP_TOKENS: expected a JSON object" in capsys.readouterr().err
    assert main(["serve", "--http", "8080"]) == 2  # HOST:PORT
