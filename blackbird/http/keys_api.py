"""The API-key endpoints of the HTTP API (admins create, list and revoke their tenant's keys).

Every call acts on the caller's own tenant: another tenant's key id is 404, exactly as an unknown
one. A key's secret is in the answer of its creation only; no answer ever holds a hash.
"""

from __future__ import annotations

import msgspec

from actors.events import ApiKeyRole
from blackbird.http.auth import ADMIN
from blackbird.http.routes import Call, Endpoint, HttpContext
from blackbird.sessions.api_keys import ApiKey, IssuedApiKey


class CreateKeyBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new key: its role (a ``user`` key needs ``user_id``), a label, seconds until it expires."""

    role: ApiKeyRole
    user_id: str | None = None
    label: str | None = None
    expires_in: float | None = None  # seconds; None: until revoked


class ApiKeyList(msgspec.Struct, frozen=True):
    """The tenant's keys, oldest first, revoked and expired ones included."""

    keys: list[ApiKey]


def endpoints(ctx: HttpContext) -> list[Endpoint]:
    """The endpoints of this module, served with ``ctx``."""
    bb = ctx.bb

    async def create(call: Call) -> IssuedApiKey:
        body: CreateKeyBody = call.body
        issued: IssuedApiKey = await bb.api_keys.create(
            role=body.role, user_id=body.user_id, label=body.label, expires_in=body.expires_in,
            tenant=call.caller.tenant,
        )
        return issued

    async def listing(call: Call) -> ApiKeyList:
        return ApiKeyList(keys=await bb.api_keys.list(tenant=call.caller.tenant))

    async def revoke(call: Call) -> ApiKey:
        revoked: ApiKey = await bb.api_keys.revoke(call.path["key_id"], tenant=call.caller.tenant)
        return revoked

    return [
        Endpoint(
            "POST", "/v1/keys", create, "create an API key (its secret is shown in this answer only)",
            body=CreateKeyBody, response=IssuedApiKey, roles=ADMIN, status=201, tag="keys",
        ),
        Endpoint(
            "GET", "/v1/keys", listing, "list the tenant's API keys", response=ApiKeyList, roles=ADMIN, tag="keys",
        ),
        Endpoint(
            "DELETE", "/v1/keys/{key_id}", revoke, "revoke an API key", response=ApiKey, roles=ADMIN, tag="keys",
        ),
    ]
