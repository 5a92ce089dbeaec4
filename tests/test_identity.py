"""The pure rules of who is asking over NATS (blackbird.commands.identity) and of the embedded
server's credential names (blackbird.server.access), without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.events import AdjustQuota, AssignAgent, ChangeTier, CreateSession, PostMessage, TouchSession
from blackbird.commands.identity import (
    REQUEST_INFO,
    Identity,
    authorize_command,
    authorize_session,
    identity_of,
)
from blackbird.errors import AccessDeniedError
from blackbird.server.access import AccessFile, bound_user, tenant_account, tenant_of_account


def info(**fields: str) -> dict[str, str]:
    return {REQUEST_INFO: json.dumps(fields)}


def test_without_the_servers_header_the_service_names_the_principal() -> None:
    assert identity_of(None, "acme", "key:abc") == Identity(principal="key:abc")
    assert identity_of({}, "acme", "key:abc").is_service


def test_a_tenant_account_is_its_tenant_and_its_user_the_principal() -> None:
    who = identity_of(info(acc="tenant:acme", user="acme:app"), "acme", "admin@globex")
    assert who == Identity(principal="acme:app", tenant="acme", user_id=None)  # the claim is ignored
    bound = identity_of(info(acc="tenant:acme", user="acme:user:alice:1a2b"), "acme", "x")
    assert bound.user_id == "alice" and not bound.is_service


@pytest.mark.parametrize(
    "header",
    [
        info(acc="tenant:globex", user="globex:app"),  # another tenant
        info(acc="BLACKBIRD", user="blackbird"),  # no tenant's account (forged or misrouted)
        info(acc="tenant:acme"),  # an import without share: no user named
        {REQUEST_INFO: "not json"},
        {REQUEST_INFO: json.dumps({"acc": 7})},
    ],
)
def test_anything_else_is_refused(header: dict[str, str]) -> None:
    with pytest.raises(AccessDeniedError) as refused:
        identity_of(header, "acme", "admin")
    assert refused.value.tenant == "acme" and refused.value.action == "request"


def test_operator_mode_accounts_are_mapped_to_tenants_and_named_by_their_jwt() -> None:
    header = info(acc="ACME4PUBKEY", user="UKEY", name_tag="acme:user:bob:9")
    assert identity_of(header, "acme", "x", {"ACME4PUBKEY": "acme"}) == Identity(
        principal="acme:user:bob:9", tenant="acme", user_id="bob"
    )
    with pytest.raises(AccessDeniedError):
        identity_of(header, "acme", "x", {})  # not mapped: no tenant's
    with pytest.raises(AccessDeniedError):
        identity_of(header, "globex", "x", {"ACME4PUBKEY": "acme"})


def test_operator_actions_need_the_service_identity() -> None:
    tenant = Identity(principal="acme:app", tenant="acme")
    for command in (AdjustQuota(resource_type="tokens", limit=1e15), ChangeTier(tier="pro"), AssignAgent("b")):
        with pytest.raises(AccessDeniedError):
            authorize_command(tenant, command)
        authorize_command(Identity(principal="sdk"), command)  # the service may
    authorize_command(tenant, TouchSession())
    authorize_command(tenant, PostMessage(text="hi"))


def test_a_user_bound_identity_creates_and_reaches_its_own_sessions_only() -> None:
    alice = Identity(principal="acme:user:alice:1", tenant="acme", user_id="alice")
    authorize_command(alice, CreateSession(user_id="alice"))
    with pytest.raises(AccessDeniedError):
        authorize_command(alice, CreateSession(user_id="bob"))
    authorize_session(alice, "alice", "touch")
    with pytest.raises(AccessDeniedError):
        authorize_session(alice, "bob", "touch")
    authorize_session(Identity(principal="acme:app", tenant="acme"), "bob", "touch")  # tenant-wide


@given(st.text(min_size=1, max_size=40).filter(lambda t: ":" not in t))
def test_credential_names_round_trip_their_bound_user(user_id: str) -> None:
    assert bound_user("acme", f"acme:user:{user_id}:9f0e1d") == user_id
    assert bound_user("acme", f"acme:{user_id}") is None or user_id.startswith("user:")
    assert tenant_of_account(tenant_account(user_id)) == user_id


def test_issued_credentials_are_hashed_scoped_and_revocable() -> None:
    access = AccessFile(service_password="s3cret")
    access.add_tenant("acme")
    ro = access.issue("acme", read_only=True, name="reader")
    alice = access.issue("acme", user_id="alice")
    config = json.loads(access.render(Path("/store")).split("\n", 1)[1])
    users = {u["user"]: u for u in config["accounts"]["tenant:acme"]["users"]}
    assert ro.password not in json.dumps(config) and alice.password not in json.dumps(config)
    assert users["acme:reader"]["permissions"]["publish"]["allow"] == ["bbsvc.acme.>", "$JS.API.INFO"]
    assert users[alice.user]["permissions"]["subscribe"]["allow"] == [f"_INBOX.{alice.user}.>"]
    imports = config["accounts"]["tenant:acme"]["imports"]
    assert [i["service"]["subject"] for i in imports] == ["bbcmd.acme.>", "bbsvc.acme.>"]
    assert all(i["share"] for i in imports)
    assert access.revoke(ro.user) == "acme" and access.revoke(ro.user) is None
