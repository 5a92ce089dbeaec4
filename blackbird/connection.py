"""Connection options: the nats-py ``connect()`` arguments for the authentication and TLS settings."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path
from typing import Any

from blackbird.config import Settings
from blackbird.errors import ValidationError

# The kinds of credential a client may present; at most one is given.
_KINDS = (
    ("nats_creds", "creds"),
    ("nats_nkey_seed", "nkey"),
    ("nats_token", "token"),
    ("nats_user", "user/password"),
)
_ONE_KIND = "at most one of nats_creds, nats_nkey_seed, nats_token, or nats_user with nats_password"


def connect_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of nats-py's ``connect()`` for ``settings``' credentials and TLS:
    ``user_credentials`` (a .creds file), ``nkeys_seed`` (a seed file), ``token``, ``user`` and
    ``password``, and ``tls`` (an :class:`ssl.SSLContext` trusting ``tls_ca`` and presenting
    ``tls_cert``/``tls_key``). Empty when none is set.

    Checked here, before any connection: raises :class:`~blackbird.errors.ValidationError`
    naming the setting for a file that cannot be read or does not hold what it should, a
    certificate without its key (or a key without its certificate), a user without a password
    (or a password without a user), and more than one kind of credential. No secret is ever put
    in the error.
    """
    given = [(name, kind) for name, kind in _KINDS if getattr(settings, name) is not None]
    if settings.nats_password is not None and settings.nats_user is None:
        raise ValidationError(
            "nats_user: a NATS password was given without a user name (set nats_user too)",
            field="nats_user", expected="a user name with nats_password",
        )
    if len(given) > 1:
        (first, _), (second, _) = given[0], given[1]
        raise ValidationError(
            f"{second}: expected {_ONE_KIND}; got {first} and {second}",
            field=second, expected=_ONE_KIND, got=[name for name, _ in given],
        )
    options: dict[str, Any] = {}
    if settings.nats_creds is not None:
        text = _read("nats_creds", settings.nats_creds, "a .creds file (a NATS user JWT and its nkey seed)")
        if "BEGIN NATS USER JWT" not in text or "BEGIN USER NKEY SEED" not in text:
            # nats-py would loop for ever looking for the JWT's header line
            raise ValidationError(
                f"nats_creds: {settings.nats_creds} is not a .creds file (expected the "
                "'-----BEGIN NATS USER JWT-----' and '-----BEGIN USER NKEY SEED-----' blocks)",
                field="nats_creds", expected="a .creds file", got=settings.nats_creds,
            )
        options["user_credentials"] = settings.nats_creds
    elif settings.nats_nkey_seed is not None:
        text = _read("nats_nkey_seed", settings.nats_nkey_seed, "a file holding a user nkey seed (SU...)")
        if not _is_seed(text.strip()):
            raise ValidationError(
                f"nats_nkey_seed: {settings.nats_nkey_seed} does not hold an nkey seed (expected one "
                "line starting with SU)",
                field="nats_nkey_seed", expected="a file holding a user nkey seed (SU...)",
                got=settings.nats_nkey_seed,
            )
        options["nkeys_seed"] = settings.nats_nkey_seed
    elif settings.nats_token is not None:
        if not settings.nats_token:
            raise ValidationError("nats_token: expected a token, got an empty one", field="nats_token",
                                  expected="a non-empty token")
        options["token"] = settings.nats_token
    elif settings.nats_user is not None:
        if not settings.nats_user:
            raise ValidationError("nats_user: expected a user name, got an empty one", field="nats_user",
                                  expected="a non-empty user name")
        if settings.nats_password is None:
            raise ValidationError(
                "nats_password: a NATS user name was given without a password (set nats_password, "
                "preferably from BLACKBIRD_NATS_PASSWORD)",
                field="nats_password", expected="a password with nats_user",
            )
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password
    tls = _tls_context(settings)
    if tls is not None:
        options["tls"] = tls
    return options


def credential_kind(options: dict[str, Any]) -> str:
    """The kind of credential ``connect()`` options present, for messages (never the secret):
    ``"creds"``, ``"nkey"``, ``"token"``, ``"user/password"`` or ``"none"``, followed by
    ``" + TLS client certificate"`` when the TLS context of ``options`` presents one."""
    if options.get("user_credentials") is not None:
        kind = "creds"
    elif options.get("nkeys_seed") is not None or options.get("nkeys_seed_str") is not None:
        kind = "nkey"
    elif options.get("token") is not None:
        kind = "token"
    elif options.get("user") is not None:
        kind = "user/password"
    else:
        kind = "none"
    if getattr(options.get("tls"), "_blackbird_client_cert", False):
        kind += " + TLS client certificate"
    return kind


def _read(field: str, path: str, expected: str) -> str:
    """The text of the file a setting names, or a ValidationError naming the setting."""
    try:
        return Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValidationError(
            f"{field}: cannot read {path} ({reason}); expected {expected}",
            field=field, expected=expected, got=path,
        ) from None


def _is_seed(text: str) -> bool:
    import nkeys  # type: ignore[import-untyped]  # only needed with nkey or creds authentication

    try:
        nkeys.from_seed(text.encode()).wipe()
    except Exception:  # nkeys raises its own errors, binascii's and nacl's for malformed seeds
        return False
    return text.startswith("SU")


def _no_password() -> bytes:
    return b""  # an encrypted key then fails to load instead of asking for its passphrase


class _ClientContext(ssl.SSLContext):
    """An SSL context that remembers whether it presents a client certificate (for messages)."""

    _blackbird_client_cert = False


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    """A client TLS context trusting ``tls_ca`` (else the system's CAs) and presenting
    ``tls_cert`` with ``tls_key``; None when no TLS setting is given."""
    ca, cert, key = settings.tls_ca, settings.tls_cert, settings.tls_key
    if ca is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None):
        missing, present = ("tls_key", "tls_cert") if key is None else ("tls_cert", "tls_key")
        raise ValidationError(
            f"{missing}: {present} was given without {missing} (a client certificate needs its key)",
            field=missing, expected=f"a file path, with {present}",
        )
    context = _ClientContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server and its host name
    for name in ("tls_ca", "tls_cert", "tls_key"):
        path = getattr(settings, name)
        if path is not None:
            _read(name, path, "a PEM file")
    if ca is not None:
        try:
            context.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ValidationError(
                f"tls_ca: {ca} holds no usable CA certificate ({exc.reason or exc})",
                field="tls_ca", expected="a PEM bundle of CA certificates", got=ca,
            ) from None
    else:
        context.load_default_certs()
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key, password=_no_password)  # never prompt on a terminal
        except ssl.SSLError as exc:
            raise ValidationError(
                f"tls_cert: cannot use {cert} with the key {key} ({exc.reason or exc}; an encrypted "
                "key is not supported)",
                field="tls_cert", expected="a PEM client certificate and its matching, unencrypted PEM key",
                got=cert,
            ) from None
        context._blackbird_client_cert = True
    return context


def identity_name(options: dict[str, Any]) -> str | None:
    """The name this client is known by to the server, if its credentials carry one: the user of
    user/password, the ``name`` (else ``sub``) claim of a .creds file's user JWT. A tenant
    credential may subscribe only to replies under ``_INBOX.<that name>``."""
    if "user" in options:
        return str(options["user"])
    creds = options.get("user_credentials")
    if not isinstance(creds, str):
        return None
    try:
        lines = Path(creds).read_text().splitlines()
        token = lines[lines.index("-----BEGIN NATS USER JWT-----") + 1].strip()
        body = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (OSError, ValueError, IndexError):
        return None  # connect_options checked the file: a JWT without claims has no name to use
    name = claims.get("name") or claims.get("sub") if isinstance(claims, dict) else None
    return name if isinstance(name, str) and name else None
