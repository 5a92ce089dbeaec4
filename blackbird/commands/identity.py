"""Who sent a request over NATS, as the server vouches for it, and what that identity may do.

A tenant's credentials live in the tenant's own NATS account, which reaches Blackbird only
through the service imports of :mod:`blackbird.server.access`. Those imports are shared, so the
server adds a ``Nats-Request-Info`` header naming the requesting account and user, replacing any
header the sender wrote. A request without it comes from inside the service account (the
service identity: ``serve``, the SDK hosting actors, the HTTP API on behalf of its API keys),
which is trusted to name the principal it acts for.

The rules (pure functions, so every entry point applies the same ones):

* a tenant identity reaches its own tenant only;
* operator actions (quota adjustments, tier changes, tenant policy) need the service identity;
* a credential bound to one end user reaches only that user's sessions and records.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from actors.events import AdjustQuota, AssignAgent, ChangeTier, CreateSession, SessionCommand
from blackbird.errors import AccessDeniedError
from blackbird.server.access import bound_user, tenant_of_account

__all__ = ["REQUEST_INFO", "Identity", "authorize_command", "identity_of"]

#: The header a shared service import carries: the requester's account and user, set by the server.
REQUEST_INFO = "Nats-Request-Info"

OPERATOR_COMMANDS: tuple[type, ...] = (AdjustQuota, ChangeTier, AssignAgent)


class Identity(msgspec.Struct, frozen=True):
    """Who is asking: the principal recorded in what they cause, and what they are confined to."""

    principal: str
    tenant: str | None = None  # None: the service identity (any tenant)
    user_id: str | None = None  # a credential bound to one end user

    @property
    def is_service(self) -> bool:
        return self.tenant is None


class _RequestInfo(msgspec.Struct):
    acc: str = ""
    user: str = ""
    name_tag: str = ""  # operator mode: the user JWT's name (set by the account's signer)


_decode_info = msgspec.json.Decoder(_RequestInfo).decode


def identity_of(
    headers: Mapping[str, str] | None, tenant: str, claimed: str, accounts: Mapping[str, str] | None = None
) -> Identity:
    """The identity behind a request on a subject of ``tenant``; ``claimed`` is the principal the
    body names, believed only from the service identity. Raises AccessDeniedError when the
    requester's account is not ``tenant``'s.

    A tenant's account is ``tenant:<name>`` (the embedded server's config-file accounts) or, on
    an operator-mode (JWT) deployment where accounts are public keys, the one ``accounts`` maps
    to the tenant (the ``tenant_accounts`` setting). There the principal is the user JWT's name."""
    raw = headers.get(REQUEST_INFO) if headers else None
    if raw is None:
        return Identity(principal=claimed)
    try:
        info = _decode_info(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        raise AccessDeniedError(
            f"the {REQUEST_INFO} header is not the server's", principal="unknown", action="request", tenant=tenant
        ) from None
    who = info.name_tag or info.user
    if not who:  # an import without `share`: the server names the account only, not who in it
        raise AccessDeniedError(
            f"a request from account {info.acc!r} names no user (its service import lacks `share`): "
            "Blackbird needs to know who asks",
            principal=info.acc or "unknown", action="request", tenant=tenant,
        )
    account_tenant = tenant_of_account(info.acc) or (accounts or {}).get(info.acc)
    if account_tenant is None:
        raise AccessDeniedError(
            f"account {info.acc!r} is no tenant's: it may not reach Blackbird's services",
            principal=who, action="request", tenant=tenant,
        )
    if account_tenant != tenant:
        raise AccessDeniedError(
            f"{who!r} of tenant {account_tenant!r} may not reach tenant {tenant!r}",
            principal=who, action="request", tenant=tenant,
        )
    return Identity(principal=who, tenant=account_tenant, user_id=bound_user(account_tenant, who))


def authorize_command(identity: Identity, command: SessionCommand) -> None:
    """Raise AccessDeniedError if ``identity`` may not send ``command`` at all (the session's
    owner, for a user-bound identity, is checked by whoever holds the session)."""
    if identity.is_service:
        return
    name = type(command).__name__
    if isinstance(command, OPERATOR_COMMANDS):
        raise AccessDeniedError(
            f"{name} is an operator's action: it needs the service identity, not tenant credentials",
            principal=identity.principal, action=name, tenant=identity.tenant,
        )
    if identity.user_id is not None and isinstance(command, CreateSession) and command.user_id != identity.user_id:
        raise AccessDeniedError(
            f"{identity.principal!r} may create sessions for user {identity.user_id!r} only, "
            f"not for {command.user_id!r}",
            principal=identity.principal, action=name, tenant=identity.tenant,
        )


def authorize_session(identity: Identity, session_user: str, action: str) -> None:
    """Raise AccessDeniedError if a user-bound ``identity`` is not the session's user."""
    if identity.user_id is not None and session_user != identity.user_id:
        raise AccessDeniedError(
            f"{identity.principal!r} may reach the sessions of user {identity.user_id!r} only",
            principal=identity.principal, action=action, tenant=identity.tenant,
        )
