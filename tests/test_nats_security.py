"""Tenants walled by NATS itself: the embedded server's accounts, tenant credentials, and the
attacks of issue 11 tried with real connections (raw nats-py and the SDK) against a real,
secured embedded nats-server. Nothing is mocked."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import msgspec
import nats
import nats.errors
import pytest

from blackbird import AccessDeniedError, AsyncBlackbird, ValidationError
from blackbird.server.access import AccessFile, IssuedCredential, inbox_prefix
from blackbird.server.embedded import EmbeddedServer

from .nats_raw import Raw, raw_connect

pytestmark = pytest.mark.anyio


@dataclass
class Walls:
    data_dir: Path
    host: AsyncBlackbird  # serve_commands=True, the service identity
    acme: IssuedCredential
    globex: IssuedCredential

    @property
    def url(self) -> str:
        assert self.host.nats_url is not None
        return self.host.nats_url

    def tenant_client(self, cred: IssuedCredential, **options: object) -> AsyncBlackbird:
        return AsyncBlackbird(
            nats_url=self.url, remote=True, tenant=cred.tenant, nats_user=cred.user, nats_password=cred.password,
            command_timeout=5.0, **options,
        )


async def raw(url: str, cred: IssuedCredential | None) -> Raw:
    options: dict[str, object] = {}
    if cred is not None:
        options = {"user": cred.user, "password": cred.password, "inbox_prefix": inbox_prefix(cred.user)}
    return await raw_connect(url, **options)


def _issue(access: AccessFile) -> tuple[IssuedCredential, IssuedCredential]:
    access.add_tenant("acme")
    access.add_tenant("globex")
    return access.issue("acme", name="app"), access.issue("globex", name="app")


@pytest.fixture
async def walls(tmp_path: Path) -> AsyncIterator[Walls]:
    data = tmp_path / "data"
    acme, globex = await EmbeddedServer.change_access(data, _issue)  # before the server starts
    async with AsyncBlackbird(data_dir=data, serve_commands=True, tenant="acme", command_timeout=5.0) as host:
        yield Walls(data, host, acme, globex)


# --------------------------------------------------------------------------- the server's files


async def test_the_embedded_server_refuses_connections_without_credentials(walls: Walls) -> None:
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(walls.url, allow_reconnect=False, max_reconnect_attempts=0)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(walls.url, user="acme:app", password="wrong", allow_reconnect=False)
    assert walls.url.startswith("nats://127.0.0.1:")  # loopback only
    for name in ("access.json", "server.conf"):
        path = walls.data_dir / "nats" / name
        assert path.stat().st_mode & 0o777 == 0o600, name
    stored = "".join((walls.data_dir / "nats" / name).read_text() for name in ("access.json", "server.conf"))
    assert walls.acme.password not in stored and walls.globex.password not in stored  # hashes only


async def test_development_mode_is_secured_and_needs_no_configuration() -> None:
    async with AsyncBlackbird(development_mode=True) as bb:
        session = await bb.session_manager.create_session(user_id="u1")
        assert (await bb.session_manager.get_session(session.session_id)).user_id == "u1"
        assert bb.nats_url is not None
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(bb.nats_url, allow_reconnect=False, max_reconnect_attempts=0)


# --------------------------------------------------------------------------- the attacks


async def test_a_tenant_cannot_command_another_tenants_session(walls: Walls) -> None:
    victim = await walls.host.session_manager.create_session(user_id="v", tenant="globex")
    attacker = await raw(walls.url, walls.acme)
    try:
        body = json.dumps({"command": {"type": "AdjustQuota", "resource_type": "tokens", "limit": 1e15}}).encode()
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request(f"bbcmd.globex.{victim.session_id}", body, timeout=1)
        await attacker.violation(f"bbcmd.globex.{victim.session_id}")
    finally:
        await attacker.nc.close()
    after = await walls.host.session_manager.get_session(victim.session_id, tenant="globex")
    assert after.version == victim.version  # nothing was applied
    # the SDK on tenant credentials refuses before sending
    async with walls.tenant_client(walls.acme) as acme:
        with pytest.raises(AccessDeniedError) as denied:
            await acme.session_manager.get_session(victim.session_id, tenant="globex")
        assert denied.value.tenant == "globex"


async def test_operator_actions_need_the_service_identity(walls: Walls) -> None:
    async with walls.tenant_client(walls.acme) as acme:
        own = await acme.session_manager.create_session(user_id="u1")
        with pytest.raises(AccessDeniedError) as denied:
            await acme.session_manager.adjust_quota(own.session_id, "tokens", 1e15)
        assert denied.value.action == "AdjustQuota" and denied.value.principal == walls.acme.user
        with pytest.raises(AccessDeniedError):
            await acme.session_manager.change_tier(own.session_id, "enterprise")
        with pytest.raises(AccessDeniedError):
            await acme.session_manager.set_tenant_policy({"tiers": {"free": {"max_sessions": 10**9}}})
    # the service identity still may
    await walls.host.session_manager.adjust_quota(own.session_id, "tokens", 5000.0)


async def test_a_tenant_cannot_subscribe_to_or_replay_another_tenants_events(walls: Walls) -> None:
    victim = await walls.host.session_manager.create_session(user_id="v", tenant="globex")
    attacker = await raw(walls.url, walls.acme)
    try:
        for subject in ("bb.>", "bb.globex.>", f"bb.globex.session.{victim.session_id}", ">", "_INBOX.>"):
            await attacker.nc.subscribe(subject)
            await attacker.violation(subject)
        # the JetStream API: the tenant's account has none, and may not even ask beyond $JS.API.INFO
        info = await attacker.nc.request("$JS.API.INFO", b"", timeout=2)
        assert b"not enabled for account" in info.data
        consumer = {"stream_name": "BLACKBIRD", "config": {"filter_subject": "bb.globex.>", "deliver_subject": "x"}}
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request(
                "$JS.API.CONSUMER.CREATE.BLACKBIRD.c.bb.globex.>", json.dumps(consumer).encode(), timeout=1
            )
        await attacker.violation("$JS.API.CONSUMER.CREATE.BLACKBIRD")
        # the hosts' read service: another tenant's subject is refused whichever way it is asked
        read = json.dumps({"filter": "bb.globex.>"}).encode()
        answer = json.loads((await attacker.nc.request("bbsvc.acme.log", read, timeout=5)).data)
        assert answer["rejection"]["code"] == "validation_error" and answer["records"] == []
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request("bbsvc.globex.log", read, timeout=1)
        await attacker.violation("bbsvc.globex.log")
    finally:
        await attacker.nc.close()
    async with walls.tenant_client(walls.acme) as acme:
        with pytest.raises(AccessDeniedError):
            async with acme.streams.subscribe(victim.session_id, tenant="globex"):
                pass
        with pytest.raises((AccessDeniedError, ValidationError)):
            await acme.audit.replay(session_id=victim.session_id, tenant="globex")


@pytest.mark.parametrize(
    "subject",
    [
        "$JS.API.STREAM.NAMES",
        "$JS.API.STREAM.LIST",
        "$JS.API.STREAM.INFO.BLACKBIRD",
        "$JS.API.CONSUMER.LIST.BLACKBIRD",
        "$JS.API.STREAM.MSG.GET.KV_bb_keys",
        "$JS.API.DIRECT.GET.KV_bb_keys.$KV.bb_keys.x",
        "$JS.API.STREAM.INFO.KV_bb_snapshots",
        "$JS.API.STREAM.INFO.OBJ_bb_projection_snapshots",
        "$KV.bb_keys.acme.u1",
    ],
)
async def test_a_tenant_reaches_no_bucket_object_store_or_jetstream_object(walls: Walls, subject: str) -> None:
    attacker = await raw(walls.url, walls.acme)
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await attacker.nc.request(subject, b"{}", timeout=1)
        await attacker.violation(subject)
    finally:
        await attacker.nc.close()


async def test_the_principal_is_the_authenticated_identity_never_the_payload(walls: Walls) -> None:
    async with walls.tenant_client(walls.acme) as acme:
        session = await acme.session_manager.create_session(user_id="u1")
    attacker = await raw(walls.url, walls.acme)
    try:
        forged = {"command": {"type": "TouchSession"}, "principal": "admin@globex"}
        headers = {"Nats-Request-Info": json.dumps({"acc": "BLACKBIRD", "user": "blackbird"})}
        reply = await attacker.nc.request(
            f"bbcmd.acme.{session.session_id}", json.dumps(forged).encode(), timeout=5, headers=headers
        )
        assert json.loads(reply.data)["rejection"] is None
    finally:
        await attacker.nc.close()
    report = await walls.host.audit.replay(session_id=session.session_id)
    assert [row.who for row in report.rows] == [walls.acme.user, walls.acme.user]
    # the service identity names whom it acts for (the HTTP API does so for its API keys)
    await walls.host.session_manager.touch_session(session.session_id)
    report = await walls.host.audit.replay(session_id=session.session_id)
    assert report.rows[-1].who == walls.host.settings.principal


# --------------------------------------------------------------------------- legitimate paths


async def test_tenant_credentials_reach_commands_streams_and_audits_of_their_tenant(walls: Walls) -> None:
    async with walls.tenant_client(walls.acme) as acme:
        assert acme.tenant_credentials
        session = await acme.session_manager.create_session(user_id="u1", tier="pro")
        await acme.session_manager.track_usage(session.session_id, "chat", "tokens", 12)
        await acme.session_manager.enforce_rate_limit(session.session_id, "chat")
        await acme.session_manager.send_message("hello", session_id=session.session_id)
        async with acme.streams.subscribe(session.session_id) as stream:
            first = await anext(aiter(stream))
            assert first.text == "hello"
            await walls.host.session_manager.send_message("live", session_id=session.session_id)
            assert (await anext(aiter(stream))).text == "live"  # followed live through the hosts
        report = await acme.audit.replay(session_id=session.session_id)
        assert report.state["user_id"] == "u1" and report.state["tier"] == "pro"
        assert [row.who for row in report.rows] == [walls.acme.user] * 4 + [walls.host.settings.principal]
        with pytest.raises(AccessDeniedError):
            acme.memory  # noqa: B018  memory needs the service identity
        with pytest.raises(AccessDeniedError):
            await acme.session_manager.get_user_sessions("u1")
        with pytest.raises(AccessDeniedError):
            await acme.audit.verify()
    # the service's view and the tenant's agree
    assert (await walls.host.audit.replay(session_id=session.session_id)).rows == report.rows


async def test_a_read_only_credential_reads_but_cannot_command(walls: Walls) -> None:
    reader = await EmbeddedServer.change_access(walls.data_dir, lambda a: a.issue("acme", read_only=True))
    session = await walls.host.session_manager.create_session(user_id="u1")
    await walls.host.session_manager.send_message("for reading", session_id=session.session_id)
    async with walls.tenant_client(reader) as ro:
        report = await ro.audit.replay(session_id=session.session_id)
        assert report.rows[-1].what[0].startswith("MessagePosted")
        async with ro.streams.subscribe(session.session_id) as stream:
            assert (await anext(aiter(stream))).text == "for reading"
    attacker = await raw(walls.url, reader)
    try:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            touch = b'{"command":{"type":"TouchSession"}}'
            await attacker.nc.request(f"bbcmd.acme.{session.session_id}", touch, timeout=1)
        await attacker.violation(f"bbcmd.acme.{session.session_id}")
    finally:
        await attacker.nc.close()


async def test_a_user_credential_reaches_its_users_sessions_only(walls: Walls) -> None:
    alice = await EmbeddedServer.change_access(walls.data_dir, lambda a: a.issue("acme", user_id="alice"))
    bobs = await walls.host.session_manager.create_session(user_id="bob")
    async with walls.tenant_client(alice) as client:
        own = await client.session_manager.create_session(user_id="alice")
        await client.session_manager.touch_session(own.session_id)
        with pytest.raises(AccessDeniedError):
            await client.session_manager.create_session(user_id="bob")
        with pytest.raises(AccessDeniedError):
            await client.session_manager.touch_session(bobs.session_id)
        with pytest.raises(AccessDeniedError):
            await client.audit.replay(session_id=bobs.session_id)
        assert len((await client.audit.replay(session_id=own.session_id)).rows) == 2
    assert (await walls.host.session_manager.get_session(bobs.session_id)).version == bobs.version


async def test_revoked_credentials_and_removed_tenants_are_shut_out(walls: Walls) -> None:
    extra = await EmbeddedServer.change_access(walls.data_dir, lambda a: a.issue("acme"))
    connected = await raw(walls.url, extra)
    assert await EmbeddedServer.change_access(walls.data_dir, lambda a: a.revoke(extra.user)) == "acme"
    with anyio.fail_after(10):
        await connected.disconnected.wait()  # the server drops the revoked user's connection
    await connected.nc.close()
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(walls.url, user=extra.user, password=extra.password, allow_reconnect=False)
    await EmbeddedServer.change_access(walls.data_dir, lambda a: a.remove_tenant("globex"))
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        await nats.connect(walls.url, user=walls.globex.user, password=walls.globex.password, allow_reconnect=False)
    # the server restarted for the tenant change; the host reconnected and serves acme still
    async with walls.tenant_client(walls.acme) as acme:
        await acme.session_manager.create_session(user_id="u2")


# --------------------------------------------------------------------------- ugly reads


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"not json", "body"),
        (b'{"filter": 7}', "body"),
        (b'{"filter": "bb.acme.>", "limit": 100000}', "body"),
        (b'{"filter": "bb.acme.>", "wait": 1e308}', "body"),
        (b'{"filter": "bb.acme.>", "after": -1}', "body"),
        (b'{"filter": "bb.acme.session.*"}', "filter"),
        (b'{"filter": "bb.acme.session.\\ud800"}', "body"),
        (b'{"filter": "' + b"x" * 200_000 + b'"}', "filter"),
        (b"[" * 5000 + b"]" * 5000, "body"),
    ],
)
async def test_ugly_log_reads_get_typed_rejections(walls: Walls, body: bytes, field: str) -> None:
    client = await raw(walls.url, walls.acme)
    try:
        answer = msgspec.json.decode((await client.nc.request("bbsvc.acme.log", body, timeout=5)).data)
    finally:
        await client.nc.close()
    assert answer["rejection"]["code"] == "validation_error"
    assert json.loads(json.dumps(answer["rejection"]["fields"]))["field"] == field


async def test_tenant_credentials_without_remote_get_a_clear_error(walls: Walls) -> None:
    with pytest.raises(ValidationError) as refused:
        async with AsyncBlackbird(
            nats_url=walls.url, tenant="acme", nats_user=walls.acme.user, nats_password=walls.acme.password
        ):
            pass
    assert refused.value.field == "remote"
