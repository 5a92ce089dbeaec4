"""API keys of the HTTP API: the tenant aggregate's pure rules (every refusal, folds, the policy
book's index), then on a real nats-server the SDK, the HTTP endpoints, the CLI, audits and
restarts, and the walls between tenants."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors import tenant as tenant_logic
from actors.events import (
    ApiKeyIssued,
    ApiKeyRevoked,
    ApiKeyRole,
    ApiKeyUsed,
    Applied,
    Commit,
    IssueApiKey,
    RecordKeyUse,
    RevokeApiKey,
)
from actors.policy import default_policy
from actors.tenant import ApiKeyRecord, PolicyBook, TenantState
from actors.validation import Invalid, validate
from blackbird import AccessDeniedError, ApiKeyNotFoundError, AsyncBlackbird, ValidationError
from blackbird.audit.render import describe
from blackbird.server.access import AccessFile, IssuedCredential
from blackbird.server.embedded import EmbeddedServer
from blackbird.sessions.api_keys import USE_RECORD_INTERVAL

from .clock import Clock
from .conftest import NatsServer, serving_http

BASE = default_policy()
NOW = 1_700_000_000.0
HASH = hashlib.sha256(b"secret").hexdigest()
KEY = "0123456789abcdef"
TOKENS = {"acme-bootstrap-token-0001": "acme", "globex-bootstrap-token-01": "globex"}


# --------------------------------------------------------------------------- pure rules


def issue(key_id: str = KEY, role: str = "admin", user_id: str | None = None, expires_at: float | None = None,
          label: str | None = None) -> IssueApiKey:
    return IssueApiKey(key_id=key_id, secret_hash=HASH, role=ApiKeyRole(role), user_id=user_id, label=label,
                       expires_at=expires_at)


def run(state: TenantState, command: Any, now: float = NOW) -> tuple[TenantState, Any]:
    """Decide and, if it was allowed, fold: the state after and the decision."""
    decision = tenant_logic.decide(state, command, now, BASE)
    for event in decision.events:
        state = tenant_logic.evolve(state, event)
    return state, decision


def empty() -> TenantState:
    return TenantState(tenant="acme")


def test_an_issued_key_is_in_the_state_with_its_hash_and_times() -> None:
    state, decision = run(empty(), issue(label="ci", expires_at=NOW + 60))
    assert decision.rejection is None
    (event,) = decision.events
    assert isinstance(event, ApiKeyIssued) and event.secret_hash == HASH and event.role == "admin"
    record = state.api_keys[KEY]
    assert (record.secret_hash, record.role, record.label, record.created_at) == (HASH, "admin", "ci", NOW)
    assert record.expires_at == NOW + 60 and record.revoked_at is None and record.last_used_at is None


@pytest.mark.parametrize(("role", "user_id", "field"), [
    ("user", None, "user_id"), ("admin", "u1", "user_id"), ("service", "u1", "user_id"),
])
def test_a_user_key_needs_a_user_and_other_keys_refuse_one(role: str, user_id: str | None, field: str) -> None:
    state, decision = run(empty(), issue(role=role, user_id=user_id))
    assert decision.rejection is not None and decision.rejection.code == "validation_error"
    assert decision.rejection.fields["field"] == field and not decision.events and state == empty()


def test_a_user_key_names_its_user() -> None:
    state, decision = run(empty(), issue(role="user", user_id="u1"))
    assert decision.rejection is None and state.api_keys[KEY].user_id == "u1"
    assert state.api_keys[KEY].role == "user"


@pytest.mark.parametrize("expires_at", [NOW, NOW - 1, 0.0])
def test_an_expiry_not_after_now_is_refused(expires_at: float) -> None:
    _, decision = run(empty(), issue(expires_at=expires_at))
    assert decision.rejection is not None and decision.rejection.fields["field"] == "expires_at"


def test_a_key_id_is_issued_once() -> None:
    state, _ = run(empty(), issue())
    again, decision = run(state, issue(), NOW + 1)
    assert decision.rejection is not None and decision.rejection.fields["field"] == "key_id" and again == state


@pytest.mark.parametrize("command", [RevokeApiKey(key_id=KEY), RecordKeyUse(key_id=KEY, at=NOW)])
def test_revoking_or_using_an_unknown_key_is_not_found(command: Any) -> None:
    _, decision = run(empty(), command)
    assert decision.rejection is not None and decision.rejection.code == "api_key_not_found"
    assert decision.rejection.fields == {"key_id": KEY, "tenant": "acme"}


def test_a_revoked_key_is_revoked_once_and_no_longer_used() -> None:
    state, _ = run(empty(), issue())
    state, decision = run(state, RevokeApiKey(key_id=KEY), NOW + 5)
    assert decision.events == (ApiKeyRevoked(at=NOW + 5, key_id=KEY),)
    assert state.api_keys[KEY].revoked_at == NOW + 5 and not state.api_keys[KEY].live(NOW + 5)
    for command in (RevokeApiKey(key_id=KEY), RecordKeyUse(key_id=KEY, at=NOW + 6)):
        after, decision = run(state, command, NOW + 6)
        assert decision.rejection is not None and decision.rejection.code == "validation_error" and after == state


def test_a_use_is_recorded_when_later_than_the_last_and_never_in_the_future() -> None:
    state, _ = run(empty(), issue())
    state, decision = run(state, RecordKeyUse(key_id=KEY, at=NOW + 10), NOW + 20)
    assert decision.events == (ApiKeyUsed(at=NOW + 20, key_id=KEY, used_at=NOW + 10),)
    same, decision = run(state, RecordKeyUse(key_id=KEY, at=NOW + 5), NOW + 21)
    assert decision.events == () and decision.rejection is None and same == state
    state, decision = run(state, RecordKeyUse(key_id=KEY, at=NOW + 999), NOW + 30)
    assert state.api_keys[KEY].last_used_at == NOW + 30  # clamped to the deciding instant


def test_a_key_lives_until_it_expires_or_is_revoked() -> None:
    record = ApiKeyRecord(key_id=KEY, secret_hash=HASH, role="admin", user_id=None, label=None,
                          created_at=NOW, expires_at=NOW + 10)
    assert record.live(NOW) and record.live(NOW + 9.999) and not record.live(NOW + 10)
    assert not msgspec.structs.replace(record, revoked_at=NOW).live(NOW)
    assert msgspec.structs.replace(record, expires_at=None).live(1e12)


@pytest.mark.parametrize(("command", "field"), [
    (IssueApiKey(key_id="0123456789ABCDEF", secret_hash=HASH, role=ApiKeyRole.ADMIN), "key_id"),
    (IssueApiKey(key_id="0123", secret_hash=HASH, role=ApiKeyRole.ADMIN), "key_id"),
    (IssueApiKey(key_id=KEY + "\n", secret_hash=HASH, role=ApiKeyRole.ADMIN), "key_id"),
    (IssueApiKey(key_id=KEY, secret_hash="ab" * 31, role=ApiKeyRole.ADMIN), "secret_hash"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role="root"), "role"),  # type: ignore[arg-type]
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.USER, user_id="a.b"), "user_id"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.USER, user_id="\ud800"), "user_id"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.ADMIN, label="x" * 257), "label"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.ADMIN, label=""), "label"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.ADMIN, expires_at=float("inf")), "expires_at"),
    (IssueApiKey(key_id=KEY, secret_hash=HASH, role=ApiKeyRole.ADMIN, expires_at=1e300), "expires_at"),
    (RevokeApiKey(key_id="../etc"), "key_id"),
    (RecordKeyUse(key_id=KEY, at=-1.0), "at"),
    (RecordKeyUse(key_id=KEY, at=float("nan")), "at"),
])
def test_raw_key_commands_are_held_to_the_limits_table(command: Any, field: str) -> None:
    with pytest.raises(Invalid) as refused:
        validate(command)
    assert refused.value.field == field


def test_the_audit_words_name_the_key_but_never_its_hash() -> None:
    issued = ApiKeyIssued(at=NOW, key_id=KEY, secret_hash=HASH, role="user", user_id="u1", label="ci",
                          expires_at=NOW + 60)
    text = describe(issued)
    assert KEY in text and "user u1" in text and "ci" in text and HASH not in text
    assert describe(ApiKeyRevoked(at=NOW, key_id=KEY)) == f"ApiKeyRevoked {KEY}"
    assert KEY in describe(ApiKeyUsed(at=NOW, key_id=KEY, used_at=NOW))


KEY_IDS = st.sampled_from(["0000000000000000", "1111111111111111", "2222222222222222"])
COMMANDS = st.one_of(
    st.builds(lambda k, r, u, e: issue(k, r, u if r == "user" else None, e), KEY_IDS,
              st.sampled_from(["admin", "service", "user"]), st.sampled_from(["u1", "u2"]),
              st.none() | st.floats(NOW - 100, NOW + 1000)),
    st.builds(lambda k: RevokeApiKey(key_id=k), KEY_IDS),
    st.builds(lambda k, at: RecordKeyUse(key_id=k, at=at), KEY_IDS, st.floats(NOW, NOW + 2000)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(COMMANDS, st.floats(0, 50)), max_size=25))
def test_any_sequence_of_key_commands_keeps_the_rules(steps: list[tuple[Any, float]]) -> None:
    """Whatever order commands come in: a key is issued once, keeps its hash and role, is revoked
    at most once and stays revoked, its last use only grows; the fold of the log gives the same
    state; the policy book's index agrees with the state."""
    state, now = empty(), NOW
    commits: list[Commit] = []
    for version, (command, step) in enumerate(steps, start=1):
        now += step
        before = state
        decision = tenant_logic.decide(state, command, now, BASE)
        assert decision == tenant_logic.decide(state, command, now, BASE)  # pure
        if decision.rejection is not None:
            assert decision.events == ()
            continue
        for event in decision.events:
            state = tenant_logic.evolve(state, event)
        state = msgspec.structs.replace(state, version=version)
        commits.append(Commit(at=now, version=version, commands=(Applied(str(version), "p", decision.events),)))
        for key_id, old in before.api_keys.items():
            new = state.api_keys[key_id]
            assert (new.secret_hash, new.role, new.user_id, new.created_at) == (
                old.secret_hash, old.role, old.user_id, old.created_at)
            assert old.revoked_at is None or new.revoked_at == old.revoked_at
            assert (old.last_used_at or 0) <= (new.last_used_at or 0)
        for record in state.api_keys.values():
            assert (record.role == "user") == (record.user_id is not None)
            assert record.expires_at is None or record.expires_at > record.created_at
    replayed = empty()
    for commit in commits:
        replayed = tenant_logic.apply_commit(replayed, commit)
    assert replayed.api_keys == state.api_keys
    book = PolicyBook(BASE)
    book.observe(state)
    for key_id, record in state.api_keys.items():
        assert book.api_key(key_id) == [("acme", record)]


def test_the_book_indexes_keys_of_every_tenant_and_keeps_the_newest_state() -> None:
    book = PolicyBook(BASE)
    acme, _ = run(TenantState(tenant="acme"), issue())
    acme = msgspec.structs.replace(acme, version=1)
    globex, _ = run(TenantState(tenant="globex"), issue("fedcba9876543210"))
    book.observe(msgspec.structs.replace(globex, version=1))
    book.observe(acme)
    revoked, _ = run(acme, RevokeApiKey(key_id=KEY), NOW + 1)
    book.observe(msgspec.structs.replace(revoked, version=2))
    book.observe(acme)  # an older state delivered late changes nothing
    ((tenant, record),) = book.api_key(KEY)
    assert tenant == "acme" and record.revoked_at == NOW + 1
    assert book.api_key("fedcba9876543210")[0][0] == "globex" and book.api_key("ffffffffffffffff") == []


# --------------------------------------------------------------------------- on a real server


@pytest.fixture
async def host(nats_server: NatsServer) -> AsyncIterator[tuple[AsyncBlackbird, Clock]]:
    clock = Clock()
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme", clock=clock) as bb:
        yield bb, clock


@pytest.mark.anyio
async def test_sdk_creates_lists_verifies_and_revokes_keys(host: tuple[AsyncBlackbird, Clock]) -> None:
    bb, clock = host
    admin = await bb.api_keys.create(role="admin", label="ops")
    assert admin.key.startswith(f"bbk_{admin.key_id}_") and len(admin.key_id) == 16
    clock.now += 1
    user = await bb.api_keys.create(role=ApiKeyRole.USER, user_id="u1")
    listed = await bb.api_keys.list()
    assert [k.key_id for k in listed] == [admin.key_id, user.key_id]
    assert "secret_hash" not in msgspec.to_builtins(listed[0]) and "key" not in msgspec.to_builtins(listed[0])
    verified = bb.api_keys.verify(user.key)
    assert verified is not None and (verified.tenant, verified.role, verified.user_id) == ("acme", "user", "u1")
    assert bb.api_keys.verify(admin.key[:-1] + ("A" if admin.key[-1] != "A" else "B")) is None
    revoked = await bb.api_keys.revoke(user.key_id)
    assert revoked.revoked_at is not None and bb.api_keys.verify(user.key) is None
    assert bb.api_keys.verify(admin.key) is not None
    with pytest.raises(ValidationError) as again:
        await bb.api_keys.revoke(user.key_id)
    assert again.value.field == "key_id"
    with pytest.raises(ApiKeyNotFoundError):
        await bb.api_keys.revoke("ffffffffffffffff")
    with pytest.raises(ApiKeyNotFoundError):  # another tenant has no such key
        await bb.api_keys.revoke(admin.key_id, tenant="globex")
    for bad, field in (
        ({"role": "root"}, "role"), ({"role": "user"}, "user_id"), ({"role": "admin", "user_id": "u1"}, "user_id"),
        ({"role": "admin", "expires_in": 0}, "expires_in"), ({"role": "admin", "label": ""}, "label"),
        ({"role": "admin", "tenant": "a.b"}, "tenant"),
    ):
        with pytest.raises(ValidationError) as refused:
            await bb.api_keys.create(**bad)
        assert refused.value.field == field


@pytest.mark.anyio
async def test_an_expired_key_stops_verifying_by_the_clients_clock(host: tuple[AsyncBlackbird, Clock]) -> None:
    bb, clock = host
    issued = await bb.api_keys.create(role="service", expires_in=60)
    assert bb.api_keys.verify(issued.key) is not None
    clock.now += 61
    assert bb.api_keys.verify(issued.key) is None


@pytest.mark.anyio
async def test_uses_are_recorded_at_most_every_ten_minutes(host: tuple[AsyncBlackbird, Clock]) -> None:
    bb, clock = host
    issued = await bb.api_keys.create(role="admin")

    async def last_used() -> float | None:
        (key,) = [k for k in await bb.api_keys.list() if k.key_id == issued.key_id]
        return key.last_used_at

    async def settles_at(value: float) -> None:
        with anyio.fail_after(5):
            while await last_used() != value:
                await anyio.sleep(0.02)

    first = clock.now
    bb.api_keys.used(issued.key_id)
    await settles_at(first)
    clock.now += 10
    bb.api_keys.used(issued.key_id)  # within the interval: not recorded
    await anyio.sleep(0.2)
    assert await last_used() == first
    clock.now = first + USE_RECORD_INTERVAL + 1
    bb.api_keys.used(issued.key_id)
    await settles_at(clock.now)
    report = await bb.audit.replay(tenant="acme")
    uses = [row for row in report.rows if any(w.startswith("ApiKeyUsed") for w in row.what)]
    assert len(uses) == 2 and all(row.who == f"key:{issued.key_id}" for row in uses)


@pytest.mark.anyio
async def test_the_tenants_audit_shows_keys_issued_and_revoked_never_a_hash(
    host: tuple[AsyncBlackbird, Clock],
) -> None:
    bb, _ = host
    issued = await bb.api_keys.create(role="user", user_id="u7", label="mobile")
    await bb.api_keys.revoke(issued.key_id)
    report = await bb.audit.replay(tenant="acme")
    what = [w for row in report.rows for w in row.what]
    assert any(w.startswith(f"ApiKeyIssued {issued.key_id} role user user u7") for w in what)
    assert f"ApiKeyRevoked {issued.key_id}" in what
    secret = issued.key.split("_", 2)[2]
    digest = hashlib.sha256(secret.encode()).hexdigest()
    for text in (report.render(), json.dumps(report.to_dict())):
        assert issued.key_id in text and digest not in text and secret not in text


@pytest.mark.anyio
async def test_a_key_survives_a_restart_of_the_client(nats_server: NatsServer) -> None:
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="acme") as first:
        issued = await first.api_keys.create(role="admin")
        revoked = await first.api_keys.create(role="admin")
        await first.api_keys.revoke(revoked.key_id)
    async with AsyncBlackbird(nats_url=nats_server.url, tenant="globex", remote=True) as second:
        found = second.api_keys.verify(issued.key)
        assert found is not None and found.tenant == "acme" and found.key_id == issued.key_id
        assert second.api_keys.verify(revoked.key) is None


# --------------------------------------------------------------------------- HTTP


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.anyio
async def test_http_admins_create_list_and_revoke_their_tenants_keys(host: tuple[AsyncBlackbird, Clock]) -> None:
    bb, clock = host
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        made = await http.post("/v1/keys", json={"role": "admin", "label": "root"},
                               headers=bearer("acme-bootstrap-token-0001"))
        assert made.status_code == 201, made.text
        admin = made.json()
        assert admin["tenant"] == "acme" and admin["key"].startswith("bbk_") and "secret_hash" not in admin
        clock.now += 1
        user = (await http.post("/v1/keys", json={"role": "user", "user_id": "u1", "expires_in": 30},
                                headers=bearer(admin["key"]))).json()
        assert (user["role"], user["user_id"]) == ("user", "u1")
        listed = await http.get("/v1/keys", headers=bearer(admin["key"]))
        assert listed.status_code == 200
        assert [k["key_id"] for k in listed.json()["keys"]] == [admin["key_id"], user["key_id"]]
        assert "bbk_" not in listed.text and not any("secret_hash" in k for k in listed.json()["keys"])
        # a user key may not manage keys
        assert (await http.get("/v1/keys", headers=bearer(user["key"]))).status_code == 403
        bad = await http.post("/v1/keys", json={"role": "user"}, headers=bearer(admin["key"]))
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "user_id"
        bad = await http.post("/v1/keys", json={"role": "boss"}, headers=bearer(admin["key"]))
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "role"
        # expired by the client's clock: 401
        clock.now += 31
        assert (await http.get("/v1/keys", headers=bearer(user["key"]))).status_code == 401
        gone = await http.delete(f"/v1/keys/{user['key_id']}", headers=bearer(admin["key"]))
        assert gone.status_code == 200 and gone.json()["revoked_at"] is not None
        assert (await http.delete("/v1/keys/ffffffffffffffff", headers=bearer(admin["key"]))).status_code == 404
        # revoking itself: the next call is 401
        assert (await http.delete(f"/v1/keys/{admin['key_id']}", headers=bearer(admin["key"]))).status_code == 200
        refused = await http.get("/v1/keys", headers=bearer(admin["key"]))
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
        schema = (await http.get("/openapi.json")).json()
        assert {"post", "get"} <= set(schema["paths"]["/v1/keys"]) and "delete" in schema["paths"]["/v1/keys/{key_id}"]


@pytest.mark.anyio
async def test_http_one_tenants_admin_key_cannot_see_or_revoke_anothers_keys(
    host: tuple[AsyncBlackbird, Clock],
) -> None:
    bb, _ = host
    acme = await bb.api_keys.create(role="admin", tenant="acme")
    globex = await bb.api_keys.create(role="admin", tenant="globex")
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        listed = (await http.get("/v1/keys", headers=bearer(acme.key))).json()["keys"]
        assert [k["key_id"] for k in listed] == [acme.key_id]
        other = await http.delete(f"/v1/keys/{globex.key_id}", headers=bearer(acme.key))
        assert other.status_code == 404
        assert bb.api_keys.verify(globex.key) is not None  # untouched
        # a key id of one tenant with the secret of another's key is no key at all
        forged = f"bbk_{globex.key_id}_{acme.key.split('_', 2)[2]}"
        assert (await http.get("/v1/keys", headers=bearer(forged))).status_code == 401


@pytest.mark.anyio
async def test_http_garbage_keys_get_401_quickly(host: tuple[AsyncBlackbird, Clock]) -> None:
    bb, _ = host
    issued = await bb.api_keys.create(role="admin")
    key_id = issued.key_id
    garbage = [
        "bbk_x", "bbk_", "bbk__", f"bbk_{key_id}", f"bbk_{key_id}_", f"bbk_{key_id}_wrongsecret",
        f"bbk_{key_id.upper()}_{issued.key.split('_', 2)[2]}", issued.key + "x", issued.key[:-1],
        "bbk_" + "a" * 10_240, "bbk_" + key_id + "_" + "\u00e9" * 43,
    ]
    async with serving_http(bb, TOKENS) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for presented in garbage:
            started = time.monotonic()
            answer = await http.get("/v1/keys", headers={b"Authorization": f"Bearer {presented}".encode()})
            assert answer.status_code == 401, presented[:40]
            assert time.monotonic() - started < 2
        assert (await http.get("/v1/keys", headers=bearer(issued.key))).status_code == 200
    # invalid unicode never reaches HTTP; verify refuses it as well, and never raises
    for presented in ("bbk_\ud800", f"bbk_{key_id}_\udcff", "", "bbk_" + "0" * 16 + "_" + "x" * 10_000):
        assert bb.api_keys.verify(presented) is None
    assert bb.api_keys.verify(123) is None  # type: ignore[arg-type]


# --------------------------------------------------------------------------- CLI and credentials


def _issue(access: AccessFile) -> IssuedCredential:
    access.add_tenant("acme")
    return access.issue("acme", name="app")


async def cli(*args: str) -> Any:
    result = await anyio.run_process([sys.executable, "-m", "blackbird._cli", *args], check=False)
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


@pytest.mark.anyio
async def test_cli_keys_on_the_data_folders_server_and_tenant_credentials_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cred = await EmbeddedServer.change_access(data, _issue)
    async with AsyncBlackbird(data_dir=data, serve_commands=True, tenant="acme", command_timeout=5.0) as host:
        folder = ["--data-dir", str(data), "--tenant", "acme"]
        made = await cli("keys", "create", *folder, "--role", "user", "--user-id", "u1", "--label", "cli",
                         "--expires-in", "3600")
        assert made["key"].startswith(f"bbk_{made['key_id']}_") and made["user_id"] == "u1"
        with anyio.fail_after(5):  # the host follows the tenant's log: it knows the key soon
            while host.api_keys.verify(made["key"]) is None:
                await anyio.sleep(0.02)
        listed = await cli("keys", "list", *folder)
        assert [k["key_id"] for k in listed] == [made["key_id"]] and "key" not in listed[0]
        revoked = await cli("keys", "revoke", made["key_id"], *folder)
        assert revoked["revoked_at"] is not None
        with anyio.fail_after(5):
            while host.api_keys.verify(made["key"]) is not None:
                await anyio.sleep(0.02)
        failed = await anyio.run_process(
            [sys.executable, "-m", "blackbird._cli", "keys", "revoke", "ffffffffffffffff", *folder], check=False
        )
        assert failed.returncode == 1 and b"not found" in failed.stderr
        assert host.nats_url is not None
        async with AsyncBlackbird(nats_url=host.nats_url, remote=True, tenant="acme", nats_user=cred.user,
                                  nats_password=cred.password, command_timeout=5.0) as tenant_client:
            with pytest.raises(AccessDeniedError):
                tenant_client.api_keys  # noqa: B018
