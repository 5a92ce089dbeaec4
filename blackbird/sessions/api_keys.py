"""API keys of the HTTP API: issued and revoked as events on the tenant aggregate, checked in memory.

A key is shown once, as ``bbk_<key id>_<secret>``: the key id is 16 hex characters (public: it
names the key in lists, audits and as the principal ``key:<key id>``), the secret 32 random bytes
in URL-safe base64. Only ``sha256(secret)`` is stored, in the event and the tenant's state (the
secret has 256 bits of entropy, so a slow hash would add nothing). Roles: ``admin`` (the tenant:
every session, keys, monitoring), ``service`` (every session of the tenant), ``user`` (one
user's sessions, those they take part in).

Issuing, revoking and recording a use are tenant commands (:mod:`actors.tenant`), run by this
process's tenant actor host, so an audit of the tenant shows who could do what, when.
:meth:`ApiKeys.verify`, called on every HTTP request, reads the tenant states this process
follows (:class:`~actors.tenant.PolicyBook`) and never waits: a key revoked by another process
stops working here as soon as its revocation is delivered (normally milliseconds).
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets
from collections.abc import Callable

import anyio.abc
import msgspec
import structlog

from actors.events import ApiKeyRole, GetSession, IssueApiKey, RecordKeyUse, RevokeApiKey
from actors.tenant import ApiKeyRecord, PolicyBook
from actors.validation import MAX_INSTANT
from blackbird._validate import check_enum, check_seconds, check_text
from blackbird.errors import ApiKeyNotFoundError
from blackbird.ids import new_id
from blackbird.sessions.gateway import acting_principal
from blackbird.sessions.tenants import TenantDirectory
from blackbird.subjects import validate_token

__all__ = ["ApiKey", "ApiKeys", "IssuedApiKey", "KEY_PREFIX", "USE_RECORD_INTERVAL"]

log = structlog.get_logger("blackbird.api_keys")

KEY_PREFIX = "bbk_"
#: seconds between two recorded uses of one key (each is a commit on the tenant's log)
USE_RECORD_INTERVAL = 600.0
_KEY_ID_LENGTH = 16
_SECRET_BYTES = 32
# bbk_ + 16 + _ + 43 characters; anything much longer is not a key and is not even hashed
_MAX_PRESENTED = 128
_HEX = frozenset("0123456789abcdef")


class ApiKey(msgspec.Struct, frozen=True, kw_only=True):
    """An API key's public fields (never its secret or its hash); times in seconds since the epoch."""

    key_id: str
    tenant: str
    role: str  # "admin" | "service" | "user"
    user_id: str | None  # role "user": whose sessions
    label: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None


class IssuedApiKey(ApiKey, frozen=True, kw_only=True):
    """A key just issued: its public fields and ``key``, the whole secret string
    (``bbk_<key_id>_<secret>``), shown this once and stored nowhere."""

    key: str


def _public(tenant: str, record: ApiKeyRecord) -> ApiKey:
    return ApiKey(
        key_id=record.key_id, tenant=tenant, role=record.role, user_id=record.user_id, label=record.label,
        created_at=record.created_at, expires_at=record.expires_at, revoked_at=record.revoked_at,
        last_used_at=record.last_used_at,
    )


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("ascii")).hexdigest()


class ApiKeys:
    """Create, list and revoke a tenant's API keys (coroutines); verify a presented key (at once).

    ``bb.api_keys``; it needs the service identity (a client on tenant credentials raises
    AccessDeniedError). Tenant commands run on this process's tenant actors, so a key created
    here verifies here at once.
    """

    def __init__(
        self,
        tenants: TenantDirectory,
        book: PolicyBook,
        tasks: anyio.abc.TaskGroup,
        *,
        tenant: str,
        clock: Callable[[], float],
    ) -> None:
        self._tenants = tenants
        self._book = book
        self._tasks = tasks
        self._tenant = tenant
        self._clock = clock
        self._recorded: dict[str, float] = {}  # key id -> when this process last recorded a use

    def _tenant_of(self, tenant: str | None) -> str:
        return self._tenant if tenant is None else validate_token(tenant, "tenant")

    async def create(
        self,
        *,
        role: ApiKeyRole | str,
        user_id: str | None = None,
        label: str | None = None,
        expires_in: float | None = None,
        tenant: str | None = None,
    ) -> IssuedApiKey:
        """Issue a key of ``role`` (``"admin"``, ``"service"`` or ``"user"``; a user key needs
        ``user_id``, the others refuse one) for ``tenant`` (default: the client's), valid for
        ``expires_in`` seconds (None: until revoked). Its ``key`` is shown only here.

        Raises ValidationError naming the field for bad input.
        """
        tenant = self._tenant_of(tenant)
        checked_role = check_enum(role, ApiKeyRole, "role")
        if user_id is not None:
            validate_token(user_id, "user_id")
        if label is not None:
            check_text(label, "label")
        now = self._clock()
        seconds = check_seconds(expires_in, "expires_in", maximum=MAX_INSTANT - now)
        key_id = new_id(_KEY_ID_LENGTH // 2)
        secret = secrets.token_urlsafe(_SECRET_BYTES)
        command = IssueApiKey(
            key_id=key_id, secret_hash=_hash(secret), role=checked_role, user_id=user_id, label=label,
            expires_at=None if seconds is None else now + seconds,
        )
        state = await self._tenants.command(tenant, command, None)
        public = _public(tenant, state.api_keys[key_id])
        log.info("api_key_issued", tenant=tenant, key_id=key_id, role=public.role, user_id=user_id)
        return IssuedApiKey(**msgspec.structs.asdict(public), key=f"{KEY_PREFIX}{key_id}_{secret}")

    async def list(self, *, tenant: str | None = None) -> builtins.list[ApiKey]:
        """Every key of ``tenant`` (default: the client's), revoked and expired ones included,
        oldest first; never their secrets or hashes."""
        tenant = self._tenant_of(tenant)
        state = await self._tenants.command(tenant, GetSession(), None)  # read, caught up with the log
        return sorted((_public(tenant, r) for r in state.api_keys.values()), key=lambda k: (k.created_at, k.key_id))

    async def revoke(self, key_id: str, *, tenant: str | None = None) -> ApiKey:
        """Revoke the key ``key_id`` of ``tenant`` (default: the client's): it stops working at
        once here, and in other processes as soon as they see the revocation.

        Raises ApiKeyNotFoundError (no such key in that tenant) or ValidationError (malformed
        id, or already revoked).
        """
        tenant = self._tenant_of(tenant)
        state = await self._tenants.command(tenant, RevokeApiKey(key_id=key_id), None)
        log.info("api_key_revoked", tenant=tenant, key_id=key_id)
        return _public(tenant, state.api_keys[key_id])

    def verify(self, presented: str) -> ApiKey | None:
        """The live key ``presented`` (``bbk_<key_id>_<secret>``) is, or None: unknown, wrong
        secret, revoked, expired (by the client's clock) or not a key at all. Never waits, never
        raises."""
        if not isinstance(presented, str) or len(presented) > _MAX_PRESENTED or not presented.isascii():
            return None
        if not presented.startswith(KEY_PREFIX):
            return None
        key_id, separator, secret = presented[len(KEY_PREFIX):].partition("_")
        if not separator or not secret or len(key_id) != _KEY_ID_LENGTH or not _HEX.issuperset(key_id):
            return None
        digest = _hash(secret)
        now = self._clock()
        found = None
        for tenant, record in self._book.api_key(key_id):
            # compare every candidate in full: no early exit on a hit
            if hmac.compare_digest(record.secret_hash, digest) and record.live(now):
                found = _public(tenant, record)
        return found

    def used(self, key_id: str) -> None:
        """Record that ``key_id`` was used now, at most once per :data:`USE_RECORD_INTERVAL`
        per key, in the background: it never delays the caller, and a failure is only logged."""
        now = self._clock()
        last = self._recorded.get(key_id)
        if last is not None and now - last < USE_RECORD_INTERVAL:
            return
        self._recorded[key_id] = now
        for tenant, record in self._book.api_key(key_id):
            if record.last_used_at is not None and now - record.last_used_at < USE_RECORD_INTERVAL:
                continue  # another process recorded a use lately
            try:
                self._tasks.start_soon(self._record_use, tenant, key_id, now)
            except RuntimeError as exc:  # the client is closing: the use goes unrecorded
                log.debug("api_key_use_not_recorded", tenant=tenant, key_id=key_id, error=repr(exc))

    async def _record_use(self, tenant: str, key_id: str, at: float) -> None:
        acting_principal.set(f"key:{key_id}")  # this task's own context: the use is the key's
        try:
            await self._tenants.command(tenant, RecordKeyUse(key_id=key_id, at=at), None)
        except ApiKeyNotFoundError:
            log.debug("api_key_use_not_recorded", tenant=tenant, key_id=key_id, reason="unknown")
        except Exception as exc:  # a background chore: it must never fail the client's task group
            log.warning("api_key_use_not_recorded", tenant=tenant, key_id=key_id, error=repr(exc))
