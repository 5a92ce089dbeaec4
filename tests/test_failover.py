"""Failover without waiting for timeouts, on a real single nats-server (and one 3-node cluster).

* ``nats_url`` takes several servers (comma-separated, as NATS tools take them, or a list) and
  refuses a malformed one naming the setting;
* a server killed with kill -9 mid-load and restarted on its port and store: nothing
  acknowledged is lost or doubled, every call returns or raises a typed error in time, and
  commands flow again about as soon as the server is back (the figure is printed);
* a server paused (SIGSTOP) past ``command_timeout``: every call raises a typed error within
  its timeout, and once resumed (SIGCONT) commands flow again, nothing lost;
* a client does not lower a shared stream: a ``replicas=1`` client leaves a three-replica
  stream at three replicas, and a stream with other limits keeps them (only missing subjects
  are added); everything a ``replicas=3`` client creates has three replicas;
* background work that fails does not end the client (a checkpoint store that disappears);
* a remote client with no host to answer raises CommandTimeoutError within its timeout.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import nats
import pytest
from nats.js.api import StorageType, StreamConfig

from blackbird import AsyncBlackbird, BlackbirdError, CommandTimeoutError, PayloadTooLargeError, ValidationError
from blackbird.config import build_settings
from blackbird.server.embedded import EmbeddedServer, _free_port

from .conftest import NatsServer
from .fault_load import TENANT, UsageLoad, check_nothing_lost
from .nats_cluster import NatsCluster

pytestmark = pytest.mark.anyio

SLACK = 2.0  # seconds a call may overrun its timeout on a loaded 2-core machine before it "hangs"
BUDGET = 100.0  # seconds a whole test may take (pytest's own timeout is 120 s)


def client(url: str | list[str], **options: Any) -> AsyncBlackbird:
    return AsyncBlackbird(nats_url=url, tenant=TENANT, **options)


# --------------------------------------------------------------------------- nats_url


async def test_nats_url_takes_several_servers_comma_separated_or_as_a_list(
    nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    nobody = f"nats://127.0.0.1:{_free_port()}"  # nothing listens there: the other one is used
    for given in (f"{nobody},{nats_server.url}", f" {nobody} , {nats_server.url} ", [nobody, nats_server.url]):
        async with client(given) as bb:
            assert bb.nats_url == f"{nobody},{nats_server.url}"
            s = await bb.session_manager.create_session("u1")
            assert (await bb.session_manager.get_session(s.session_id)) is not None
    monkeypatch.setenv("BLACKBIRD_NATS_URL", f"{nobody},{nats_server.url}")
    async with AsyncBlackbird(tenant=TENANT) as bb:
        assert bb.settings.nats_servers == [nobody, nats_server.url]
        await bb.session_manager.create_session("u2")


@pytest.mark.parametrize(
    "bad",
    ["nats://a:4222,,nats://b:4222", "http://a:4222", "nats://:4222", "nats://a:99999", "nats://a:4222/path",
     "ws://a:1,nats://b:2", "", [], ["nats://a:4222", 4222], 4222],
)
def test_a_malformed_nats_url_is_refused_naming_the_setting(bad: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        build_settings(nats_url=bad)
    assert caught.value.field == "nats_url"
    assert "nats_url: expected a NATS server URL" in str(caught.value)


async def test_an_unreachable_server_list_is_an_embedded_server_error_naming_every_url() -> None:
    urls = [f"nats://127.0.0.1:{_free_port()}", f"nats://127.0.0.1:{_free_port()}"]
    started = time.monotonic()
    with pytest.raises(BlackbirdError) as caught:
        async with client(urls, command_timeout=2.0):
            pass
    assert time.monotonic() - started < 2.0 + SLACK
    assert ",".join(urls) in str(caught.value)


# --------------------------------------------------------------------------- a restarted server


async def test_a_server_killed_mid_load_and_restarted_loses_nothing_and_commands_resume_when_it_is_back(
    nats_server: NatsServer,
) -> None:
    timeout = 5.0
    with anyio.fail_after(BUDGET):
        async with client(nats_server.url, command_timeout=timeout) as bb:
            load = UsageLoad(bb)
            async with load.running():
                await load.wait_progress(20)
                killed = time.monotonic()
                nats_server.kill()
                await anyio.sleep(2.0)  # the outage being simulated: the server stays dead 2 s
                await anyio.to_thread.run_sync(nats_server.start)  # returns once it accepts clients
                back = time.monotonic()
                await load.wait_progress(20, after=back, timeout=30)
            first, every = load.first_ack(back), load.every_worker_acked(back)
            assert first is not None and every is not None
            print(
                f"\nkill -9 and restart of the server: back {back - killed:.2f}s after the kill; first command "
                f"acknowledged {first - back:.2f}s after it was back, every session {every - back:.2f}s after; "
                f"{load.summary()}"
            )
            assert not load.untyped, load.untyped[:5]
            assert load.longest_attempt <= timeout + SLACK, load.summary()
            assert every - back < 3.0, "commands should flow again within about a second of the server's return"
            await check_nothing_lost(load, bb)  # also: the read models (runners) survived and verify


async def test_a_killed_embedded_server_started_again_for_its_folder_takes_its_port_and_its_clients_resume(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    with anyio.fail_after(BUDGET):
        async with AsyncBlackbird(data_dir=data, tenant=TENANT, command_timeout=5.0) as bb:
            state = json.loads((data / "nats" / "server.json").read_text())
            load = UsageLoad(bb)
            async with load.running():
                await load.wait_progress(10)
                os.kill(state["pid"], signal.SIGKILL)
                await anyio.sleep(1.0)  # the outage being simulated
                # what `blackbird serve` (or any client) opening the folder again does
                async with EmbeddedServer(data) as again:
                    back = time.monotonic()
                    assert again.started_here and again.url == f"nats://127.0.0.1:{state['port']}"
                    await load.wait_progress(10, after=back, timeout=30)
                    every = load.every_worker_acked(back)
                    assert every is not None
                    print(f"\nembedded server killed and started again: every session served "
                          f"{every - back:.2f}s after it was back; {load.summary()}")
            assert not load.untyped, load.untyped[:5]
            await check_nothing_lost(load, bb)
    assert EmbeddedServer.running_url(data) is None  # the last user out stopped the new server


# --------------------------------------------------------------------------- a paused server


async def timed(call: Callable[[], Awaitable[Any]]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        await call()
    except Exception as exc:
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


async def test_a_server_paused_past_the_timeout_gives_typed_errors_in_time_then_commands_flow_again(
    nats_server: NatsServer,
) -> None:
    timeout = 2.0
    with anyio.fail_after(BUDGET):
        async with client(nats_server.url, command_timeout=timeout) as bb:
            sm = bb.session_manager
            session = await sm.create_session("paused-user", tier="enterprise")
            other = await sm.create_session("paused-user", tier="enterprise")
            await sm.get_statistics()  # the activity read model runs
            load = UsageLoad(bb)
            async with load.running():
                await load.wait_progress(20)
                nats_server.pause()
                try:
                    paused = time.monotonic()
                    calls: dict[str, Callable[[], Awaitable[Any]]] = {
                        "track_usage": lambda: sm.track_usage(session.session_id, "op", "tokens", 1),
                        "queued get_session": lambda: sm.get_session(session.session_id),
                        "get_session": lambda: sm.get_session(other.session_id),
                        "create_session": lambda: sm.create_session("paused-user-2"),
                        "get_statistics": lambda: sm.get_statistics(),
                        "stream_last_seq": lambda: bb.journal.stream_last_seq(),
                    }
                    async with anyio.create_task_group() as tg:
                        outcomes: dict[str, tuple[float, BaseException | None]] = {}

                        async def run(name: str, call: Callable[[], Awaitable[Any]]) -> None:
                            outcomes[name] = await timed(call)

                        for name, call in calls.items():
                            tg.start_soon(run, name, call)
                    held = time.monotonic() - paused
                finally:
                    os.kill(nats_server.process.pid, signal.SIGCONT)
                resumed = time.monotonic()
                await load.wait_progress(20, after=resumed, timeout=30)
            every = load.every_worker_acked(resumed)
            assert every is not None
            print(
                f"\nSIGSTOP for {held:.2f}s: "
                + ", ".join(f"{n} {'raised ' + type(e).__name__ if e else 'returned'} after {t:.2f}s"
                            for n, (t, e) in outcomes.items())
                + f"; every session served again {every - resumed:.2f}s after SIGCONT; {load.summary()}"
            )
            for name, (took, error) in outcomes.items():
                assert isinstance(error, BlackbirdError), f"{name}: {error!r}"
                assert took <= timeout + SLACK, f"{name} took {took:.2f}s"
            # A call queued behind another call to the same session: its deadline counts from
            # when it was made, not from when its turn came (that took twice the timeout).
            assert outcomes["queued get_session"][0] < 1.5 * timeout, outcomes["queued get_session"]
            assert not load.untyped, load.untyped[:5]
            assert load.longest_attempt <= timeout + SLACK, load.summary()
            await check_nothing_lost(load, bb)


# --------------------------------------------------------------------------- replicas and limits


async def stream_configs(urls: list[str], names: list[str]) -> dict[str, Any]:
    nc = await nats.connect(servers=urls)
    try:
        js = nc.jetstream(timeout=5)
        return {name: (await js.stream_info(name)).config for name in names}
    finally:
        await nc.close()


CREATED = ["BLACKBIRD", "KV_bb_snapshots", "KV_bb_projections", "OBJ_bb_projection_models", "KV_bb_keys"]


async def test_a_one_replica_client_does_not_shrink_what_a_three_replica_client_created(
    nats_cluster: NatsCluster,
) -> None:
    with anyio.fail_after(BUDGET):
        async with client(nats_cluster.nats_url, replicas=3) as wide:
            s = await wide.session_manager.create_session("u1")
            assert wide.journal.replicas == 3
        before = await stream_configs(nats_cluster.urls, CREATED)
        assert {name: c.num_replicas for name, c in before.items()} == dict.fromkeys(CREATED, 3)
        async with client(nats_cluster.nats_url) as narrow:  # replicas=1, the default
            assert narrow.settings.replicas == 1 and narrow.journal.replicas == 3
            await narrow.session_manager.touch_session(s.session_id)
            assert (await narrow.session_manager.get_session(s.session_id)) is not None
        after = await stream_configs(nats_cluster.urls, CREATED)
        assert after == before


async def test_an_existing_stream_only_gains_missing_subjects_and_keeps_its_own_limits(
    nats_server: NatsServer,
) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await nc.jetstream().add_stream(StreamConfig(
            name="BLACKBIRD", subjects=["bb.*.session.*"], storage=StorageType.FILE, duplicate_window=600,
            max_msg_size=8192, allow_direct=True, description="made by the operator",
        ))
        async with client(nats_server.url, duplicate_window=60.0) as bb:
            s = await bb.session_manager.create_session("u1", metadata={"note": "x" * 1000})
            assert s.metadata["note"] == "x" * 1000
            # the stream's smaller message limit holds: a larger commit is refused before it is sent
            with pytest.raises(PayloadTooLargeError):
                await bb.session_manager.create_session("u1", metadata={"note": "x" * 10_000})
        config = (await nc.jetstream().stream_info("BLACKBIRD")).config
    finally:
        await nc.close()
    assert set(config.subjects or []) == {"bb.*.session.*", "bb.*.user.*", "bb.*.tenant", "bb.*.memory.*"}
    assert (config.duplicate_window, config.max_msg_size, config.description) == (600, 8192, "made by the operator")


# --------------------------------------------------------------------------- background work


async def test_a_checkpoint_store_that_disappears_ends_nothing(nats_server: NatsServer) -> None:
    with anyio.fail_after(BUDGET):
        async with client(nats_server.url, command_timeout=2.0) as bb:
            sm = bb.session_manager
            s = await sm.create_session("u1")
            await sm.track_usage(s.session_id, "op", "tokens", 5)
            assert (await sm.get_statistics())["total_sessions"] == 1
            nc = await nats.connect(nats_server.url)
            try:
                await nc.jetstream().delete_stream("OBJ_bb_projection_models")  # checkpoints cannot be written
            finally:
                await nc.close()
            assert await bb.projections.rebuild("activity") > 0  # its checkpoint fails: logged, not raised
            await sm.track_usage(s.session_id, "op", "tokens", 5)
            stats = await sm.get_statistics()
            assert stats["total_sessions"] == 1
            assert (await sm.get_quota(s.session_id, "tokens"))["used"] == 10
        # and the client closed, in time, although its last checkpoint could not be written


async def test_a_remote_client_with_no_host_raises_command_timeout_within_its_timeout(
    nats_server: NatsServer,
) -> None:
    async with client(nats_server.url):  # a host creates the stream, then leaves
        pass
    async with client(nats_server.url, remote=True, command_timeout=1.0) as remote:
        took, error = await timed(lambda: remote.session_manager.touch_session("s1"))
    assert isinstance(error, CommandTimeoutError), repr(error)
    assert took <= 1.0 + SLACK
    assert "no actor host" in str(error)
