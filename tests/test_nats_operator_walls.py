"""Tenants walled by NATS in operator (JWT) mode: the attacks of test_nats_security, against a
real nats-server whose accounts are JWTs signed here (resolver MEMORY), as an nsc-made
deployment would have them (see docs/security-operator-mode.md).

* SERVICE (JetStream) exports the services ``bbcmd.>`` and ``bbsvc.>``;
* ACME and GLOBEX (no JetStream) each import only ``bbcmd.<tenant>.>`` and ``bbsvc.<tenant>.>``
  from SERVICE, with ``share`` so the hosts see ``Nats-Request-Info`` (account public key and
  the user JWT's name);
* the hosts map the tenant accounts' public keys to tenants (the ``tenant_accounts`` setting).

Nothing is mocked. A creds client's replies come to ``_INBOX.<the user JWT's name>`` (the only
subjects a tenant user may subscribe to), and an import without ``share`` (the server then names
the account only) is refused by the hosts.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats.errors
import nkeys  # type: ignore[import-untyped]
import pytest

from blackbird import AccessDeniedError, AsyncBlackbird, ValidationError
from blackbird.server.access import inbox_prefix
from blackbird.server.embedded import _free_port

from .conftest import TEST_MASTER_KEY
from .nats_jwt import JETSTREAM, UNLIMITED, creds_text, new_nkey, sign_jwt, spawn, user_jwt
from .nats_raw import Raw, raw_connect

pytestmark = pytest.mark.anyio

TENANTS = ("acme", "globex")
#: creds file -> (account, user JWT name)
USERS = {
    "service": ("SERVICE", "blackbird-service"),
    "acme": ("ACME", "acme:app"),
    "globex": ("GLOBEX", "globex:app"),
    "alice": ("ACME", "acme:user:alice:x1"),  # bound to end user alice
    "acme-open": ("ACME", "acme:open"),  # no user permissions at all: the account alone walls it
}
NO_ANSWER = (nats.errors.TimeoutError, nats.errors.NoRespondersError)


def _tenant_permissions(tenant: str, name: str) -> dict[str, list[str]]:
    """What a tenant user may do: request its tenant's two imports, learn it has no JetStream,
    and receive replies on its own inbox prefix only."""
    return {
        "publish": [f"bbcmd.{tenant}.>", f"bbsvc.{tenant}.>", "$JS.API.INFO"],
        "subscribe": [inbox_prefix(name) + ".>"],
    }


@dataclass
class Operator:
    """A running operator-mode nats-server and the creds files of its users."""

    url: str
    tmp: Path
    accounts: dict[str, str]  # account name -> public key

    def creds(self, who: str) -> str:
        return str(self.tmp / f"{who}.creds")

    @property
    def tenant_accounts(self) -> dict[str, str]:
        return {self.accounts[t.upper()]: t for t in TENANTS}

    def host(self, **options: Any) -> AsyncBlackbird:
        """An actor host on the service identity, answering commands and log reads."""
        settings: dict[str, Any] = {"tenant_accounts": self.tenant_accounts, **options}
        return AsyncBlackbird(
            nats_url=self.url, nats_creds=self.creds("service"), serve_commands=True, tenant="acme",
            master_key=TEST_MASTER_KEY, command_timeout=5.0, **settings,
        )

    def client(self, who: str, tenant: str = "acme", **options: Any) -> AsyncBlackbird:
        """A remote client on a tenant user's creds."""
        return AsyncBlackbird(
            nats_url=self.url, remote=True, tenant=tenant, nats_creds=self.creds(who), **{"command_timeout": 5.0,
                                                                                           **options},
        )

    async def raw(self, who: str) -> Raw:
        """A raw connection of a user, replies on its own inbox prefix."""
        name = USERS[who][1]
        return await raw_connect(self.url, user_credentials=self.creds(who), inbox_prefix=inbox_prefix(name))


def _start(tmp: Path, *, share: bool = True) -> tuple[Operator, Path]:
    """The JWTs, creds files and server configuration of the deployment the module describes
    (``share=False``: the tenants' imports without ``share``, a mistake)."""
    op_pub, op_seed = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    keys = {name: new_nkey(nkeys.PREFIX_BYTE_ACCOUNT) for name in ("SYS", "SERVICE", "ACME", "GLOBEX")}
    service_pub = keys["SERVICE"][0]
    claims: dict[str, dict[str, Any]] = {
        "SYS": {"type": "account", "limits": UNLIMITED},
        "SERVICE": {
            "type": "account", "limits": {**UNLIMITED, **JETSTREAM},
            # public service exports: any account may import them, but only the operator signs
            # accounts, so only the imports written below exist
            "exports": [
                {"name": f"bb{kind}", "subject": f"bb{kind}.>", "type": "service", "response_type": "Singleton"}
                for kind in ("cmd", "svc")
            ],
        },
    }
    for tenant in TENANTS:
        claims[tenant.upper()] = {
            "type": "account", "limits": UNLIMITED,  # no JetStream limits: JetStream disabled
            "imports": [
                {"name": f"bb{kind}.{tenant}", "subject": f"bb{kind}.{tenant}.>", "account": service_pub,
                 "type": "service", "share": share}
                for kind in ("cmd", "svc")
            ],
        }
    jwts = {name: sign_jwt(op_seed, keys[name][0], name, claims[name]) for name in keys}
    operator_jwt = sign_jwt(op_seed, op_pub, "OP", {"type": "operator", "system_account": keys["SYS"][0]})
    for who, (account, name) in USERS.items():
        tenant = account.lower()
        if who in ("service", "acme-open"):
            user = user_jwt(keys[account][1], name)
        else:
            perms = _tenant_permissions(tenant, name)
            user = user_jwt(keys[account][1], name, publish=perms["publish"], subscribe=perms["subscribe"])
        (tmp / f"{who}.creds").write_text(creds_text(*user))
    port = _free_port()
    preload = "\n".join(f"  {keys[name][0]}: {jwts[name]}" for name in keys)
    config = tmp / "server.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f"jetstream {{ store_dir: {json.dumps(str(tmp / 'js'))} }}\n"
        f"operator: {operator_jwt}\n"
        f"system_account: {keys['SYS'][0]}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n{preload}\n}}\n"
    )
    return Operator(f"nats://127.0.0.1:{port}", tmp, {name: pub for name, (pub, _) in keys.items()}), config


@contextlib.contextmanager
def _running(tmp: Path, *, share: bool = True) -> Iterator[Operator]:
    deployment, config = _start(tmp, share=share)
    process = spawn(config)
    try:
        yield deployment
    finally:
        process.kill()
        process.wait()


@pytest.fixture
def operator(tmp_path: Path) -> Iterator[Operator]:
    """A real nats-server in operator mode (resolver MEMORY, system account SYS)."""
    with _running(tmp_path) as deployment:
        yield deployment


@dataclass
class Walls:
    operator: Operator
    host: AsyncBlackbird


@pytest.fixture
async def walls(operator: Operator) -> AsyncIterator[Walls]:
    """The operator-mode server and a host that maps ACME's and GLOBEX's accounts to their tenants."""
    async with operator.host() as host:
        yield Walls(operator, host)


# --------------------------------------------------------------------------- legitimate paths


async def test_a_tenant_account_reaches_its_tenant_through_the_shared_imports(walls: Walls) -> None:
    op, host = walls.operator, walls.host
    async with op.client("acme") as acme:
        assert acme.tenant_credentials  # no JetStream in ACME's account
        session = await acme.session_manager.create_session(user_id="u1", tier="pro")
        await acme.session_manager.send_message("hello", session_id=session.session_id)
        async with acme.streams.subscribe(session.session_id) as stream:
            messages = aiter(stream)
            with anyio.fail_after(10):
                assert (await anext(messages)).text == "hello"
                await host.session_manager.send_message("live", session_id=session.session_id)
                assert (await anext(messages)).text == "live"  # followed live through the hosts
        report = await acme.audit.replay(session_id=session.session_id)
        assert report.state["user_id"] == "u1" and report.state["tier"] == "pro"
        # the principal is the user JWT's name, not what the client claims ("sdk")
        assert [row.who for row in report.rows] == ["acme:app", "acme:app", host.settings.principal]
        assert acme.settings.principal == "sdk"
    assert (await host.audit.replay(session_id=session.session_id)).rows == report.rows
    # GLOBEX's account is mapped to globex, and its users' commands land there
    async with op.client("globex", tenant="globex") as globex:
        assert globex.tenant_credentials
        theirs = await globex.session_manager.create_session(user_id="g1")
        report = await globex.audit.replay(session_id=theirs.session_id)
        assert [row.who for row in report.rows] == ["globex:app"]
        with pytest.raises((AccessDeniedError, ValidationError)):  # and no further: its reads are globex's
            await globex.audit.replay(session_id=session.session_id, tenant="acme")


async def test_the_principal_is_the_jwt_name_never_the_payload(walls: Walls) -> None:
    op, host = walls.operator, walls.host
    async with op.client("acme") as acme:
        session = await acme.session_manager.create_session(user_id="u1")
    attacker = await op.raw("acme")
    try:
        forged = {"command": {"type": "TouchSession"}, "principal": "admin@globex"}
        # the server replaces a Nats-Request-Info header the requester wrote
        info = {"acc": op.accounts["SERVICE"], "name_tag": "blackbird-service", "user": "blackbird-service"}
        reply = await attacker.nc.request(
            f"bbcmd.acme.{session.session_id}", json.dumps(forged).encode(), timeout=5,
            headers={"Nats-Request-Info": json.dumps(info)},
        )
        assert json.loads(reply.data)["rejection"] is None
    finally:
        await attacker.nc.close()
    report = await host.audit.replay(session_id=session.session_id)
    assert [row.who for row in report.rows] == ["acme:app", "acme:app"]


# --------------------------------------------------------------------------- the attacks


async def test_a_tenant_account_reaches_nothing_of_another_tenant_nor_jetstream(walls: Walls) -> None:
    op, host = walls.operator, walls.host
    victim = await host.session_manager.create_session(user_id="v", tenant="globex")
    attacker = await op.raw("acme")
    try:
        touch = json.dumps({"command": {"type": "TouchSession"}}).encode()
        with pytest.raises(NO_ANSWER):
            await attacker.nc.request(f"bbcmd.globex.{victim.session_id}", touch, timeout=1)
        await attacker.violation(f"bbcmd.globex.{victim.session_id}")
        read = json.dumps({"filter": "bb.globex.>"}).encode()
        with pytest.raises(NO_ANSWER):
            await attacker.nc.request("bbsvc.globex.log", read, timeout=1)
        await attacker.violation("bbsvc.globex.log")
        # its own tenant's read service refuses another tenant's filter
        answer = json.loads((await attacker.nc.request("bbsvc.acme.log", read, timeout=5)).data)
        assert answer["rejection"]["code"] == "validation_error" and answer["records"] == []
        # JetStream: not enabled for the account; and nothing but $JS.API.INFO may be asked
        info = await attacker.nc.request("$JS.API.INFO", b"", timeout=2)
        assert b"JetStream not enabled for account" in info.data
        for subject in ("$JS.API.STREAM.NAMES", "$JS.API.STREAM.INFO.BLACKBIRD",
                        "$JS.API.CONSUMER.CREATE.BLACKBIRD.c.bb.globex.>", "$JS.API.STREAM.MSG.GET.KV_bb_keys"):
            with pytest.raises(NO_ANSWER):
                await attacker.nc.request(subject, b"{}", timeout=1)
            await attacker.violation(subject)
        for subject in ("bb.>", "bb.globex.>", ">", "_INBOX.>"):
            await attacker.nc.subscribe(subject)
            await attacker.violation(subject)
    finally:
        await attacker.nc.close()
    # a user of ACME without any permission: the account itself has no way to GLOBEX or JetStream
    open_user = await raw_connect(op.url, user_credentials=op.creds("acme-open"))
    try:
        with pytest.raises(nats.errors.NoRespondersError):
            await open_user.nc.request(f"bbcmd.globex.{victim.session_id}", touch, timeout=2)
        with pytest.raises(nats.errors.NoRespondersError):
            await open_user.nc.request("bbsvc.globex.log", read, timeout=2)
        for subject in ("$JS.API.INFO", "$JS.API.STREAM.INFO.BLACKBIRD"):
            answer = json.loads((await open_user.nc.request(subject, b"", timeout=2)).data)
            assert answer["error"]["err_code"] == 10039, (subject, answer)  # JetStream not enabled for account
    finally:
        await open_user.nc.close()
    after = await host.session_manager.get_session(victim.session_id, tenant="globex")
    assert after is not None and after.version == victim.version  # nothing was applied


async def test_a_host_without_the_account_mapping_refuses_the_tenant(operator: Operator) -> None:
    """The mapping is what lets a tenant account in: a host without it takes ACME's account for
    no tenant's and refuses its commands and reads."""
    async with operator.host(tenant_accounts={}) as host:
        own = await host.session_manager.create_session(user_id="u1")
        attacker = await operator.raw("acme")
        try:
            touch = json.dumps({"command": {"type": "TouchSession"}}).encode()
            reply = json.loads((await attacker.nc.request(f"bbcmd.acme.{own.session_id}", touch, timeout=5)).data)
            assert reply["rejection"]["code"] == "access_denied", reply
            assert operator.accounts["ACME"] in reply["rejection"]["message"]
            assert "is no tenant's" in reply["rejection"]["message"]
            read = json.dumps({"filter": f"bb.acme.session.{own.session_id}"}).encode()
            page = json.loads((await attacker.nc.request("bbsvc.acme.log", read, timeout=5)).data)
            assert page["rejection"]["code"] == "access_denied" and page["records"] == []
        finally:
            await attacker.nc.close()
        with pytest.raises(AccessDeniedError) as denied:
            async with operator.client("acme") as acme:
                await acme.session_manager.create_session(user_id="u2")
        assert "is no tenant's" in str(denied.value)
        after = await host.session_manager.get_session(own.session_id)
        assert after is not None and after.version == own.version


async def test_a_user_bound_credential_reaches_its_users_sessions_only(walls: Walls) -> None:
    op, host = walls.operator, walls.host
    bobs = await host.session_manager.create_session(user_id="bob")
    async with op.client("alice") as alice:
        own = await alice.session_manager.create_session(user_id="alice")
        await alice.session_manager.touch_session(own.session_id)
        with pytest.raises(AccessDeniedError):
            await alice.session_manager.create_session(user_id="bob")
        with pytest.raises(AccessDeniedError):
            await alice.session_manager.touch_session(bobs.session_id)
        with pytest.raises(AccessDeniedError):
            await alice.audit.replay(session_id=bobs.session_id)
        with pytest.raises(AccessDeniedError):
            async with alice.streams.subscribe(bobs.session_id):
                pass
        report = await alice.audit.replay(session_id=own.session_id)
        assert [row.who for row in report.rows] == ["acme:user:alice:x1"] * 2
    # nor read the replies of ACME's other users: its inbox prefix is its own
    sniffer = await op.raw("alice")
    try:
        await sniffer.nc.subscribe(inbox_prefix("acme:app") + ".>")
        await sniffer.violation(inbox_prefix("acme:app"))
        touch = json.dumps({"command": {"type": "TouchSession"}, "principal": "acme:app"}).encode()
        reply = json.loads((await sniffer.nc.request(f"bbcmd.acme.{bobs.session_id}", touch, timeout=5)).data)
        assert reply["rejection"]["code"] == "access_denied", reply
    finally:
        await sniffer.nc.close()
    after = await host.session_manager.get_session(bobs.session_id)
    assert after is not None and after.version == bobs.version


async def test_a_creds_client_sets_its_inbox_prefix(operator: Operator) -> None:
    async with operator.host(), operator.client("acme", command_timeout=2.0) as acme:
        assert acme.tenant_credentials
        await acme.session_manager.create_session(user_id="u1")


async def test_an_import_without_share_fails_closed(tmp_path: Path) -> None:
    with _running(tmp_path, share=False) as op:
        async with op.host() as host:
            bobs = await host.session_manager.create_session(user_id="bob")
            alice = await op.raw("alice")
            try:
                touch = json.dumps({"command": {"type": "TouchSession"}}).encode()
                reply = json.loads((await alice.nc.request(f"bbcmd.acme.{bobs.session_id}", touch, timeout=5)).data)
            finally:
                await alice.nc.close()
            assert reply["rejection"] is not None and reply["rejection"]["code"] == "access_denied", reply
