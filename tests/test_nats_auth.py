"""Blackbird on a secured NATS: token, user/password, nkey, creds (operator mode, JWTs made here)
and mutual TLS, each against a real nats-server configured for it; wrong or missing credentials
fail fast with NatsAuthError, and connect_options refuses bad settings naming them."""

from __future__ import annotations

import contextlib
import datetime
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import nats
import nkeys  # type: ignore[import-untyped]
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from blackbird import AsyncBlackbird, NatsAuthError, ValidationError
from blackbird._cli import main
from blackbird.config import build_settings
from blackbird.connection import connect_options
from blackbird.server.embedded import _free_port

from .embedders import HashEmbedder
from .nats_jwt import JETSTREAM, UNLIMITED, creds_text, new_nkey, sign_jwt, spawn, user_jwt

pytestmark = pytest.mark.anyio

TOKEN = "tok-0123456789-s3cret"
USER, PASSWORD = "bob", "pw-0123456789-s3cret"


# ------------------------------------------------------------------ a configured nats-server


@dataclass
class Secured:
    """A running nats-server requiring one kind of authentication."""

    kind: str
    url: str
    good: dict[str, str]  # settings that authenticate
    # (what, settings, the secret that must not show) that the server refuses
    bad: list[tuple[str, dict[str, str], str | None]]
    tmp: Path
    process: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _operator_config(tmp: Path) -> tuple[str, dict[str, Any]]:
    """An operator-mode server configuration: accounts SYS, APP (JetStream on, exports the
    service ``svc.>``) and TENANT (imports it with ``share: true``); users of APP and TENANT."""
    op_pub, op_seed = new_nkey(nkeys.PREFIX_BYTE_OPERATOR)
    sys_pub, sys_seed = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    app_pub, app_seed = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    tenant_pub, tenant_seed = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    operator_jwt = sign_jwt(op_seed, op_pub, "OP", {"type": "operator", "system_account": sys_pub})
    sys_jwt = sign_jwt(op_seed, sys_pub, "SYS", {"type": "account", "limits": UNLIMITED})
    app_jwt = sign_jwt(op_seed, app_pub, "APP", {
        "type": "account", "limits": {**UNLIMITED, **JETSTREAM},
        "exports": [{"name": "svc", "subject": "svc.>", "type": "service", "response_type": "Singleton"}],
    })
    tenant_jwt = sign_jwt(op_seed, tenant_pub, "TENANT", {
        "type": "account", "limits": UNLIMITED,
        # share (a field of the import in JWT v2): the exporter's responders see the requester's
        # full client info in Nats-Request-Info; without it only {"acc": ..., "rtt": ...}
        "imports": [{"name": "svc", "subject": "svc.>", "account": app_pub, "type": "service", "share": True}],
    })
    config = (
        f"operator: {operator_jwt}\n"
        f"system_account: {sys_pub}\n"
        "resolver: MEMORY\n"
        f"resolver_preload: {{\n  {sys_pub}: {sys_jwt}\n  {app_pub}: {app_jwt}\n  {tenant_pub}: {tenant_jwt}\n}}\n"
    )
    app_user = user_jwt(app_seed, "app-user")
    tenant_user = user_jwt(tenant_seed, "tenant-user")
    (tmp / "app.creds").write_text(creds_text(*app_user))
    (tmp / "tenant.creds").write_text(creds_text(*tenant_user))
    # a user signed by an account the server does not know
    stranger_pub, stranger_seed = new_nkey(nkeys.PREFIX_BYTE_ACCOUNT)
    stranger = user_jwt(stranger_seed, "stranger")
    (tmp / "stranger.creds").write_text(creds_text(*stranger))
    return config, {"app": app_pub, "tenant": tenant_pub, "app_user_seed": app_user[1],
                    "stranger_seed": stranger[1]}


def _tls_material(tmp: Path) -> None:
    """ca.pem, server-{cert,key}.pem (127.0.0.1, localhost), client-{cert,key}.pem signed by the
    CA; rogue-{cert,key}.pem signed by another CA."""

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def write_key(k: ec.EllipticCurvePrivateKey, name: str) -> None:
        (tmp / name).write_bytes(k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))

    def cert(subject: str, k: ec.EllipticCurvePrivateKey, issuer: x509.Name | None,
             issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
             server: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        builder = (
            x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name)
            .public_key(k.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if ca:
            builder = builder.add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
        else:
            usage = x509.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.ExtendedKeyUsageOID.CLIENT_AUTH
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            import ipaddress

            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def write_cert(c: x509.Certificate, name: str) -> None:
        (tmp / name).write_bytes(c.public_bytes(serialization.Encoding.PEM))

    ca_key, rogue_ca_key = key(), key()
    ca = cert("Test CA", ca_key, None, ca_key, ca=True)
    rogue_ca = cert("Rogue CA", rogue_ca_key, None, rogue_ca_key, ca=True)
    write_cert(ca, "ca.pem")
    write_cert(rogue_ca, "rogue-ca.pem")
    for name, issuer, issuer_key, server in (
        ("server", ca, ca_key, True), ("client", ca, ca_key, False), ("rogue", rogue_ca, rogue_ca_key, False)
    ):
        k = key()
        write_key(k, f"{name}-key.pem")
        write_cert(cert(name, k, issuer.subject, issuer_key, server=server), f"{name}-cert.pem")


def _secured(kind: str, tmp: Path) -> Secured:
    """The configuration, credentials and refused credentials of a server of ``kind``."""
    port = _free_port()
    store = tmp / "js"
    lines = [f"listen: 127.0.0.1:{port}", f"jetstream {{ store_dir: {json.dumps(str(store))} }}"]
    if kind == "token":
        lines.append(f'authorization {{ token: "{TOKEN}" }}')
        good = {"nats_token": TOKEN}
        bad = [("no credentials", {}, None), ("a wrong token", {"nats_token": "wrong-token-xyz"}, "wrong-token-xyz")]
    elif kind == "user":
        lines.append(f'authorization {{ users: [{{user: "{USER}", password: "{PASSWORD}"}}] }}')
        good = {"nats_user": USER, "nats_password": PASSWORD}
        bad = [("no credentials", {}, None),
               ("a wrong password", {"nats_user": USER, "nats_password": "wrong-pass-xyz"}, "wrong-pass-xyz")]
    elif kind == "nkey":
        public, seed = new_nkey(nkeys.PREFIX_BYTE_USER)
        (tmp / "user.nk").write_text(seed + "\n")
        _, other = new_nkey(nkeys.PREFIX_BYTE_USER)
        (tmp / "other.nk").write_text(other + "\n")
        lines.append(f'authorization {{ users: [{{nkey: "{public}"}}] }}')
        good = {"nats_nkey_seed": str(tmp / "user.nk")}
        bad = [("no credentials", {}, None), ("an unknown nkey", {"nats_nkey_seed": str(tmp / "other.nk")}, other)]
    elif kind == "creds":
        config, extra = _operator_config(tmp)
        lines.append(config)
        good = {"nats_creds": str(tmp / "app.creds")}
        bad = [("no credentials", {}, None),
               ("a user of an unknown account", {"nats_creds": str(tmp / "stranger.creds")}, extra["stranger_seed"])]
    elif kind == "tls":
        _tls_material(tmp)
        lines.append(
            f'tls {{ cert_file: "{tmp / "server-cert.pem"}", key_file: "{tmp / "server-key.pem"}", '
            f'ca_file: "{tmp / "ca.pem"}", verify: true, timeout: 2 }}'
        )
        good = {"tls_ca": str(tmp / "ca.pem"), "tls_cert": str(tmp / "client-cert.pem"),
                "tls_key": str(tmp / "client-key.pem")}
        bad = [
            ("no client certificate", {"tls_ca": str(tmp / "ca.pem")}, None),
            ("a certificate of another CA", {"tls_ca": str(tmp / "ca.pem"), "tls_cert": str(tmp / "rogue-cert.pem"),
                                             "tls_key": str(tmp / "rogue-key.pem")}, None),
            ("a server certificate not trusted", {"tls_ca": str(tmp / "rogue-ca.pem"),
                                                  "tls_cert": str(tmp / "client-cert.pem"),
                                                  "tls_key": str(tmp / "client-key.pem")}, None),
        ]
    else:
        raise AssertionError(kind)
    if kind == "creds":
        extra_info = extra
    else:
        extra_info = {}
    config_file = tmp / "server.conf"
    config_file.write_text("\n".join(lines) + "\n")
    return Secured(kind, f"nats://127.0.0.1:{port}", good, bad, tmp, extra=extra_info)


@contextlib.contextmanager
def _running_secured(kind: str, tmp_path: Path) -> Iterator[Secured]:
    """A real nats-server (JetStream on for the authenticated account) requiring one kind of
    authentication, on a free port with its own store; killed afterwards."""
    server = _secured(kind, tmp_path)
    server.process = spawn(tmp_path / "server.conf")
    try:
        yield server
    finally:
        server.process.kill()
        server.process.wait()


@pytest.fixture(params=["token", "user", "nkey", "creds", "tls"])
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Secured]:
    with _running_secured(request.param, tmp_path) as server:
        yield server


@pytest.fixture
def user_server(tmp_path: Path) -> Iterator[Secured]:
    with _running_secured("user", tmp_path) as server:
        yield server


@pytest.fixture
def operator_server(tmp_path: Path) -> Iterator[Secured]:
    with _running_secured("creds", tmp_path) as server:
        yield server


# ------------------------------------------------------------------ connecting


async def test_an_authenticated_client_creates_a_session_and_records_usage(secured: Secured) -> None:
    async with AsyncBlackbird(nats_url=secured.url, tenant="acme", embedder=HashEmbedder(), **secured.good) as bb:
        session = await bb.session_manager.create_session("u1", "pro")
        assert await bb.session_manager.track_usage(session.session_id, "llm", "tokens", 150)
        fetched = await bb.session_manager.get_session(session.session_id)
        assert fetched is not None and fetched.user_id == "u1"


async def test_missing_or_wrong_credentials_fail_fast_with_a_typed_error(secured: Secured) -> None:
    for what, settings, secret in secured.bad:
        started = time.monotonic()
        with pytest.raises(NatsAuthError) as caught:
            async with AsyncBlackbird(nats_url=secured.url, tenant="acme", embedder=HashEmbedder(),
                                      command_timeout=20, **settings):
                pass
        elapsed = time.monotonic() - started
        error = caught.value
        assert elapsed < 5, f"{secured.kind}, {what}: refused after {elapsed:.1f}s, not at once"
        assert secured.url in str(error) and error.nats_url == secured.url
        assert "auth:" in str(error) and error.auth in str(error)
        for shown in (str(error), repr(error), json.dumps(error.fields, default=str)):
            for hidden in (secret, TOKEN, PASSWORD):
                assert hidden is None or hidden not in shown, f"{secured.kind}, {what}: secret in {shown!r}"
        print(f"{secured.kind}, {what}: {error} ({elapsed:.2f}s)")


async def test_user_and_password_come_from_the_environment(
    user_server: Secured, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLACKBIRD_NATS_USER", USER)
    monkeypatch.setenv("BLACKBIRD_NATS_PASSWORD", PASSWORD)
    async with AsyncBlackbird(nats_url=user_server.url, tenant="acme", embedder=HashEmbedder()) as bb:
        assert (bb.settings.nats_user, bb.settings.nats_password) == (USER, PASSWORD)
        assert PASSWORD not in repr(bb.settings) and "nats_password='***'" in repr(bb.settings)
        session = await bb.session_manager.create_session("u1", "pro")
        assert await bb.session_manager.track_usage(session.session_id, "llm", "tokens", 1)
    monkeypatch.setenv("BLACKBIRD_NATS_PASSWORD", "not-the-password")
    with pytest.raises(NatsAuthError) as caught:
        async with AsyncBlackbird(nats_url=user_server.url, tenant="acme", embedder=HashEmbedder()):
            pass
    assert caught.value.auth == "user/password" and "not-the-password" not in str(caught.value)


async def test_the_cli_creates_a_session_with_a_creds_file(
    operator_server: Secured, capsys: pytest.CaptureFixture[str]
) -> None:
    creds = operator_server.good["nats_creds"]
    async with AsyncBlackbird(nats_url=operator_server.url, embedder=HashEmbedder(), serve_commands=True,
                              nats_creds=creds):
        code = await anyio.to_thread.run_sync(main, [
            "session", "create", "--user-id", "u1", "--nats-url", operator_server.url, "--nats-creds", creds,
        ])
        out = capsys.readouterr()
        assert code == 0, out.err
        assert json.loads(out.out)["user_id"] == "u1"
        # and without the creds file, the command says the server refused, and exits 1
        code = await anyio.to_thread.run_sync(main, [
            "session", "create", "--user-id", "u1", "--nats-url", operator_server.url, "--connect-timeout", "20",
        ])
        err = capsys.readouterr().err
        assert code == 1 and "refused" in err and "auth: none" in err, err


async def test_a_service_shared_with_another_account_sees_its_request_info(operator_server: Secured) -> None:
    """A user of TENANT requests ``svc.echo``, a service APP exports and TENANT imports with
    ``share: true``; the responder in APP sees the requester's account (its public key: the
    account's name is not sent) in the ``Nats-Request-Info`` header."""
    tmp = operator_server.tmp
    app = await nats.connect(operator_server.url, user_credentials=str(tmp / "app.creds"))
    tenant = await nats.connect(operator_server.url, user_credentials=str(tmp / "tenant.creds"))
    seen: list[dict[str, str]] = []
    try:
        async def respond(msg: Any) -> None:
            seen.append(dict(msg.headers or {}))
            await msg.respond(b"pong")

        await app.subscribe("svc.>", cb=respond)
        await app.flush()
        reply = await tenant.request("svc.echo", b"ping", timeout=5)
        assert reply.data == b"pong"
    finally:
        await tenant.close()
        await app.close()
    info_header = seen[0]["Nats-Request-Info"]
    print(f"Nats-Request-Info: {info_header}")
    (tmp / "request-info.json").write_text(info_header)
    info = json.loads(info_header)
    assert info["acc"] == operator_server.extra["tenant"] == info["issuer_key"]
    assert info["name_tag"] == "tenant-user"  # the user JWT's name; "TENANT" appears nowhere
    assert "TENANT" not in info_header


# ------------------------------------------------------------------ settings refused up front


def _refused(**settings: Any) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        connect_options(build_settings(**settings))
    return caught.value


def test_connect_options_for_each_kind(tmp_path: Path) -> None:
    _, seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    (tmp_path / "user.nk").write_text(seed)
    assert connect_options(build_settings()) == {}
    assert connect_options(build_settings(nats_token="t")) == {"token": "t"}
    assert connect_options(build_settings(nats_user="u", nats_password="p")) == {"user": "u", "password": "p"}
    assert connect_options(build_settings(nats_nkey_seed=tmp_path / "user.nk")) == {
        "nkeys_seed": str(tmp_path / "user.nk")}
    _tls_material(tmp_path)
    tls = connect_options(build_settings(tls_ca=tmp_path / "ca.pem"))["tls"]
    assert tls.verify_mode.name == "CERT_REQUIRED" and tls.check_hostname


def test_unreadable_or_malformed_files_are_refused_naming_the_setting(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    (tmp_path / "junk").write_text("not a key\n")
    junk = str(tmp_path / "junk")
    for name in ("nats_creds", "nats_nkey_seed", "tls_ca"):
        for path in (missing, junk):
            error = _refused(**{name: path})
            assert error.field == name and error.got == path, (name, path, error)
            assert name in str(error)
    _tls_material(tmp_path)
    error = _refused(tls_cert=tmp_path / "client-cert.pem", tls_key=tmp_path / "rogue-key.pem")
    assert error.field == "tls_cert"
    error = _refused(tls_cert=tmp_path / "client-cert.pem", tls_key=missing)
    assert error.field == "tls_key"


def test_half_given_pairs_are_refused_naming_the_missing_half(tmp_path: Path) -> None:
    _tls_material(tmp_path)
    assert _refused(tls_cert=tmp_path / "client-cert.pem").field == "tls_key"
    assert _refused(tls_key=tmp_path / "client-key.pem").field == "tls_cert"
    error = _refused(nats_user="u")
    assert error.field == "nats_password"
    error = _refused(nats_password="p-s3cret")
    assert error.field == "nats_user" and "p-s3cret" not in str(error) and error.got is None


def test_more_than_one_kind_of_credential_is_refused(tmp_path: Path) -> None:
    _, seed = new_nkey(nkeys.PREFIX_BYTE_USER)
    (tmp_path / "user.nk").write_text(seed)
    error = _refused(nats_token="t-s3cret", nats_user="u", nats_password="p-s3cret")
    assert error.field == "nats_user" and "nats_token" in str(error)
    assert "t-s3cret" not in str(error) and "p-s3cret" not in str(error) and "t-s3cret" not in repr(error.got)
    assert _refused(nats_nkey_seed=tmp_path / "user.nk", nats_token="t").field == "nats_token"


def test_secrets_are_not_in_the_repr_of_settings() -> None:
    settings = build_settings(nats_token="t-s3cret", nats_url="nats://u:p-s3cret@127.0.0.1:4222")
    assert "t-s3cret" not in repr(settings) and "p-s3cret" not in repr(settings)
    assert "nats_token='***'" in repr(settings)


def test_the_cli_refuses_bad_auth_settings_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["session", "get", "s1", "--nats-url", "nats://127.0.0.1:1", "--nats-user", "u"])
    assert code == 2 and "nats_password" in capsys.readouterr().err
