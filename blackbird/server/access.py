"""Who may connect to the embedded nats-server: the service identity, the tenants and their credentials.

The embedded server runs with NATS accounts (config-file mode), generated from one access file:

* ``BLACKBIRD`` holds the stream, the KV buckets and object stores (JetStream is enabled for
  it alone). Its one user, the service identity, is what actor hosts, ``serve`` and the CLI of
  the data folder's owner connect as. It exports two services: ``<prefix>cmd.>`` (commands) and
  ``<prefix>svc.>`` (reads of the log).
* Each tenant is an account ``tenant:<name>`` that imports only ``<prefix>cmd.<name>.>`` and
  ``<prefix>svc.<name>.>``, with ``share: true`` so that the server adds a
  ``Nats-Request-Info`` header naming the requesting account and user (a tenant cannot forge
  it: the server replaces it). A tenant account has no JetStream, so no stream, bucket or
  ``$JS`` API object of Blackbird's is reachable from it, nor any other tenant's subject.
* A tenant credential is a user of that account (user name ``<tenant>:<name>``; a credential
  bound to one end user is ``<tenant>:user:<user_id>:<suffix>``). Only a bcrypt hash of its
  password is kept. It may publish on its tenant's two imports (read-only: the reads only) and
  subscribe to replies on its own inbox prefix, ``_INBOX.<user name>``, so credentials of one
  tenant do not see each other's replies either.

The access file (``nats/access.json``) and the server config (``nats/server.conf``) are written
with 0600 permissions; the service password is in the access file, which is how processes that
share the data folder connect.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path

import bcrypt
import msgspec

from blackbird.errors import ValidationError
from blackbird.subjects import validate_token

__all__ = [
    "SERVICE_ACCOUNT",
    "SERVICE_USER",
    "AccessFile",
    "Credential",
    "IssuedCredential",
    "bound_user",
    "inbox_prefix",
    "tenant_account",
    "tenant_of_account",
]

SERVICE_ACCOUNT = "BLACKBIRD"
SERVICE_USER = "blackbird"
TENANT_ACCOUNT_PREFIX = "tenant:"
_USER_MARK = "user"
_BCRYPT_COST = 10  # ~60 ms per connection on the development machine


def tenant_account(tenant: str) -> str:
    """The NATS account of ``tenant``."""
    return TENANT_ACCOUNT_PREFIX + tenant


def tenant_of_account(account: str) -> str | None:
    """The tenant an account belongs to, or None for an account that is no tenant's."""
    return account[len(TENANT_ACCOUNT_PREFIX):] if account.startswith(TENANT_ACCOUNT_PREFIX) else None


def bound_user(tenant: str, user: str) -> str | None:
    """The end user a credential named ``user`` of ``tenant`` is bound to, or None (tenant-wide)."""
    mark = f"{tenant}:{_USER_MARK}:"
    if not user.startswith(mark):
        return None
    bound, sep, _suffix = user[len(mark):].rpartition(":")
    return bound if sep and bound else None


def inbox_prefix(user: str) -> str:
    """Where replies to a tenant credential's requests arrive (the only subjects it may subscribe to)."""
    return f"_INBOX.{user}"


class Credential(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant credential as the access file keeps it (never the password)."""

    user: str
    password_hash: str
    read_only: bool = False
    user_id: str | None = None  # bound to one end user
    created_at: float = 0.0


class Tenant(msgspec.Struct, frozen=True, kw_only=True):
    created_at: float = 0.0
    credentials: dict[str, Credential] = {}


class IssuedCredential(msgspec.Struct, frozen=True, kw_only=True):
    """What a tenant's client needs: shown once, the password is not kept."""

    tenant: str
    user: str
    password: str
    read_only: bool
    user_id: str | None

    def settings(self) -> dict[str, str]:
        """The ``BLACKBIRD_*`` environment variables a client needs (besides the server URL)."""
        return {
            "BLACKBIRD_TENANT": self.tenant,
            "BLACKBIRD_NATS_USER": self.user,
            "BLACKBIRD_NATS_PASSWORD": self.password,
        }


class AccessFile(msgspec.Struct, kw_only=True):
    """The content of ``nats/access.json``: the service password and every tenant's credentials."""

    service_password: str
    subject_prefix: str = "bb"
    tenants: dict[str, Tenant] = {}

    # ------------------------------------------------------------------ files

    @classmethod
    def load_or_create(cls, nats_dir: Path, subject_prefix: str = "bb") -> AccessFile:
        """The folder's access file, created (with a new service password) if missing."""
        path = nats_dir / "access.json"
        try:
            return msgspec.json.decode(path.read_bytes(), type=cls)
        except FileNotFoundError:
            access = cls(service_password=secrets.token_urlsafe(32), subject_prefix=subject_prefix)
            access.save(nats_dir)
            return access
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValidationError(
                f"{path}: not a Blackbird access file ({exc})", field="access_file",
                expected="the access.json written by Blackbird", got=str(path),
            ) from None

    def save(self, nats_dir: Path) -> None:
        _write_private(nats_dir / "access.json", msgspec.json.format(msgspec.json.encode(self)))

    # ------------------------------------------------------------------ tenants and credentials

    def add_tenant(self, tenant: str) -> bool:
        """Add ``tenant`` (False if it was there already)."""
        validate_token(tenant, "tenant")
        if tenant in self.tenants:
            return False
        self.tenants[tenant] = Tenant(created_at=time.time())
        return True

    def remove_tenant(self, tenant: str) -> bool:
        """Remove ``tenant`` and every credential of it (False if it was not there)."""
        return self.tenants.pop(tenant, None) is not None

    def issue(
        self, tenant: str, *, name: str | None = None, user_id: str | None = None, read_only: bool = False
    ) -> IssuedCredential:
        """A new credential of ``tenant`` (which must exist): tenant-wide, or bound to ``user_id``."""
        if tenant not in self.tenants:
            raise ValidationError(
                f"tenant: {tenant!r} is not a tenant of this server; add it with `blackbird tenants add`",
                field="tenant", expected="a tenant added with `blackbird tenants add`", got=tenant,
            )
        suffix = secrets.token_hex(3)
        if user_id is not None:
            validate_token(user_id, "user_id")
            user = f"{tenant}:{_USER_MARK}:{user_id}:{suffix}"
        else:
            label = validate_token(name, "name") if name is not None else f"cred-{suffix}"
            if label == _USER_MARK or label.startswith(f"{_USER_MARK}:"):
                raise ValidationError(
                    f"name: {label!r} is reserved for credentials bound to a user (use --user)",
                    field="name", expected="a name not starting with 'user'", got=label,
                )
            user = f"{tenant}:{label}"
        if any(user in t.credentials for t in self.tenants.values()):
            raise ValidationError(
                f"name: a credential {user!r} exists already", field="name",
                expected="a name not used by another credential of the tenant", got=name,
            )
        password = secrets.token_urlsafe(24)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(_BCRYPT_COST)).decode()
        credential = Credential(
            user=user, password_hash=hashed, read_only=read_only, user_id=user_id, created_at=time.time()
        )
        entry = self.tenants[tenant]
        self.tenants[tenant] = Tenant(created_at=entry.created_at, credentials={**entry.credentials, user: credential})
        return IssuedCredential(tenant=tenant, user=user, password=password, read_only=read_only, user_id=user_id)

    def revoke(self, user: str) -> str | None:
        """Remove the credential ``user``; returns its tenant (None if there was none)."""
        for tenant, entry in self.tenants.items():
            if user in entry.credentials:
                rest = {k: v for k, v in entry.credentials.items() if k != user}
                self.tenants[tenant] = Tenant(created_at=entry.created_at, credentials=rest)
                return tenant
        return None

    # ------------------------------------------------------------------ the server's config

    def render(self, store_dir: Path) -> str:
        """The nats-server configuration enforcing these accounts (listen address and port are
        given on the command line)."""
        p = self.subject_prefix
        service = {
            "jetstream": "enabled",
            "users": [{"user": SERVICE_USER, "password": self.service_password}],
            "exports": [{"service": f"{p}cmd.>"}, {"service": f"{p}svc.>"}],
        }
        accounts: dict[str, object] = {SERVICE_ACCOUNT: service}
        for tenant, entry in sorted(self.tenants.items()):
            imports = [
                {"service": {"account": SERVICE_ACCOUNT, "subject": f"{p}{kind}.{tenant}.>"}, "share": True}
                for kind in ("cmd", "svc")
            ]
            users = []
            for cred in entry.credentials.values():
                publish = [f"{p}svc.{tenant}.>"] if cred.read_only else [f"{p}cmd.{tenant}.>", f"{p}svc.{tenant}.>"]
                publish.append("$JS.API.INFO")  # answered "not enabled": how a client learns it is a tenant's
                users.append({
                    "user": cred.user,
                    "password": cred.password_hash,
                    "permissions": {
                        "publish": {"allow": publish},
                        "subscribe": {"allow": [inbox_prefix(cred.user) + ".>"]},
                    },
                })
            accounts[tenant_account(tenant)] = {"users": users, "imports": imports}
        # JSON is valid nats-server configuration syntax (and quotes every name safely)
        config = {"jetstream": {"store_dir": str(store_dir)}, "accounts": accounts}
        return "# generated by Blackbird from access.json: edits are overwritten\n" + json.dumps(config, indent=2)

    def write_config(self, nats_dir: Path, store_dir: Path) -> Path:
        path = nats_dir / "server.conf"
        _write_private(path, self.render(store_dir).encode())
        return path


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
