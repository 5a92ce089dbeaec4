"""Negative controls: each "nothing wrong" check is shown to find the wrong thing when it is
there. A corrupted read model makes ``verify()`` name the projection and the field, and
``blackbird audit verify`` exit 1; erasure is shown to remove what was present before it (see
``test_forget_user_*`` below)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

from blackbird import AsyncBlackbird, QuotaType

from .conftest import NatsServer

pytestmark = pytest.mark.anyio

REPO_ROOT = Path(__file__).resolve().parents[1]


async def run_cli(*args: str) -> tuple[int, str, str]:
    """``blackbird ARGS`` as a subprocess, as a shell runs it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLACKBIRD_")}
    env["BLACKBIRD_LOG_LEVEL"] = "warning"
    done = await anyio.run_process(
        [sys.executable, "-m", "blackbird._cli", *args], check=False, env=env, cwd=REPO_ROOT
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


# --------------------------------------------------------------------------- verify


async def _activity_with_usage(bb: AsyncBlackbird) -> None:
    await bb.session_manager.create_session("u1", session_id="s1")
    await bb.session_manager.track_usage("s1", "llm", QuotaType.TOKENS, 150)


async def test_verify_names_the_projection_and_field_of_a_corrupted_live_model(bb: AsyncBlackbird) -> None:
    await _activity_with_usage(bb)
    assert await bb.projections.verify() == {"abuse": [], "activity": []}  # clean first

    runner = await bb.projections.caught_up("activity", await bb.journal.stream_last_seq())
    runner.model.tenants["acme"].counters.events += 1000  # a counter the log does not support
    del runner.model.tenants["acme"].users["u1"].counters.operations["llm"]  # a key gone

    found = await bb.projections.verify()
    assert found["abuse"] == []
    assert len(found["activity"]) == 2, found
    events, missing = sorted(found["activity"])
    assert events.startswith("activity.tenants.acme.counters.events: live '100") and "rebuilt '" in events
    assert missing == "activity.tenants.acme.users.u1.counters.operations.llm: only in rebuilt"
    assert await bb.audit.verify() == found  # the audit facade reports the same


async def test_cli_audit_verify_exits_1_naming_a_corrupted_checkpoint_and_0_once_rebuilt(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    async with AsyncBlackbird(nats_url=url, tenant="acme") as bb:
        await _activity_with_usage(bb)
        runner = await bb.projections.caught_up("activity", await bb.journal.stream_last_seq())
        assert await runner.checkpoint()  # a clean checkpoint the command line starts from

        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert (code, out) == (0, "activity: OK\n"), err

        # A bad checkpoint: the model stored in bb_projections counts 7 events the log never held.
        runner.model.tenants["acme"].counters.events += 7
        assert await runner.checkpoint()
        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert code == 1, (out, err)
        lines = out.splitlines()
        assert lines[0] == "activity: 1 difference(s)", out
        assert lines[1].startswith("  activity.tenants.acme.counters.events: live "), out
        assert len(lines) == 2, out

        code, out, err = await run_cli("audit", "verify", "--json", "--tenant", "acme", "--nats-url", url)
        assert code == 1, (out, err)
        assert '"activity.tenants.acme.counters.events: live' in out

        await runner.rebuild()  # folds the log again and checkpoints the good model
        code, out, err = await run_cli("audit", "verify", "--tenant", "acme", "--nats-url", url)
        assert (code, out) == (0, "activity: OK\n"), err
