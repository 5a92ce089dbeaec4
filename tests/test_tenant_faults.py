"""A tenant's client under load while the secured embedded server restarts (a tenant added) and
while one of two hosts is killed: every acknowledged message is in the log once, and a stream
followed through the hosts' read service gets each once, in order. Real servers, no mocks."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio
import pytest

from blackbird import AsyncBlackbird
from blackbird.server.access import AccessFile, IssuedCredential
from blackbird.server.embedded import EmbeddedServer

from .conftest import TEST_MASTER_KEY

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
HOST = r"""
import sys, anyio
from blackbird import AsyncBlackbird
async def main():
    async with AsyncBlackbird(data_dir=sys.argv[1], serve_commands=True, command_timeout=5.0):
        print("ready", flush=True)
        await anyio.sleep_forever()
anyio.run(main)
"""


def _acme(access: AccessFile) -> IssuedCredential:
    access.add_tenant("acme")
    return access.issue("acme", name="app")


@pytest.fixture
async def data(tmp_path: Path) -> AsyncIterator[tuple[Path, IssuedCredential]]:
    folder = tmp_path / "data"
    yield folder, await EmbeddedServer.change_access(folder, _acme)


async def _load(client: AsyncBlackbird, session_id: str, count: int, acked: list[str], started: anyio.Event) -> None:
    """Post ``count`` messages at a steady pace; ``started`` is set once a quarter are acknowledged
    (the fault comes in the middle of the load, not before or after it)."""

    async def post(i: int) -> None:
        await client.session_manager.send_message(f"m{i}", session_id=session_id, command_id=f"post-{i}")
        acked.append(f"m{i}")
        if len(acked) == count // 4:
            started.set()

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(post, i)
            if i % 10 == 9:
                await anyio.sleep(0.02)  # a steady stream of commands, not one burst


async def _follow(client: AsyncBlackbird, session_id: str, until: int, got: list[str]) -> None:
    async with client.streams.subscribe(session_id) as stream:
        async for event in stream:
            got.append(event.text)
            if len(got) == until:
                return


async def _under_load(tenant: AsyncBlackbird, count: int, fault: Callable[[], Awaitable[object]]) -> str:
    """Create a session, post ``count`` messages while following its stream, and bring ``fault``
    on once a quarter are acknowledged; then every message was acknowledged and seen once.
    Returns the session id."""
    session = await tenant.session_manager.create_session(user_id="u1")
    acked: list[str] = []
    got: list[str] = []
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            tg.start_soon(_follow, tenant, session.session_id, count, got)
            started = anyio.Event()
            tg.start_soon(_load, tenant, session.session_id, count, acked, started)
            await started.wait()
            await fault()
            assert len(acked) < count  # the fault came while commands were still coming
    assert sorted(acked) == sorted(f"m{i}" for i in range(count))
    assert sorted(got) == sorted(acked) and len(set(got)) == count  # each once
    return session.session_id


async def test_a_tenants_stream_and_commands_ride_out_a_server_restart(data: tuple[Path, IssuedCredential]) -> None:
    folder, cred = data
    count = 120
    async with AsyncBlackbird(data_dir=folder, serve_commands=True, command_timeout=10.0) as host:
        async with AsyncBlackbird(
            nats_url=host.nats_url, remote=True, tenant="acme", nats_user=cred.user, nats_password=cred.password,
            command_timeout=10.0,
        ) as tenant:
            # a tenant added meanwhile restarts the server under the load
            session_id = await _under_load(
                tenant, count, lambda: EmbeddedServer.change_access(folder, lambda a: a.add_tenant("initech"))
            )
    async with AsyncBlackbird(data_dir=folder) as again:
        report = await again.audit.replay(session_id=session_id, tenant="acme")
        posted = [row for row in report.rows if row.what[0].startswith("MessagePosted")]
        assert len(posted) == count  # in the log exactly once each
        assert {row.who for row in report.rows} == {cred.user}


async def test_a_tenants_stream_rides_out_the_kill_of_one_of_two_hosts(data: tuple[Path, IssuedCredential]) -> None:
    folder, cred = data
    count = 120
    async with AsyncBlackbird(data_dir=folder, serve_commands=True, command_timeout=5.0) as host:
        other = subprocess.Popen(
            [sys.executable, "-c", HOST, str(folder)], stdout=subprocess.PIPE, text=True, cwd=REPO,
            env={"PYTHONPATH": str(REPO), "PATH": "", "BLACKBIRD_LOG_LEVEL": "error",
                 "BLACKBIRD_MASTER_KEY": TEST_MASTER_KEY},
        )
        try:
            assert other.stdout is not None and other.stdout.readline().strip() == "ready"
            async with AsyncBlackbird(
                nats_url=host.nats_url, remote=True, tenant="acme", nats_user=cred.user,
                nats_password=cred.password, command_timeout=10.0,
            ) as tenant:

                async def kill() -> None:  # the host serving some of the reads and commands
                    other.send_signal(signal.SIGKILL)

                session_id = await _under_load(tenant, count, kill)
        finally:
            other.kill()
            other.wait()
        report = await host.audit.replay(session_id=session_id, tenant="acme")
        assert len([row for row in report.rows if row.what[0].startswith("MessagePosted")]) == count
