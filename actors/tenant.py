"""The tenant aggregate (pure): a tenant's policy overrides, user quota adjustments and API keys.

The API keys of its HTTP API are recorded as issued, revoked and last used (only their secrets'
hashes are kept).

Its commits live on ``<prefix>.<tenant>.tenant``. Session actors decide under the tenant's
*effective* policy (the base policy with the tenant's overrides merged in), which a
:class:`PolicyBook` keeps per tenant from this aggregate's states.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from actors import aggregate
from actors.events import (
    AdjustUserQuota,
    ApiKeyIssued,
    ApiKeyRevoked,
    ApiKeyRole,
    ApiKeyUsed,
    Commit,
    Decision,
    Event,
    GetSession,
    IssueApiKey,
    RecordKeyUse,
    Rejection,
    RevokeApiKey,
    SetTenantPolicy,
    TenantCommand,
    TenantPolicyChanged,
    UserQuotaAdjusted,
)
from actors.limits import NO_BOOSTS, Boosts
from actors.policy import Policy, PolicyError, policy_from_document
from actors.ports import AggregateKey


class ApiKeyRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One API key as the tenant's state holds it (times in seconds since the epoch)."""

    key_id: str
    secret_hash: str  # sha256(secret) as hex
    role: str  # an ApiKeyRole value
    user_id: str | None
    label: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None = None
    last_used_at: float | None = None

    def live(self, now: float) -> bool:
        """Whether the key is accepted at ``now``: not revoked, not expired."""
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class TenantState(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    tenant: str
    version: int = 0  # commits applied
    policy: Policy | None = None  # None: the base policy, never overridden
    overrides: dict[str, Any] = {}  # every override so far, merged
    user_boosts: dict[str, dict[str, tuple[float, float | None]]] = {}
    api_keys: dict[str, ApiKeyRecord] = {}  # by key id, revoked ones included
    recent_commands: bytes = b""
    recent_digests: bytes = b""
    recent_refusals: dict[str, Rejection] = {}  # answers to recent refused commands


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` merged in, recursively for nested tables."""
    merged = dict(base)
    for key, value in overrides.items():
        current = merged.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            merged[key] = merge(current, value)
        else:
            merged[key] = value
    return merged


def _invalid(field: str, expected: str, got: Any) -> Decision:
    return Decision(
        rejection=Rejection(
            "validation_error", f"{field}: expected {expected}, got {got!r}",
            {"field": field, "expected": expected, "got": str(got)},
        )
    )


def _unknown_key(state: TenantState, key_id: str) -> Decision:
    return Decision(
        rejection=Rejection(
            "api_key_not_found", f"API key {key_id!r} not found in tenant {state.tenant!r}",
            {"key_id": key_id, "tenant": state.tenant},
        )
    )


def _decide_key(state: TenantState, command: IssueApiKey | RevokeApiKey | RecordKeyUse, now: float) -> Decision:
    if isinstance(command, IssueApiKey):
        role = ApiKeyRole(command.role)
        if command.key_id in state.api_keys:
            return _invalid("key_id", "a key id not used yet in this tenant", command.key_id)
        if role is ApiKeyRole.USER and command.user_id is None:
            return _invalid("user_id", "a user id for a key of role user", None)
        if role is not ApiKeyRole.USER and command.user_id is not None:
            return _invalid("user_id", f"no user id for a key of role {role.value}", command.user_id)
        if command.expires_at is not None and command.expires_at <= now:
            return _invalid("expires_at", f"an instant after now ({now:.3f})", command.expires_at)
        return Decision(events=(ApiKeyIssued(
            at=now, key_id=command.key_id, secret_hash=command.secret_hash, role=role.value,
            user_id=command.user_id, label=command.label, expires_at=command.expires_at,
        ),))
    record = state.api_keys.get(command.key_id)
    if record is None:
        return _unknown_key(state, command.key_id)
    if record.revoked_at is not None:
        return _invalid("key_id", "a key that is not revoked", f"{command.key_id} (revoked)")
    if isinstance(command, RevokeApiKey):
        return Decision(events=(ApiKeyRevoked(at=now, key_id=command.key_id),))
    used_at = min(command.at, now)  # a use is never recorded as later than it is decided
    if record.last_used_at is not None and used_at <= record.last_used_at:
        return Decision()  # a later use is already recorded
    return Decision(events=(ApiKeyUsed(at=now, key_id=command.key_id, used_at=used_at),))


def effective_policy(state: TenantState, base: Policy) -> Policy:
    return state.policy if state.policy is not None else base


def decide(state: TenantState, command: TenantCommand, now: float, base: Policy) -> Decision:
    """Decide a tenant command at ``now``; ``base`` is the packaged (or configured) policy."""
    if isinstance(command, GetSession):
        return Decision()
    if isinstance(command, SetTenantPolicy):
        if "version" in command.overrides:
            return _invalid("overrides.version", "no version (it is assigned on every change)",
                            command.overrides["version"])
        current = effective_policy(state, base)
        document = merge(msgspec.to_builtins(current), command.overrides)
        document["version"] = current.version + 1
        try:
            policy = policy_from_document(document)
        except PolicyError as exc:
            field = "overrides" + (f".{exc.path}" if exc.path else "")
            return Decision(
                rejection=Rejection(
                    "validation_error", f"{field}: {exc}",
                    {"field": field, "expected": "a valid tier policy (see actors/tiers.toml)"},
                )
            )
        return Decision(events=(TenantPolicyChanged(at=now, policy=policy, overrides=command.overrides),))
    if isinstance(command, AdjustUserQuota):
        if command.until is not None and command.until <= now:
            return _invalid("until", f"an instant after now ({now:.3f})", command.until)
        event = UserQuotaAdjusted(
            at=now, user_id=command.user_id, resource_type=command.resource_type.value,
            limit=command.limit, until=command.until,
        )
        return Decision(events=(event,))
    if isinstance(command, IssueApiKey | RevokeApiKey | RecordKeyUse):
        return _decide_key(state, command, now)
    raise TypeError(f"not a tenant command: {command!r}")


def evolve(state: TenantState, event: Event) -> TenantState:
    replace = msgspec.structs.replace
    if isinstance(event, TenantPolicyChanged):
        return replace(state, policy=event.policy, overrides=merge(state.overrides, event.overrides))
    if isinstance(event, UserQuotaAdjusted):
        mine = {k: v for k, v in state.user_boosts.get(event.user_id, {}).items() if k != event.resource_type}
        if event.limit is not None:
            mine[event.resource_type] = (event.limit, event.until)
        boosts = {**state.user_boosts, event.user_id: mine}
        return replace(state, user_boosts=boosts)
    if isinstance(event, ApiKeyIssued):
        record = ApiKeyRecord(
            key_id=event.key_id, secret_hash=event.secret_hash, role=event.role, user_id=event.user_id,
            label=event.label, created_at=event.at, expires_at=event.expires_at,
        )
        return replace(state, api_keys={**state.api_keys, event.key_id: record})
    if isinstance(event, ApiKeyRevoked | ApiKeyUsed):
        known = state.api_keys.get(event.key_id)
        if known is None:  # decide never emits it for an unknown key; a log is replayed as it is
            return state
        if isinstance(event, ApiKeyRevoked):
            changed = replace(known, revoked_at=event.at)
        else:
            changed = replace(known, last_used_at=max(known.last_used_at or 0.0, event.used_at))
        return replace(state, api_keys={**state.api_keys, event.key_id: changed})
    raise TypeError(f"not a tenant event: {event!r}")


def apply_commit(state: TenantState, commit: Commit) -> TenantState:
    return aggregate.apply_commit(evolve, state, commit)


class PolicyBook:
    """The effective policy and user adjustments of every tenant this process has seen.

    Fed with tenant states (from this process's tenant actors and from following the tenants'
    log); keeps, per tenant, the state with the highest version, so the order in which the two
    sources deliver does not matter.
    """

    def __init__(self, base: Policy) -> None:
        self.base = base
        self._tenants: dict[str, TenantState] = {}
        # every API key id -> the tenants that have a key of that id (normally one) and its record
        self._keys: dict[str, dict[str, ApiKeyRecord]] = {}

    def observe(self, state: TenantState) -> None:
        known = self._tenants.get(state.tenant)
        if known is None or state.version > known.version:
            self._tenants[state.tenant] = state
            if known is None or known.api_keys is not state.api_keys:
                for key_id, record in state.api_keys.items():  # keys are never removed, only revoked
                    self._keys.setdefault(key_id, {})[state.tenant] = record

    def api_key(self, key_id: str) -> list[tuple[str, ApiKeyRecord]]:
        """(tenant, record) of every key with id ``key_id`` this book has seen (revoked ones
        too): one, unless two tenants drew the same random id."""
        return list(self._keys.get(key_id, {}).items())

    def state(self, tenant: str) -> TenantState:
        return self._tenants.get(tenant) or TenantState(tenant=tenant)

    def policy(self, tenant: str) -> Policy:
        known = self._tenants.get(tenant)
        return self.base if known is None or known.policy is None else known.policy

    def user_boosts(self, tenant: str, user_id: str) -> Boosts:
        known = self._tenants.get(tenant)
        if known is None:
            return NO_BOOSTS
        return known.user_boosts.get(user_id, NO_BOOSTS)


class TenantBehaviour(aggregate.Behaviour):
    """Binds the tenant aggregate's pure functions and the base policy for the actor host."""

    state_type = TenantState
    evolve = staticmethod(evolve)

    def __init__(self, base: Policy) -> None:
        self.base = base

    def initial_state(self, key: AggregateKey) -> TenantState:
        return TenantState(tenant=key.tenant)

    def decide(self, state: TenantState, command: TenantCommand, now: float) -> Decision:
        return decide(state, command, now, self.base)

