"""Several hosts: two `blackbird serve` processes on one 3-node cluster share the command subjects
(one queue group), so when one is killed with SIGKILL under load, the other serves its sessions.

A remote client (``AsyncBlackbird(remote=True)``, short ``command_timeout``) sends every command
over NATS; a command in flight to the dead host (the test makes sure there is one) times out and is
retried with the same command id, and the surviving host applies it once. Every session has a
command acknowledged again within :data:`SERVED_AGAIN_WITHIN` of the kill; nothing acknowledged
is lost or applied twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from blackbird import AsyncBlackbird

from .conftest import TEST_MASTER_KEY
from .fault_load import TENANT, UsageLoad, check_nothing_lost
from .nats_cluster import NatsCluster

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]
REMOTE_TIMEOUT = 1.0  # seconds a remote command waits for a host before it is retried
SERVED_AGAIN_WITHIN = 2.0  # seconds from the kill until every session has been served again
READY_TIMEOUT = 30.0
BUDGET = 100.0
PROGRESS = 20
QUEUE = "blackbird-hosts"  # the hosts' queue group (Settings.queue_group)


class ServeProcess:
    """`blackbird serve --nats-url URL` as a subprocess writing three replicas; its stdout and
    stderr go to files, so it never blocks on a full pipe and its ready line can be polled."""

    def __init__(self, nats_url: str, folder: Path, name: str) -> None:
        self.out = folder / f"{name}.out"
        self.err = folder / f"{name}.err"
        env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKBIRD_")}
        env.update(BLACKBIRD_REPLICAS="3", BLACKBIRD_LOG_LEVEL="warning", BLACKBIRD_MASTER_KEY=TEST_MASTER_KEY)
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "blackbird._cli", "serve", "--nats-url", nats_url],
                cwd=folder, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            )

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while "blackbird ready" not in self.out.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"serve not ready (exit {self.proc.poll()}): {self.err.read_text(errors='replace')}")
            await anyio.sleep(0.05)

    def kill(self) -> float:
        at = time.monotonic()
        self.proc.kill()
        self.proc.wait()
        return at

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


async def test_two_serve_hosts_started_together_on_a_fresh_cluster_both_become_ready(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    # both processes start at once and create the stream and buckets at the same moment, as
    # hosts deployed together do
    hosts = [ServeProcess(nats_cluster.urls[i], tmp_path, f"serve-{i}") for i in (0, 1)]
    try:
        with anyio.fail_after(BUDGET):
            for host in hosts:
                await host.wait_ready()
    finally:
        for host in hosts:
            host.close()


async def test_killing_one_of_two_serve_hosts_under_load_its_sessions_are_served_by_the_other(
    nats_cluster: NatsCluster, tmp_path: Path
) -> None:
    urls = nats_cluster.urls
    hosts: list[ServeProcess] = []
    try:
        with anyio.fail_after(BUDGET):
            # one after the other (starting together is the test above); each on its own node,
            # so commands cross the cluster's routes to reach a host
            for i in (0, 1):
                hosts.append(ServeProcess(urls[i], tmp_path, f"serve-{i}"))
                await hosts[-1].wait_ready()
            async with AsyncBlackbird(
                remote=True, nats_url=urls[2], tenant=TENANT, command_timeout=REMOTE_TIMEOUT
            ) as remote:
                load = UsageLoad(remote)
                async with load.running():
                    await load.wait_progress(PROGRESS)
                    # the host about to die has been serving: its node delivered commands to it
                    deliveries = nats_cluster.queue_deliveries
                    while (served := await anyio.to_thread.run_sync(deliveries, 0, QUEUE)) < PROGRESS:
                        await anyio.sleep(0.05)
                    served = await anyio.to_thread.run_sync(deliveries, 0, QUEUE)
                    other = await anyio.to_thread.run_sync(deliveries, 1, QUEUE)
                    # so that a command is surely in flight to it when it dies: stopped until its
                    # node hands it one more command, then killed
                    hosts[0].proc.send_signal(signal.SIGSTOP)
                    while await anyio.to_thread.run_sync(deliveries, 0, QUEUE) <= served:
                        await anyio.sleep(0.01)
                    killed = hosts[0].kill()
                    await load.wait_progress(PROGRESS, after=killed)
                first = load.first_ack(killed)
                every = load.every_worker_acked(killed)
                assert first is not None and every is not None
                print(
                    f"\nkill -9 of one of two serve hosts (it had been sent {served} commands, the other {other}): "
                    f"first command acknowledged {first - killed:.2f}s after "
                    f"the kill, every session served again {every - killed:.2f}s after it; {load.summary()}"
                )
                async with AsyncBlackbird(nats_url=urls[2], tenant=TENANT, replicas=3) as fresh:
                    await check_nothing_lost(load, remote, fresh)
                assert load.untyped == [], load.untyped[:5]
                assert every - killed <= SERVED_AGAIN_WITHIN, load.summary()
                assert hosts[1].proc.poll() is None  # the survivor kept serving
    finally:
        for host in hosts:
            host.close()
