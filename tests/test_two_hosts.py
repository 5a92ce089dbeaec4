"""Two actor hosts in two processes racing on one session: optimistic concurrency keeps it
single-writer, so every acknowledged command is applied exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from blackbird import AsyncBlackbird

from .conftest import TEST_MASTER_KEY, NatsServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

# argv: url, session_id, name, count. Waits for "go" on stdin, then fires `count` touches at once
# (distinct ids "<name>-i") plus `count` touches with ids shared by both processes ("both-i").
# Prints one JSON line: the command ids whose commands were acknowledged.
WORKER = r"""
import json, sys, anyio
from blackbird import AsyncBlackbird, ConcurrencyConflictError

async def main():
    url, sid, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    acked = []
    async with AsyncBlackbird(nats_url=url, tenant="acme") as bb:
        await bb.session_manager.get_session(sid)  # activate before the race starts
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)

        async def touch(cid):
            try:
                await bb.session_manager.touch_session(sid, command_id=cid)
            except ConcurrencyConflictError:
                return  # not acknowledged: lost the race too often, the caller may retry
            acked.append(cid)

        async with anyio.create_task_group() as tg:
            for i in range(count):
                tg.start_soon(touch, f"{name}-{i}")
                tg.start_soon(touch, f"both-{i}")
    print(json.dumps(acked), flush=True)

anyio.run(main)
"""


def spawn(url: str, sid: str, name: str, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, url, sid, name, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={"BLACKBIRD_LOG_LEVEL": "error", "PATH": "", "PYTHONPATH": str(REPO),
                 "BLACKBIRD_MASTER_KEY": TEST_MASTER_KEY},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


async def test_two_hosts_apply_every_acknowledged_command_exactly_once(nats_server: NatsServer) -> None:
    count = 60
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as bb:
        s = await bb.session_manager.create_session("u1", tier="pro", session_id="contested")
        procs = [spawn(nats_server.url, s.session_id, name, count) for name in ("a", "b")]
        for p in procs:  # release both at once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        acked: list[str] = []
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            acked += json.loads(out.strip().splitlines()[-1])

        subject = bb.journal.subjects.session("acme", s.session_id)
        commits = [e.commit async for e in bb.journal.entries(subject)]
        applied = Counter(cid for c in commits for cid in c.command_ids)

    expected = {f"{n}-{i}" for n in ("a", "b") for i in range(count)} | {f"both-{i}" for i in range(count)}
    touches = {cid: n for cid, n in applied.items() if cid != applied_creation(applied)}
    assert set(acked) <= set(touches)  # everything acknowledged is in the log
    assert set(touches) <= expected  # nothing else is
    assert all(n == 1 for n in touches.values())  # and each is applied exactly once
    assert len(set(acked)) >= len(expected) * 0.9  # contention is survivable, not fatal
    assert [c.version for c in commits] == list(range(1, len(commits) + 1))  # gap-free history


def applied_creation(applied: Counter[str]) -> str:
    return next(iter(applied))  # the first commit is the creation
